"""The loss fingerprint: every logged value of 3 training steps of every method, bit for bit.

    python experiments/loss_fingerprint.py --out FILE.json [--devices N] [--compare OTHER.json]

A refactor that leaves the fingerprint bit-identical leaves every earlier result valid. For each detector config
at ``:toy`` (``bevformer_tiny``, ``detr3d_r50``) and each distillation method of the two toy pairs
(``fd3d_bevformer_base_to_tiny``: none, fitnet, mgd, heatmap, fd3d; ``fd3d_detr3d_r101_to_r50``: none, fitnet,
mgd, fd3d), a ``Trainer`` from the config's seed (a random expert from a fixed seed, as ``bench_train_step``)
runs 3 steps on one dummy batch with GT (no data set needed) on a mesh of ``--devices`` devices (default 1) with a
global batch of that many samples and ``train.log_every = 1`` (the diagnostics are computed on logged steps only);
every metric of every step is written as ``float.hex``. ``--compare`` prints
the keys whose values differ from another fingerprint file (exit 1 if any).
"""
import argparse
import json
import sys

import jax
import numpy as np

from experiments import benchmark
from experiments.bench_train_step import make_expert, with_gt
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.train import loop, mesh as mesh_lib

CASES = [('bevformer_tiny:toy', None), ('detr3d_r50:toy', None)] + [
    ('fd3d_bevformer_base_to_tiny:toy', method) for method in ('none', 'fitnet', 'mgd', 'heatmap', 'fd3d')] + [
    ('fd3d_detr3d_r101_to_r50:toy', method) for method in ('none', 'fitnet', 'mgd', 'fd3d')]
STEPS = 3


def fingerprint(spec, method, num_devices):
    """[{metric: float.hex(value)} per step] of ``spec`` (with ``distill.method = method``)."""
    _, config = benchmark.load_config(spec)
    config.train.batch_size = num_devices
    config.train.log_every = 1   # every step a logged one: the gradient-norm diagnostics computed on each
    mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
    distiller = expert_params = expert_model = None
    if method is not None:
        config.distill.method = method
        if method != 'none':
            distiller, expert_params = make_expert(config)
            expert_model = distiller.expert_cfg
    batch = with_gt(dummy_batch(config, num_devices, expert_model=expert_model), config)
    if distiller is None:
        batch = {k: v for k, v in batch.items() if not k.startswith('expert_')}
    trainer = loop.Trainer(config, 16, mesh, distiller=distiller, expert_params=expert_params)
    sharded = mesh_lib.shard_batch(batch, mesh)
    steps = [jax.device_get(trainer.step(sharded)) for _ in range(STEPS)]
    return [{k: float(np.asarray(v, np.float64)).hex() for k, v in sorted(step.items())} for step in steps]


def differences(ours, theirs):
    """'case step key: a != b' lines."""
    lines = []
    for case in sorted(set(ours) | set(theirs)):
        if case not in ours or case not in theirs:
            lines.append(f'{case}: only in one file')
            continue
        for step, (mine, other) in enumerate(zip(ours[case], theirs[case])):
            for key in sorted(set(mine) | set(other)):
                a, b = mine.get(key), other.get(key)
                if a != b:
                    show = lambda h: 'missing' if h is None else repr(float.fromhex(h))  # noqa: E731
                    lines.append(f'{case} step {step} {key}: {show(a)} != {show(b)}')
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True)
    parser.add_argument('--devices', type=int, default=1)
    parser.add_argument('--compare', default='')
    parser.add_argument('--cases', nargs='*', default=None, help='SPEC or SPEC/METHOD (default: all)')
    args = parser.parse_args(argv)
    result = {}
    for spec, method in CASES:
        name = spec if method is None else f'{spec}/{method}'
        if args.cases and name not in args.cases:
            continue
        result[name] = fingerprint(spec, method, args.devices)
        print(f'{name}: loss {[float.fromhex(s["loss"]) for s in result[name]]}', flush=True)
    with open(args.out, 'w') as out_file:
        json.dump(dict(devices=args.devices, commit=benchmark.git_commit(), cases=result), out_file, indent=1)
    if args.compare:
        with open(args.compare) as other_file:
            lines = differences(result, json.load(other_file)['cases'])
        print('\n'.join(lines) if lines else f'bit-identical to {args.compare}')
        return 1 if lines else 0
    return 0


if __name__ == '__main__':
    sys.exit(main())
