"""Dense vs sparse spatial cross-attention (``model.sca_max_cameras``) in the BEVFormer train step.

    python experiments/bench_sca.py [--configs bevformer_tiny:demo ...] [--slots 2] [--time bevformer_tiny:demo]
        [--iters 5] [--warmup 1]

For each config and each of ``sca_max_cameras`` = 0 (dense: all six cameras per BEV query) and ``--slots`` K, at
``--batch-size`` (default one sample per device, whatever the config's ``train.batch_size``):
the train step compiled from abstract shapes (``loop.abstract_train_step``: nothing initialised), its compile
seconds and XLA's peak bytes (``memory_analysis``). For the configs in ``--time`` also the step time: both steps
on one dummy batch with random GT (``bench_train_step.with_gt``), interleaved (``benchmark.interleaved``), and
their ratio. On the nuScenes rig no BEV query hits more than two cameras (``sca_camera_hits.py``), so K = 2
gives the dense numbers.
"""
import argparse

import jax

from experiments import benchmark
from experiments.bench_train_step import aot_compile, stepper, with_gt
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.train import loop
from fd3d_jax.train import mesh as mesh_lib
from fd3d_jax.train.state import step_rng

CONFIGS = ('bevformer_tiny:demo', 'bevformer_tiny:full', 'bevformer_base:full')


def with_model_key(config, key, value, batch_size):
    """A copy of ``config`` with ``config.model.<key> = value`` and ``train.batch_size = batch_size``."""
    config = config.copy_and_resolve_references()
    config.model[key] = value
    config.train.batch_size = batch_size
    return config


def compare_variants(config, key, variants, timed, batch_size, iters, warmup, trainers=None, inspect=None):
    """The train step of ``config`` for each ``{variant: value of config.model.<key>}``: compile seconds and XLA's
    peak bytes (from abstract shapes unless ``timed``), and with ``timed`` the step times on one dummy batch with
    random GT, interleaved, and each variant's median over the first's (``over_first``).
    ``trainers``: ``{variant: loop.Trainer}`` already built for ``with_model_key(config, key, value, batch_size)``
    (timed only; e.g. one whose eval step was timed first: its init is not paid twice); the others are built here.
    ``inspect(variant, compiled, trainer)`` (trainer None when not timed): a dict added to the variant's entry."""
    entry = {}
    if timed:   # concrete trainers: their compiles give the memory too
        mesh = mesh_lib.make_mesh()
        trainers = {v: (trainers or {}).get(v) or loop.Trainer(with_model_key(config, key, value, batch_size), 1, mesh)
                    for v, value in variants.items()}
        batch = mesh_lib.shard_batch(with_gt(dummy_batch(config, batch_size), config), mesh)
        rng = step_rng(next(iter(trainers.values())).state.rng, 0)
    for variant, value in variants.items():
        if timed:
            trainer = trainers[variant]
            compiled, seconds = aot_compile(trainer.train_step, trainer.state, None, batch, rng)
        else:
            jitted, step_args = loop.abstract_train_step(with_model_key(config, key, value, batch_size),
                                                         batch_size=batch_size)
            compiled, seconds = aot_compile(jitted, *step_args)
        entry[variant] = dict(compile_s=seconds, memory_bytes=benchmark.memory(compiled))
        if inspect is not None:
            entry[variant].update(inspect(variant, compiled, trainers[variant] if timed else None))
        print(f"  {variant}: compile {seconds['total']} s, peak {entry[variant]['memory_bytes']['peak'] / 2**30:.2f} GiB",
              flush=True)
    if timed:
        times = entry['times'] = benchmark.interleaved({v: stepper(t, batch, rng) for v, t in trainers.items()},
                                                       warmup=warmup, iters=iters, progress=True)
        first = times[next(iter(variants))]['median_ms']
        entry['over_first'] = {v: round(times[v]['median_ms'] / first, 3) for v in variants}
        print('  median ms ' + ', '.join(f"{v} {times[v]['median_ms']}" for v in variants), flush=True)
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='*', default=list(CONFIGS), help='NAME:ARG of BEVFormer configs')
    parser.add_argument('--slots', type=int, default=2, help='sca_max_cameras of the sparse step')
    parser.add_argument('--time', nargs='*', default=['bevformer_tiny:demo'], help='configs whose steps are timed')
    parser.add_argument('--batch-size', type=int, default=0, help='global batch (default: one per device)')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--name', default='bench_sca')
    args = parser.parse_args(argv)
    variants = {'dense': 0, f'sparse_{args.slots}': args.slots}
    batch_size = args.batch_size or jax.device_count()
    result = {}
    for spec in args.configs:
        name, config = benchmark.load_config(spec)
        print(name, flush=True)
        timed = spec in args.time or name in args.time
        entry = result[name] = compare_variants(config, 'sca_max_cameras', variants, timed, batch_size, args.iters,
                                                args.warmup)
        if timed:
            times, sparse = entry['times'], f'sparse_{args.slots}'
            entry['dense_over_sparse'] = round(times['dense']['median_ms'] / times[sparse]['median_ms'], 3)
            print(f"  dense / sparse {entry['dense_over_sparse']}", flush=True)
    return benchmark.write_result(args.name, dict(slots=args.slots, batch_size=batch_size, backend=jax.default_backend(),
                                                  configs=result),
                                  args.out_dir)


if __name__ == '__main__':
    main()
