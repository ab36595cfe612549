"""float32 vs bfloat16 compute (``model.dtype``) in the train step: compile, peak memory, step time.

    python experiments/bench_precision.py [--configs bevformer_tiny:demo fd3d_bevformer_base_to_tiny:demo ...]
        [--time bevformer_tiny:demo] [--iters 5] [--warmup 1]

For each detector config (``NAME:ARG``), in both precisions, at one sample per device: the train step, its
compile seconds and XLA's peak bytes
(``memory_analysis``; from abstract shapes for configs not timed), and for the configs in ``--time`` the step time
on one dummy batch with random GT, interleaved, with bfloat16's median over float32's. The peak memory of every full
config and FD3D pair in both precisions is ``bench_memory.py --dtypes float32 bfloat16``.

On a CPU bfloat16 is not expected to be faster: XLA:CPU has few native bfloat16 kernels and converts around them;
the speed that bfloat16 is for is a GPU's or TPU's (tensor cores, MXU).
"""
import argparse

import jax

from experiments import benchmark
from experiments.bench_sca import compare_variants

CONFIGS = ('bevformer_tiny:demo', 'detr3d_r50:demo')
VARIANTS = {'float32': 'float32', 'bfloat16': 'bfloat16'}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='*', default=list(CONFIGS), help='NAME:ARG')
    parser.add_argument('--time', nargs='*', default=list(CONFIGS), help='configs whose steps are timed')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--name', default='bench_precision')
    args = parser.parse_args(argv)
    batch_size = jax.device_count()
    result = {}
    for spec in args.configs:
        name, config = benchmark.load_config(spec)
        print(name, flush=True)
        timed = spec in args.time or name in args.time
        result[name] = compare_variants(config, 'dtype', VARIANTS, timed, batch_size, args.iters, args.warmup)
        float32, bfloat16 = (result[name][v]['memory_bytes']['peak'] for v in VARIANTS)
        result[name]['peak_bfloat16_over_float32'] = round(bfloat16 / float32, 3)
    return benchmark.write_result(args.name, dict(batch_size=batch_size, backend=jax.default_backend(),
                                                  configs=result), args.out_dir)


if __name__ == '__main__':
    main()
