"""Distillation overhead, compile time and retraces of the FD3D train step.

    python experiments/bench_train_step.py [--config configs/fd3d_bevformer_base_to_tiny.py:demo]
        [--dataroot data/synthetic] [--steps 100] [--iters 10] [--expert-checkpoint E]
    python experiments/bench_train_step.py --config configs/fd3d_bevformer_base_to_tiny.py:full --compile-only

Times in one run, interleaved (``benchmark.interleaved``), on one fixed batch: (a) the apprentice-alone
train step (the config with ``distill.method='none'``: a ``Trainer`` without distiller), (b) the expert's
forward alone (jit of its inference-mode apply on ``distiller.expert_batch(batch)``, as inside the FD3D
step), (c) the FD3D train step (``Trainer`` with distiller and expert). Reports medians and spread, the
overhead ``c / (a + b)`` (goal <= 1.10: the distillation terms nearly free) and ``c / a``; the trace,
lower and compile wall seconds of each (AOT ``trace().lower().compile()``, which the jitted call then
reuses) and their CPU seconds (on a busy machine the wall figures mostly measure waiting);
and how often the FD3D step's Python function was traced over the whole run plus ``--steps`` further
steps (goal: once), on real batches of the data pipeline with ``--dataroot``, otherwise on dummy
batches. Batches: ``dummy_batch`` (random images) with random GT boxes so that the losses are real. The
expert is random unless ``--expert-checkpoint`` (timing does not depend on its weights).
``--compile-only``: compile (a) and (c) from abstract shapes (``loop.abstract_train_step``, nothing
initialised or run) and report seconds and XLA's peak bytes, for full-size configs.
"""
import argparse
import functools
import time

import jax
import numpy as np

from experiments import benchmark
from fd3d_jax.data import pipeline
from fd3d_jax.distill import build_distillation, make_distiller
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.train import loop
from fd3d_jax.train import mesh as mesh_lib
from fd3d_jax.train.state import init_params, step_rng
from fd3d_jax.train.train_step import expert_forward


def with_gt(batch, config, num=10, seed=0):
    """``batch`` with ``num`` random GT boxes per sample (inside the point-cloud range, random classes)."""
    rng = np.random.default_rng(seed)
    b, n = batch['gt_boxes'].shape[0], min(num, batch['gt_boxes'].shape[1])
    lo, hi = np.asarray(config.data.point_cloud_range[:3]), np.asarray(config.data.point_cloud_range[3:])
    boxes = np.concatenate([rng.uniform(0.8 * lo, 0.8 * hi, (b, n, 3)), rng.uniform(0.5, 4.0, (b, n, 3)),
                            rng.uniform(-np.pi, np.pi, (b, n, 1)), rng.normal(0, 2, (b, n, 2))], -1)
    batch = dict(batch)
    batch['gt_boxes'] = batch['gt_boxes'].copy()
    batch['gt_boxes'][:, :n] = boxes
    batch['gt_labels'] = batch['gt_labels'].copy()
    batch['gt_labels'][:, :n] = rng.integers(0, len(config.data.class_names), (b, n))
    batch['gt_mask'] = batch['gt_mask'].copy()
    batch['gt_mask'][:, :n] = True
    return batch


def make_expert(config):
    """(distiller, expert params): ``build_distillation`` with ``distill.expert_checkpoint``, else random."""
    if config.distill.expert_checkpoint:
        return build_distillation(config)
    distiller = make_distiller(config)
    batch = dummy_batch(config, 1, queue_length=1, raw_wh=loop.INIT_IMAGE_WH, expert_model=distiller.expert_cfg)
    return distiller, init_params(distiller.expert, distiller.expert_batch(batch), config.seed + 3)


def apprentice_config(config):
    config = config.copy_and_resolve_references()
    config.distill.method = 'none'
    return config


def aot_compile(jitted, *args):
    """Wall seconds of trace, lower and compile of ``jitted(*args)`` (the jitted call then reuses the
    executable) and ``cpu``: this process's CPU seconds for all three (robust to a busy machine)."""
    c0, t0 = time.process_time(), time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    seconds = dict(trace=round(t1 - t0, 2), lower=round(t2 - t1, 2), compile=round(t3 - t2, 2),
                   total=round(t3 - t0, 2), cpu=round(time.process_time() - c0, 2))
    return compiled, seconds


def compile_only(config):
    out = {}
    for name, cfg, distiller in (('apprentice', apprentice_config(config), None), ('fd3d', config, make_distiller(config))):
        jitted, step_args = loop.abstract_train_step(cfg, distiller)
        compiled, seconds = aot_compile(jitted, *step_args)
        out[name] = dict(compile_s=seconds, memory_bytes=benchmark.memory(compiled))
        print(f'{name}: {seconds}', flush=True)
    return out


def counting(fn):
    """``fn`` with ``.traces``: how often it ran in Python (= traced by ``jax.jit``)."""
    def wrapped(*a):
        wrapped.traces += 1
        return fn(*a)
    wrapped.traces = 0
    return wrapped


def stepper(trainer, batch, rng):
    """Zero-argument callable running one train step of ``trainer`` on a fixed batch (state threaded)."""
    def run():
        state, metrics = trainer.train_step(trainer.state, trainer.expert_params, batch, rng)
        trainer.state = jax.block_until_ready(state)   # (the setter reads the step)
        jax.block_until_ready(metrics)
        return metrics
    return run


def real_batches(config, dataroot, batch_size, expert_model=None):
    """The training pipeline's batches of ``dataroot``; with ``expert_model``, also that expert's BEV inputs."""
    config.data.dataroot, config.data.records_dir = dataroot, ''
    recs = loop.load_split(config, config.data.train_split)
    ds = pipeline.train_dataset(recs, dataroot, config.data, batch_size, config.seed,
                                bev=pipeline.bev_config(config.model),
                                expert_bev=None if expert_model is None else pipeline.bev_config(expert_model))
    return iter(ds)


def run(config, args):
    mesh = mesh_lib.make_mesh()
    batch_size = args.batch_size or config.train.batch_size
    distiller, expert_params = make_expert(config)
    expert_model = distiller.expert_cfg   # its BEV grid may differ from the apprentice's: expert_bev_* inputs
    data = real_batches(config, args.dataroot, batch_size, expert_model) if args.dataroot else None
    host_batch = next(data) if data else with_gt(dummy_batch(config, batch_size, expert_model=expert_model), config)
    if not data:
        print('warning: no --dataroot: timing on a dummy batch (random images, random GT)', flush=True)
    alone = loop.Trainer(apprentice_config(config), 1, mesh)
    fd3d = loop.Trainer(config, 1, mesh, distiller=distiller, expert_params=expert_params)
    traced = {}
    for name, trainer in (('apprentice', alone), ('fd3d', fd3d)):   # re-jit the same step, counting traces
        traced[name] = counting(trainer.train_step.__wrapped__)
        trainer.train_step = loop.compile_train_step(traced[name], mesh)
    batch = mesh_lib.shard_batch(host_batch, mesh)
    app_batch = {k: v for k, v in batch.items() if not k.startswith('expert_')}
    rng = step_rng(fd3d.state.rng, 0)
    expert = jax.jit(functools.partial(expert_forward, distiller))   # as inside the FD3D step

    compile_s = {}
    _, compile_s['apprentice'] = aot_compile(alone.train_step, alone.state, None, app_batch, rng)
    _, compile_s['expert_forward'] = aot_compile(expert, fd3d.expert_params, batch)
    _, compile_s['fd3d'] = aot_compile(fd3d.train_step, fd3d.state, fd3d.expert_params, batch, rng)
    print(f'compile seconds: {compile_s}', flush=True)
    fns = {'apprentice': stepper(alone, app_batch, rng),
           'expert_forward': lambda: jax.block_until_ready(expert(fd3d.expert_params, batch)),
           'fd3d': stepper(fd3d, batch, rng)}
    times = benchmark.interleaved(fns, warmup=args.warmup, iters=args.iters)
    a, b, c = (times[k]['median_ms'] for k in ('apprentice', 'expert_forward', 'fd3d'))
    print(f'median ms: apprentice {a}, expert forward {b}, fd3d {c}; c/(a+b) {c / (a + b):.3f}', flush=True)
    losses = {k: float(v) for k, v in fns['fd3d']().items() if k.startswith('loss')}

    t0, step_s = time.perf_counter(), []
    for i in range(args.steps):   # the training loop's own path: host batch -> shard -> Trainer.step
        host = next(data) if data else with_gt(dummy_batch(config, batch_size, seed=i + 1, expert_model=expert_model),
                                                config, 1 + i % 10, i + 1)
        t = time.perf_counter()
        jax.block_until_ready(fd3d.step(host))
        step_s.append(time.perf_counter() - t)
    retrace = dict(steps=args.steps, real_data=bool(data), traces=traced['fd3d'].traces,
                   apprentice_traces=traced['apprentice'].traces, cache_entries=fd3d.train_step._cache_size(),
                   seconds=round(time.perf_counter() - t0, 2),
                   step_times=benchmark.summarize_times(step_s) if step_s else None)
    return dict(times=times, ratio_fd3d_over_apprentice_plus_expert=round(c / (a + b), 4),
                ratio_fd3d_over_apprentice=round(c / a, 4), goal_ratio=1.10, compile_s=compile_s,
                retrace=retrace, losses=losses, batch_size=batch_size, timed_batch='real' if data else 'dummy')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/fd3d_bevformer_base_to_tiny.py:demo', help='pair config[:arg]')
    parser.add_argument('--dataroot', default='', help='real batches from this nuScenes-format set')
    parser.add_argument('--expert-checkpoint', default='', help='config.distill.expert_checkpoint (default: random)')
    parser.add_argument('--batch-size', type=int, default=0, help='global batch (default: config.train.batch_size)')
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--steps', type=int, default=100, help='FD3D steps of the retrace check')
    parser.add_argument('--compile-only', action='store_true', help='compile (a) and (c) from shapes, no run')
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--name', default='', help='result name (default bench_train_step[_compile]_CONFIG_ARG)')
    args = parser.parse_args(argv)
    _, config = benchmark.load_config(args.config)
    if 'distill' not in config or config.distill.method == 'none':
        raise SystemExit(f'error: {args.config} is not a distillation pair config')
    config.distill.expert_checkpoint = args.expert_checkpoint or config.distill.expert_checkpoint
    result = compile_only(config) if args.compile_only else run(config, args)
    slug = benchmark.config_slug(args.config)
    name = args.name or f"bench_train_step{'_compile' if args.compile_only else ''}_{slug}"
    path = benchmark.write_result(name, dict(config=args.config, distill_method=config.distill.method, **result),
                                  args.out_dir)
    return path


if __name__ == '__main__':
    main()
