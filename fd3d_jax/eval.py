"""Evaluates nuScenes detection results with the devkit's DetectionEval.

    python -m fd3d_jax.eval --results R.json --dataroot D --version V --split S --out O

writes ``O/metrics_summary.json`` (NDS, mAP, TP errors) and prints the table.
"""
import os
import sys

from absl import app, flags

from fd3d_jax import evaluate

flags.DEFINE_string('results', None, 'nuScenes results JSON (global frame)')
flags.DEFINE_string('dataroot', None, 'nuScenes(-format) dataroot')
flags.DEFINE_string('version', None, 'table version, e.g. v1.0-mini')
flags.DEFINE_string('split', None, 'split name, e.g. mini_val')
flags.DEFINE_string('out', None, 'output folder for metrics_summary.json')
FLAGS = flags.FLAGS


def main(argv):
    del argv
    missing = [n for n in ('results', 'dataroot', 'version', 'split', 'out') if not getattr(FLAGS, n)]
    if missing:
        sys.exit('error: missing flags: ' + ', '.join('--' + n for n in missing))
    if not os.path.exists(FLAGS.results):
        sys.exit(f'error: results file not found: {FLAGS.results}')
    try:
        summary = evaluate.run_detection_eval(FLAGS.results, FLAGS.dataroot, FLAGS.version, FLAGS.split, FLAGS.out)
    except (ValueError, AssertionError) as e:
        sys.exit(f'error: {e}')
    print(evaluate.format_metrics(summary))
    print(f"wrote {os.path.join(FLAGS.out, 'metrics_summary.json')}")


if __name__ == '__main__':
    app.run(main)
