"""Compiled peak memory of the real train step, per config, beside PyTorch's published training memory.

    python experiments/bench_memory.py [--configs bevformer_tiny fd3d_bevformer_base_to_tiny ...] [--remat on|off]
        [--dtypes float32 bfloat16]

For each config (``NAME[:ARG]``, ``ARG`` default ``full``; default: the five detectors and the three FD3D
pairs) it compiles, from abstract shapes only (``loop.abstract_train_step``: nothing is initialised or
run), the train step that ``fd3d_jax.train`` runs: detection loss [+ the distillation loss against the
frozen expert], AdamW update, batch 1 per device, the whole temporal queue, float32. Reports XLA's
``memory_analysis()`` (peak = arguments + outputs + temporaries - aliased, ``benchmark.memory``), the
compile seconds (wall, and this process's CPU seconds: robust to a busy machine) and the parameter
counts (apprentice, distillation modules, expert). The PyTorch column is the BEVFormer README's training
memory (nvidia-smi, fp32, batch 1 per GPU) for the official configs: a process-level figure (CUDA context
and caching allocator included), not the same definition.
``--remat on|off`` overrides the layers' and the backbone's rematerialisation (apprentice and expert). The
backbone's repeated blocks are compiled as a loop, the form GPUs and TPUs run (``summary.accelerator_form``; the CPU
default unrolls them, ``bench_backbone.py``).
``--dtypes float32 bfloat16`` compiles every config in each compute precision (``config.model.dtype``, which the
distiller applies to the expert and its own modules too) and prints the peak ratio to the first, side by side
(result ``bench_memory_precision``).

Each row also has ``residual_bytes``: what the backward pass keeps of the forward, per dtype (``jax.vjp``'s
residuals of the differentiated loss, from abstract shapes: no compile, no backend). It is the backend-independent
part of the peak that precision changes; XLA:CPU's peak is not (it has no bfloat16 convolution or matmul and
converts every one to float32 after optimisation, temporaries included).
"""
import argparse
import time

import jax
import numpy as np

from experiments import benchmark
from fd3d_jax.distill import make_distiller
from fd3d_jax.models import build
from fd3d_jax.models.summary import accelerator_form
from fd3d_jax.train import loop
from fd3d_jax.train.train_step import expert_forward, make_loss_fn

CONFIGS = ('bevformer_tiny', 'bevformer_small', 'bevformer_base', 'detr3d_r50', 'detr3d_r101',
           'fd3d_bevformer_base_to_tiny', 'fd3d_bevformer_base_to_small', 'fd3d_detr3d_r101_to_r50')
PYTORCH_TRAIN_GB = {'bevformer_tiny:full': 6.5, 'bevformer_small:full': 10.5, 'bevformer_base:full': 28.5}


def set_remat(config, on):
    for model in [config.model] + ([config.expert.model] if 'expert' in config else []):
        model.remat = model.backbone.remat = on


def count(tree):
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def residual_bytes(config, distiller, state, expert_params, batch, rng):
    """{dtype: bytes} of the residuals ``jax.vjp`` keeps for the backward pass of the train step's loss (the
    expert's forward is outside it, as in ``train_step``), from abstract shapes."""
    loss_fn = make_loss_fn(build(config.model), config, distiller)

    def residuals(params, expert_params, batch, rng):
        expert_out = None if distiller is None else expert_forward(distiller, expert_params, batch)
        return jax.vjp(lambda p: loss_fn(p, expert_params, batch, rng, expert_out)[0], params)[1]

    out = {}
    for leaf in jax.tree_util.tree_leaves(jax.eval_shape(residuals, state.params, expert_params, batch, rng)):
        out[str(leaf.dtype)] = out.get(str(leaf.dtype), 0) + int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    return out


def measure(config):
    distiller = make_distiller(config)
    jitted, args = loop.abstract_train_step(config, distiller)
    residuals = residual_bytes(config, distiller, *args)
    c0, t0 = time.process_time(), time.perf_counter()
    compiled = jitted.lower(*args).compile()
    params = args[0].params
    return dict(memory_bytes=benchmark.memory(compiled), compile_s=round(time.perf_counter() - t0, 1),
                compile_cpu_s=round(time.process_time() - c0, 1),
                params=count(params['model']), distill_params=count(params.get('distill', {})),
                expert_params=count(args[1]), batch=int(args[2]['img'].shape[0]),
                queue_length=int(args[2]['img'].shape[1]),
                image_hw=list(args[2]['img'].shape[3:5]), remat=bool(config.model.remat), dtype=config.model.dtype,
                residual_bytes=residuals, residual_gb=round(sum(residuals.values()) / 1e9, 3),
                backbone_remat=bool(config.model.backbone.remat))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='+', default=CONFIGS, help='NAME[:ARG] (ARG default full)')
    parser.add_argument('--remat', choices=('config', 'on', 'off'), default='config')
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--dtypes', nargs='+', choices=('float32', 'bfloat16'), default=None,
                        help="compute precisions to compile each config in (default: the config's)")
    parser.add_argument('--name', default='', help='result name (default bench_memory[_remat_on|off], '
                        'bench_memory_precision with --dtypes)')
    args = parser.parse_args(argv)
    default_name = 'bench_memory_precision' if args.dtypes else 'bench_memory'
    args.name = args.name or default_name + ('' if args.remat == 'config' else f'_remat_{args.remat}')
    rows = []
    for spec in args.configs:
        for dtype in args.dtypes or [None]:
            name, config = benchmark.load_config(spec)
            config = accelerator_form(config)
            if args.remat != 'config':
                set_remat(config, args.remat == 'on')
            if dtype:
                config.model.dtype = dtype
            print(f'compiling {name} ({config.model.dtype}) ...', flush=True)
            try:
                row = dict(config=name, **measure(config))
            except Exception as e:   # noqa: BLE001 (e.g. out of host memory: recorded, the others go on)
                row = dict(config=name, dtype=config.model.dtype, error=f'{type(e).__name__}: {e}'[:500])
            row['peak_gb'] = round(row['memory_bytes']['peak'] / 1e9, 3) if 'memory_bytes' in row else None
            row['pytorch_train_gb'] = PYTORCH_TRAIN_GB.get(name)
            rows.append(row)
            print(f"  {name} ({row['dtype']}): peak {row['peak_gb']} GB, compile {row.get('compile_s')} s", flush=True)
            benchmark.write_result(args.name, dict(remat=args.remat, rows=rows), args.out_dir, echo=False)
    print('| config | dtype | params | peak GB (XLA) | x first | residuals GB | x first | PyTorch GB (nvidia-smi) '
          '| compile s (CPU s) |')
    first = {}
    for r in rows:
        base = first.setdefault(r['config'], r)

        def ratio(key):
            return f'{r[key] / base[key]:.2f}' if r.get(key) and base.get(key) else '-'
        print(f"| {r['config']} | {r['dtype']} | {r.get('params', 0) / 1e6:.2f} M | {r['peak_gb']} | {ratio('peak_gb')} "
              f"| {r.get('residual_gb')} | {ratio('residual_gb')} | {r['pytorch_train_gb'] or '-'} "
              f"| {r.get('compile_s', r.get('error'))} ({r.get('compile_cpu_s')}) |")
    return benchmark.write_result(args.name, dict(remat=args.remat, dtypes=args.dtypes, rows=rows), args.out_dir)


if __name__ == '__main__':
    main()
