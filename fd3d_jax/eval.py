"""Evaluates with the devkit's DetectionEval, either a training run's checkpoint or a results file.

    python -m fd3d_jax.eval --workdir W [--step N] [--config.k=v]
        evaluates the latest (or step N) checkpoint of W with W's own config (``W/config.json``, the overrides on
        top) on ``config.data.val_split`` and writes ``W/eval/metrics_summary.json`` (``W/eval/step_N/`` with
        --step); ``--config configs/NAME.py[:ARG]`` instead of W's config must name the same model and data;
    python -m fd3d_jax.eval [--config PAIR.py[:ARG]] --expert --workdir W [--config.k=v]
        evaluates the pair's expert on the apprentice's val images as the distiller feeds them (upsampled,
        renormalised) and writes ``W/eval/expert/metrics_summary.json`` (the apprentice's results stay);
    python -m fd3d_jax.eval --results R.json --dataroot D --version V --split S --out O
        evaluates a nuScenes results JSON and writes ``O/metrics_summary.json``.

W, R and O may be URLs (``gs://bucket/run``; ``fd3d_jax.storage``): the devkit reads and writes local files, so it
evaluates in a local temporary folder whose files are then copied to ``W/eval`` or ``O``. D stays local.
"""
import contextlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fd3d_jax import nuscenes_metrics, storage
from fd3d_jax.cli import exit_on, parse_flags
from fd3d_jax.train.loop import evaluate_checkpoint, evaluate_expert
from fd3d_jax.train.workdir import default_config_argv
from fd3d_jax.validate import validate

config_flags.DEFINE_config_file('config', None, 'config file (checkpoint mode)')
flags.DEFINE_string('workdir', None, 'training folder with checkpoints/ (checkpoint mode)')
flags.DEFINE_integer('step', None, 'checkpoint step (default: latest)')
flags.DEFINE_bool('expert', False, 'with a distillation pair --config: evaluate its expert '
                  '(config.distill.expert_checkpoint) on the apprentice\'s images as the distiller feeds them, '
                  'writing --workdir/eval/metrics_summary.json')
flags.DEFINE_string('results', None, 'nuScenes results JSON (global frame)')
flags.DEFINE_string('dataroot', None, 'nuScenes(-format) dataroot')
flags.DEFINE_string('version', None, 'table version, e.g. v1.0-mini')
flags.DEFINE_string('split', None, 'split name, e.g. mini_val')
flags.DEFINE_string('out', None, 'output folder for metrics_summary.json')
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.workdir or FLAGS.config:
        if not FLAGS.workdir:
            sys.exit('error: checkpoint mode needs --workdir (and --config unless the workdir has its config.json)')
        logging.set_verbosity(logging.WARNING)
        exit_on(validate, FLAGS.config)
        if FLAGS.expert:
            exit_on(evaluate_expert, FLAGS.config, FLAGS.workdir)
            return
        exit_on(evaluate_checkpoint, FLAGS.config, FLAGS.workdir, FLAGS.step)
        return
    if FLAGS.expert:
        sys.exit('error: --expert needs --workdir (and --config unless the workdir has its config.json)')
    missing = [n for n in ('results', 'dataroot', 'version', 'split', 'out') if not getattr(FLAGS, n)]
    if missing:
        sys.exit('error: missing flags: ' + ', '.join('--' + n for n in missing))
    if not storage.as_path(FLAGS.results).exists():
        sys.exit(f'error: results file not found: {FLAGS.results}')
    try:
        with contextlib.ExitStack() as stack:
            results = stack.enter_context(storage.local_file(FLAGS.results))
            out = stack.enter_context(storage.local_folder(FLAGS.out))
            summary = nuscenes_metrics.run_detection_eval(results, FLAGS.dataroot, FLAGS.version, FLAGS.split, out)
    except (ValueError, AssertionError) as e:
        sys.exit(f'error: {e}')
    print(nuscenes_metrics.format_metrics(summary))
    print(f"wrote {os.path.join(FLAGS.out, 'metrics_summary.json')}")


if __name__ == '__main__':
    try:
        app.run(main, argv=exit_on(default_config_argv, sys.argv), flags_parser=parse_flags)
    except KeyboardInterrupt:
        print('Ctrl-C: evaluation stopped', file=sys.stderr)
        sys.exit(130)
