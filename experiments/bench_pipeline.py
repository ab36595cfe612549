"""Is training input-bound? The grain training pipeline's samples/s against the train step's steps/s.

    python experiments/bench_pipeline.py --config configs/bevformer_tiny.py:demo [--workers 0 1 2]
        [--batches 20] [--steps 10] [--loop-steps 20] [--out-dir experiments/results] [--config.key=value ...]

For the config's training split (default ``config.data``: the 10-scene synthetic set of
``make bench-data``):

* ``train_step``: the ``Trainer``'s compiled step (batch ``train.batch_size``, whole temporal queue)
  on batches already in memory: median step time, steps/s and the samples/s it consumes.
* ``pipeline[w]``: the real ``pipeline.train_dataset`` (JPEG decode, photometric distortion when the
  config has it, resize, normalise, queue of frames, can_bus, BEV alignment, GT) with
  ``config.data.num_workers = w`` worker processes (0: the read threads of this process; ``--threads``
  read threads per reading process, default ``data.num_threads``), after
  ``--warmup`` batches, over ``--batches`` batches: samples/s (a sample is one queue of ``T`` frames of
  6 cameras), the ``headroom`` = pipeline samples/s / train-step samples/s (< 1: input-bound when the
  two are measured apart), and a short real training loop (``--loop-steps``; ``next(iterator)`` then the
  asynchronously dispatched step, as ``loop.train_and_evaluate`` does): loop steps/s, the fraction of
  wall time spent in ``next`` and the device idle fraction ``1 - steps x step time / wall``.

The two share the CPU when training runs on it, so the loop figures are the ones that decide.
Writes ``experiments/results/bench_pipeline_<config>[_<tag>].json`` (``experiments.benchmark.write_result``).

Full resolution, the pipeline alone (can one host feed a node of 8 accelerators?):

    python -m fd3d_jax.data.synthetic --out data/synthetic_full --scenes 2 --image-size 1600 900
    python experiments/bench_pipeline.py --config configs/bevformer_base.py:full --steps 0 --loop-steps 0 \
        --workers 1 2 --batch-size 2 --batches 3 --warmup 1 --tag fullres \
        --config.data.dataroot=data/synthetic_full --config.data.version=v1.0-mini \
        --config.data.train_split=mini_train

(``--config.data.device_normalize=True``: the pipeline as it is with the images prepared in the jitted step)
adds ``accelerator_need`` for the configs in ``ORIGINAL_STEP_S``: the samples/s that 8 accelerators consume
at the original's step time (``8 / step_s``), the per-core samples/s (samples/s of the 1-worker run; each
worker is one core), its linear extrapolation to ``--cores`` cores (an extrapolation, not a measurement) and
its ratio to the need (goal >= 2), and the cores a host needs for twice the need.
"""
import argparse
import itertools
import math
import os
import time

import jax

from experiments import benchmark
from fd3d_jax.data import pipeline
from fd3d_jax.distill import uses_expert
from fd3d_jax.distill import build_distillation
from fd3d_jax.train import loop
from fd3d_jax.train import mesh as mesh_lib


# The original's training step time, seconds per iteration at 1 sample per GPU on 8 V100s (BEVFormer's
# published training logs, rounded): what a node of 8 accelerators consumes is 8 / step_s samples/s.
ORIGINAL_STEP_S = {'bevformer_base': 1.3, 'bevformer_tiny': 0.4}
NODE_ACCELERATORS = 8


def accelerator_need(name, rows, cores):
    """The pipeline against what a node of ``NODE_ACCELERATORS`` accelerators needs at the original's step
    time (None for configs without a figure in ``ORIGINAL_STEP_S``). Per-core samples/s = the 1-worker row
    (else the smallest worker count >= 1, divided by it); ``cores``: the host size it is extrapolated to."""
    step_s = ORIGINAL_STEP_S.get(name.split(':')[0])
    timed = [r for r in rows if r['workers'] >= 1]
    if step_s is None or not timed:
        return None
    base = min(timed, key=lambda r: r['workers'])
    per_core = base['samples_per_s'] / base['workers']
    need = NODE_ACCELERATORS / step_s
    return dict(original_step_s=step_s, accelerators=NODE_ACCELERATORS, need_samples_per_s=need,
                per_core_samples_per_s=per_core, per_core_from_workers=base['workers'],
                scaling={r['workers']: r['samples_per_s'] / (r['workers'] * per_core) for r in timed},
                cores=cores, extrapolated_samples_per_s=per_core * cores,
                extrapolated_ratio_to_need=per_core * cores / need,
                cores_for_2x_need=math.ceil(2 * need / per_core),
                note=f'extrapolated linearly from the per-core throughput to {cores} cores, not measured; '
                     f'need = {NODE_ACCELERATORS} / step_s of the original (1 sample per GPU)')


def train_iter(recs, config, batch_size, workers, bev, expert_bev, threads=None):
    """A live iterator of the real training pipeline with ``workers`` worker processes
    (``data.num_workers``) of ``threads`` read threads each (default ``data.num_threads``)."""
    d = config.data.copy_and_resolve_references()
    d.num_workers = workers
    if threads is not None:
        d.num_threads = threads
    return iter(pipeline.train_dataset(recs, d.dataroot, d, batch_size, config.seed, bev=bev,
                                       expert_bev=expert_bev))


def cpu_seconds(pid=None):
    """CPU seconds (user + system) used so far by process ``pid`` (default this one), its threads and its live
    descendant processes (grain workers), from /proc; None where there is no /proc."""
    pid = os.getpid() if pid is None else pid
    tick = os.sysconf('SC_CLK_TCK')
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / tick
        children = []
        for tid in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{tid}/children') as f:
                children += [int(c) for c in f.read().split()]
    except (OSError, ValueError, IndexError):
        return None
    for child in children:
        total += cpu_seconds(child) or 0.0
    return total


def measure_pipeline(it, batch_size, warmup, batches):
    """Samples/s of ``batches`` batches of ``it`` after ``warmup`` untimed ones, and the CPU seconds per sample
    of this process and its workers over the same time (read-ahead of the workers included, so it is a rate,
    not exact per-sample work, over few batches)."""
    for _ in range(warmup):
        next(it)
    times = []
    cpu0 = cpu_seconds()
    t_all = time.perf_counter()
    for _ in range(batches):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    cpu1 = cpu_seconds()
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return dict(batch=benchmark.summarize_times(times), samples_per_s=batches * batch_size / wall,
                cpu_s_per_sample=None if cpu is None else cpu / (batches * batch_size),
                cores_busy=None if cpu is None else cpu / wall)


def measure_loop(trainer, it, steps, step_s):
    """A real training loop on a live iterator: next() then the (asynchronous) step."""
    wait = 0.0
    t_all = time.perf_counter()
    metrics = None
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        metrics = trainer.step(batch)
    jax.block_until_ready((metrics, trainer.state))
    wall = time.perf_counter() - t_all
    return dict(steps=steps, wall_s=round(wall, 3), steps_per_s=steps / wall, wait_s=round(wait, 3),
                wait_fraction=wait / wall, device_idle_fraction=max(0.0, 1.0 - steps * step_s / wall))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2],
                        help='worker processes to try (data.num_workers; 0: threads of this process)')
    parser.add_argument('--threads', type=int, default=None,
                        help='read threads per reading process (data.num_threads; default: the config\'s)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed batches / steps first')
    parser.add_argument('--batches', type=int, default=20, help='timed pipeline batches per worker count')
    parser.add_argument('--steps', type=int, default=10, 
                        help='timed train steps on in-memory batches (0: pipeline only)')
    parser.add_argument('--loop-steps', type=int, default=20, help='real-loop steps per worker count (0: none)')
    parser.add_argument('--batch-size', type=int, default=0,
                        help='pipeline batch per process (0: train.batch_size over the mesh)')
    parser.add_argument('--cores', type=int, default=16, help='host size the per-core figure is extrapolated to')
    parser.add_argument('--tag', default='', help='suffix of the result name')
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    args, config, name = benchmark.parse_config_args(parser, argv, 'configs/bevformer_tiny.py:demo')
    load_avg = os.getloadavg()[0]
    print(f'{name}: device {jax.devices()[0].device_kind} ({jax.default_backend()}), load average {load_avg:.2f}',
          flush=True)

    d = config.data
    recs = loop.load_split(config, d.train_split)
    b = args.batch_size or mesh_lib.process_batch_size(config.train.batch_size, mesh_lib.make_mesh())
    bev = pipeline.bev_config(config.model)
    expert_bev = pipeline.bev_config(config.expert.model) if uses_expert(config) else None

    train_step, needed, trainer, step_s = None, None, None, None
    if args.steps:  # the train step on batches already in memory (read with the config's thread count)
        distiller, expert_params = build_distillation(config)
        trainer = loop.Trainer(config, len(recs['samples']), distiller=distiller, expert_params=expert_params)
        it = train_iter(recs, config, b, pipeline.num_workers(d), bev, expert_bev)
        cycle = itertools.cycle([next(it) for _ in range(min(4, args.steps + args.warmup + 1))])
        it.close()
        t0 = time.perf_counter()
        jax.block_until_ready(trainer.step(next(cycle)))
        compile_s = time.perf_counter() - t0
        step = benchmark.time_call(lambda: trainer.step(next(cycle)), warmup=args.warmup, iters=args.steps)
        step_s = step['median_ms'] / 1e3
        needed = b / step_s
        t, n = d.queue_length, config.model.num_cams
        train_step = dict(compile_s=round(compile_s, 2), step=step, steps_per_s=1 / step_s,
                          samples_per_s_needed=needed, frames_per_s=needed * t, images_per_s=needed * t * n)
        print(f'train step: {step["median_ms"]:.1f} ms median ({1 / step_s:.2f} steps/s, consumes {needed:.2f} '
              f'samples/s); first step (compile) {compile_s:.1f} s', flush=True)

    rows = []
    for w in args.workers:
        it = train_iter(recs, config, b, w, bev, expert_bev, args.threads)
        row = dict(workers=w, threads=args.threads if args.threads is not None else d.num_threads,
                   **measure_pipeline(it, b, args.warmup, args.batches))
        row['images_per_s'] = row['samples_per_s'] * d.queue_length * config.model.num_cams
        msg = f'workers {w}: pipeline {row["samples_per_s"]:.2f} samples/s'
        if train_step:
            row['headroom'] = row['samples_per_s'] / needed
            row['input_bound'] = row['headroom'] < 1
            msg += f', headroom x{row["headroom"]:.2f}' + (' (input-bound)' if row['input_bound'] else '')
        if train_step and args.loop_steps:
            lp = row['loop'] = measure_loop(trainer, it, args.loop_steps, step_s)
            msg += (f'; loop {lp["steps_per_s"]:.2f} steps/s, waiting for data {100 * lp["wait_fraction"]:.0f} %, '
                    f'device idle {100 * lp["device_idle_fraction"]:.0f} %')
        it.close()
        rows.append(row)
        print(msg, flush=True)

    fine = [r['workers'] for r in rows if r.get('input_bound') is False]
    need = accelerator_need(name, rows, args.cores)
    if need:
        print(f"per core {need['per_core_samples_per_s']:.3f} samples/s; {need['accelerators']} accelerators at "
              f"{need['original_step_s']} s/step need {need['need_samples_per_s']:.2f} samples/s; {args.cores} cores "
              f"(extrapolated) x{need['extrapolated_ratio_to_need']:.2f} of the need; "
              f"{need['cores_for_2x_need']} cores for 2x", flush=True)
    result = dict(
        config=name, dataroot=d.dataroot, split=d.train_split, num_samples=len(recs['samples']), batch_size=b,
        queue_length=d.queue_length, cameras=config.model.num_cams, image_hw=pipeline.output_image_hw(recs, d),
        photometric=bool(d.get('photometric', False)), load_avg_1m=load_avg, train_step=train_step,
        pipeline=rows, accelerator_need=need,
        min_workers_not_input_bound=min(fine) if fine else None,
        device_normalize=bool(d.get('device_normalize', False)),
        notes=('workers = config.data.num_workers (grain worker processes, each with `threads` read threads; 0: '
               'the threads of this process); a sample is one training queue of queue_length frames x cameras '
               'images; headroom = pipeline samples/s / samples/s the train step consumes, measured apart (<1: input-bound); loop = the '
               'real loop with both sharing the machine'))
    slug = name.replace(':', '_') + (f'_{args.tag}' if args.tag else '')
    benchmark.write_result(f'bench_pipeline_{slug}', result, args.out_dir)
    return result


if __name__ == '__main__':
    main()
