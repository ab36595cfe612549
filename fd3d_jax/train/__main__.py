"""Trains a detector (and distils, when the config has an expert).

    python -m fd3d_jax.train --config configs/NAME.py[:ARG] --workdir W [--config.key=value ...]
    python -m fd3d_jax.train --workdir W [--config.key=value ...]      # resumes W with W's own config

Resumes from the latest checkpoint in ``W`` (a config of another model or data than ``W/config.json`` is refused
before anything is written); writes ``W/config.json``, ``W/metrics.jsonl``,
``W/tensorboard/``, ``W/checkpoints/<step>/`` and, at the end, ``W/eval/metrics_summary.json``.
Multi-host (the same command on every host): ``--distributed`` lets ``jax.distributed`` find its peers
(TPU pod slices, SLURM, Open MPI), or pass ``--coordinator_address/--num_processes/--process_id``.
On SIGTERM the run saves a checkpoint and exits with status 0; on Ctrl-C the same with status 130 (a second
Ctrl-C stops at once without saving); rerunning the command resumes it. A
non-finite loss stops it with status 1 and a message naming the step (``train.nonfinite``).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fd3d_jax.cli import exit_on, parse_flags
from fd3d_jax.errors import Interrupted
from fd3d_jax.train import distributed, loop
from fd3d_jax.train.workdir import default_config_argv
from fd3d_jax.validate import validate

config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/bevformer_tiny.py:toy')
flags.DEFINE_string('workdir', None, 'output folder (checkpoints, metrics, evaluation)')
flags.DEFINE_string('coordinator_address', None, 'jax.distributed coordinator (multi-host)')
flags.DEFINE_integer('num_processes', None, 'jax.distributed process count (multi-host)')
flags.DEFINE_integer('process_id', None, 'jax.distributed process id (multi-host)')
flags.DEFINE_bool('distributed', False, 'jax.distributed.initialize() from the cluster environment '
                  '(TPU pod slice, SLURM, Open MPI)')
flags.DEFINE_integer('distributed_timeout', distributed.DISTRIBUTED_TIMEOUT, 'seconds a process waits for its peers '
                     '(multi-host): for all to connect at the start, for all to finish at the end')
flags.DEFINE_integer('distributed_heartbeat_timeout', distributed.HEARTBEAT_TIMEOUT, 'seconds without a heartbeat after '
                     'which a process counts as lost and the others stop (multi-host)')
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f'error: unexpected arguments {argv[1:]}')
    if FLAGS.config is None or not FLAGS.workdir:
        sys.exit('error: --workdir is required, and --config unless the workdir has its config.json')
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    exit_on(validate, FLAGS.config)
    exit_on(distributed.initialize_distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
            FLAGS.distributed, FLAGS.distributed_timeout, FLAGS.distributed_heartbeat_timeout)
    try:
        exit_on(loop.train_and_evaluate, FLAGS.config, FLAGS.workdir)
    except Interrupted as e:   # Ctrl-C: the line says what was saved
        distributed.finished()
        print(e, file=sys.stderr)
        sys.exit(130)
    distributed.finished()   # the others may leave while process 0 evaluates


if __name__ == '__main__':
    try:
        app.run(main, argv=exit_on(default_config_argv, sys.argv), flags_parser=parse_flags)
    except KeyboardInterrupt:   # before the training loop installed its handler: nothing to save
        print('Ctrl-C: stopped before training started', file=sys.stderr)
        sys.exit(130)
