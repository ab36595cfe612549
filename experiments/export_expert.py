"""Exports a trained expert's detector params as a small folder that ``config.distill.expert_checkpoint``
takes (the committed demo expert in ``experiments/experts/`` was made with it; ``make expert`` runs the
whole recipe).

    python experiments/export_expert.py --workdir runs/expert40 --out experiments/experts/bevformer_base_demo

Writes ``OUT/params`` (orbax, ``params['model']`` of the latest checkpoint: no optimiser state),
``OUT/config.json`` (the training config: the expert loader checks the model against it) and
``OUT/metrics_summary.json`` (the devkit evaluation of the run, the expert's row in the tables).
"""
import argparse
import json
import os
import shutil
import sys

from fd3d_jax.errors import CheckpointError
from fd3d_jax.params_io import load_params, save_params


def export(workdir, out):
    summary = os.path.join(workdir, 'eval', 'metrics_summary.json')
    config = os.path.join(workdir, 'config.json')
    for path in (config, summary):
        if not os.path.exists(path):
            raise CheckpointError(f'{path} is missing: export a finished training run (train -> eval)')
    params = load_params(workdir)
    os.makedirs(out, exist_ok=True)
    save_params(params, out)
    shutil.copy(config, os.path.join(out, 'config.json'))
    shutil.copy(summary, os.path.join(out, 'metrics_summary.json'))
    with open(summary) as f:
        s = json.load(f)
    return s['nd_score'], s['mean_ap']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', required=True, help='finished fd3d_jax.train run')
    parser.add_argument('--out', required=True, help='output folder')
    args = parser.parse_args()
    try:
        nds, mean_ap = export(args.workdir, args.out)
    except CheckpointError as e:
        sys.exit(f'error: {e}')
    print(f'exported {args.workdir} -> {args.out} (NDS {nds:.4f}, mAP {mean_ap:.4f})')


if __name__ == '__main__':
    main()
