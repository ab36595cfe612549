"""Inference frames/s with the mmdet3d ``tools/analysis_tools/benchmark.py`` protocol.

    python experiments/bench_inference.py --config configs/bevformer_tiny.py:demo [--frames 50] [--warmup 5]
        [--workdir W] [--inputs auto|data|dummy] [--out-dir experiments/results] [--config.key=value ...]

Batch 1 (one 6-camera sample), the ``Trainer``'s compiled ``eval_step`` (last-layer top-k decoding
included); one untimed compiling call, then ``--warmup`` frames skipped and ``--frames`` frames timed,
each from the host batch to ``jax.block_until_ready`` of the outputs (host-to-device copy included,
as mmdet3d's scatter is; data loading excluded: the batches are read into memory beforehand and their
loading is timed apart). BEVFormer carries its previous BEV from frame to frame as in video_test_mode
(``loop.predict``). FPS = frames / total time (mmdet3d's figure, ``fps_mean``) and 1 / median latency.

Inputs (``--inputs auto``): the validation split of ``config.data`` (scenes in order, wrapping round
when more frames are asked for than it has) when its images have the config's ``data.raw_image_wh``;
otherwise (e.g. the ``:full`` configs, 1600x900, without nuScenes) ``models.inputs.dummy_batch`` at the
config's full size (random images, the synthetic rig's cameras), reported as such. Params: random
initialisation, or ``--workdir`` (a training workdir or params folder: ``params['model']``).
The JSON puts the published GPU figures of the same model family beside ours, labelled as published.
Writes ``experiments/results/bench_inference_<config>.json`` (``experiments.benchmark.write_result``).
"""
import argparse
import itertools
import os
import time

import jax
import numpy as np

from experiments import benchmark
from fd3d_jax.data import pipeline, records
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.train import loop
from fd3d_jax.train import mesh as mesh_lib

_DERRY = ('DerryHub/BEVFormer_tensorrt README (PyTorch, fp32)', 'RTX 3090')
_FD3D = ('FD3D README table (OpenDriveLab FocalDistiller.md)', 'GPU not stated')
# Published batch-1 FPS (6-camera samples/s); ``config`` is our config of the same model.
PUBLISHED = {
    'bevformer_tiny': [dict(fps=15.9, source=_DERRY[0], hardware=_DERRY[1], config='bevformer_tiny:full'),
                       dict(fps=7.3, source=_FD3D[0], hardware=_FD3D[1], config='bevformer_tiny:fd3d')],
    'bevformer_small': [dict(fps=5.1, source=_DERRY[0], hardware=_DERRY[1], config='bevformer_small:full'),
                        dict(fps=5.9, source=_FD3D[0], hardware=_FD3D[1], config='bevformer_small:fd3d')],
    'bevformer_base': [dict(fps=2.4, source=_DERRY[0], hardware=_DERRY[1], config='bevformer_base:full'),
                       dict(fps=1.8, source=_FD3D[0], hardware=_FD3D[1], config='bevformer_base:full')],
    'detr3d_r101': [dict(fps=2.5, source=_FD3D[0], hardware=_FD3D[1], config='detr3d_r101:full'),
                    dict(fps=2.0, source="BEVDet paper Table 2", hardware="GPU", config="detr3d_r101:full")],
    'detr3d_r50': [dict(fps=4.0, source=_FD3D[0], hardware=_FD3D[1], config='detr3d_r50:full')],
}
PROTOCOL = ('mmdet3d benchmark.py: batch 1, warm-up frames skipped, FPS = frames / total time; each frame '
            'timed from the host batch to block_until_ready (host-to-device copy included, loading excluded)')
PUBLISHED_NOTE = ('PUBLISHED figures (PyTorch, other hardware, full-size models): not measured here, '
                  'not comparable to a CPU run or to :toy/:demo configs')


def data_batches(config, n):
    """``n`` eval batches (batch 1) of the validation split, scenes in order (wrapping round), or None
    when the split is missing or its images are not ``data.raw_image_wh``; (batches, info)."""
    d = config.data
    try:
        recs = loop.load_split(config, d.val_split)
    except (records.RecordsError, OSError) as e:
        return None, dict(reason=f'no validation split: {e}')
    cam = recs['samples'][0]['cams'][0]
    if (cam['width'], cam['height']) != tuple(d.raw_image_wh):
        return None, dict(reason=f"images of {d.dataroot} are {cam['width']}x{cam['height']}, the config's "
                                 f'data.raw_image_wh is {tuple(d.raw_image_wh)}')
    ds = pipeline.eval_dataset(recs, d.dataroot, d, 1, bev=pipeline.bev_config(config.model))
    k = min(n, len(recs['samples']))
    t0 = time.perf_counter()
    batches = list(itertools.islice(ds, k))
    load_s = time.perf_counter() - t0
    return list(itertools.islice(itertools.cycle(batches), n)), dict(
        dataroot=d.dataroot, split=d.val_split, num_samples=len(recs['samples']), loaded=k,
        load_s=round(load_s, 3), load_samples_per_s=k / load_s)


def dummy_inputs(config, n, why):
    """``n`` references to one ``models.inputs.dummy_batch`` (batch 1, one frame, a previous BEV marked present) at
    the config's full size, and the ``inputs`` record saying so (``why``: the reason no data was used)."""
    batch = dummy_batch(config, 1, queue_length=1)
    batch['prev_bev_exists'][:] = True
    return [batch] * n, dict(kind='dummy_batch', why=why,
                             note='random images at the config size, synthetic rig cameras, identity BEV alignment')


def time_frames(trainer, params, batches, warmup):
    """The protocol on ``trainer.eval_step``: one untimed compiling call, then ``batches`` in order, each frame
    timed from the host batch to ``block_until_ready`` and the previous frame's BEV carried; the first ``warmup``
    frames are not counted. Returns compile seconds, latency (``summarize_times`` + p90), ``fps_mean`` (frames /
    total time, mmdet3d's figure), ``fps_median`` and the number of timed frames."""
    prev0 = mesh_lib.shard_batch(np.zeros(trainer.model.carried_shape(1), np.float32), trainer.mesh)

    def frame(batch, prev):
        return jax.block_until_ready(trainer.eval_step(params, mesh_lib.shard_batch(batch, trainer.mesh), prev))

    t0 = time.perf_counter()
    frame(batches[0], prev0)
    compile_s = time.perf_counter() - t0
    prev, times = prev0, []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        out = frame(batch, prev)
        dt = time.perf_counter() - t0
        prev = out['bev']
        if i >= warmup:
            times.append(dt)
    latency = benchmark.summarize_times(times)
    latency['p90_ms'] = round(float(np.percentile(1e3 * np.asarray(times), 90)), 3)
    fps_mean, fps_median = len(times) / sum(times), 1e3 / latency['median_ms']
    print(f'{fps_mean:.2f} FPS (mean over {len(times)} frames), {fps_median:.2f} FPS at the median latency '
          f'{latency["median_ms"]:.1f} ms; first call (compile) {compile_s:.1f} s', flush=True)
    return dict(compile_s=compile_s, latency=latency, fps_mean=fps_mean, fps_median=fps_median, frames=len(times))


def published_entries(name):
    """``PUBLISHED`` figures of the model family of config ``name`` (``NAME:ARG``), each with ``same_config``."""
    return [dict(e, same_config=e['config'] == name) for e in PUBLISHED.get(name.split(':')[0], [])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--frames', type=int, default=50, help='timed frames (samples)')
    parser.add_argument('--warmup', type=int, default=5, help='frames skipped before timing')
    parser.add_argument('--workdir', default='', help='training workdir / params folder (default: random init)')
    parser.add_argument('--inputs', choices=('auto', 'data', 'dummy'), default='auto')
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    args, config, name = benchmark.parse_config_args(parser, argv, 'configs/bevformer_tiny.py:demo')
    device = jax.devices()[0]
    load_avg = os.getloadavg()[0]
    print(f'{name}: device {device.device_kind} ({jax.default_backend()}), load average {load_avg:.2f}', flush=True)

    n = args.warmup + args.frames
    batches, inputs = (None, dict(reason='--inputs dummy')) if args.inputs == 'dummy' else data_batches(config, n)
    if batches is None:
        if args.inputs == 'data':
            raise SystemExit(f'error: {inputs["reason"]}')
        batches, inputs = dummy_inputs(config, n, inputs['reason'])
    else:
        inputs = dict(kind='data', **inputs)
    print(f'inputs: {inputs}', flush=True)

    trainer = loop.Trainer(config, num_train_samples=1)
    params = loop.restore_model_params(trainer, args.workdir) if args.workdir else trainer.state.params['model']
    timed = time_frames(trainer, params, batches, args.warmup)
    result = dict(
        config=name, device_kind=device.device_kind, backend=jax.default_backend(), batch_size=1,
        image_hw=list(batches[0]['img'].shape[-3:-1]), queue_length=1, params=args.workdir or 'random init',
        inputs=inputs, warmup=args.warmup, frames=timed['frames'], compile_s=round(timed['compile_s'], 2),
        latency=timed['latency'], fps_mean=timed['fps_mean'], fps_median=timed['fps_median'], load_avg_1m=load_avg,
        protocol=PROTOCOL,
        published=dict(note=PUBLISHED_NOTE, entries=published_entries(name)))
    benchmark.write_result(f'bench_inference_{name.replace(":", "_")}', result, args.out_dir)
    return result


if __name__ == '__main__':
    main()
