"""The behaviour fingerprint of a distillation-table cell: what its numbers depend on, computed in about a minute.

    python experiments/cell_fingerprint.py --config PAIR.py:ARG [--config.k=v ...]

takes the cell's own command line (``experiments/distill_table.py`` passes the same ``--config`` and overrides
as to ``fd3d_jax.train``) and prints one JSON line ``{"behaviour": SHA256, ...}``. The hash covers, bit for bit:

- every logged value (loss terms, gradient norms, learning rate) of the first ``STEPS`` training steps from the
  config's seed on the real batches of the training split (records, images, augmentation, the expert's input),
  with the real expert: the model, the losses, the matcher, the distiller and the optimiser;
- the learning rate at the first, middle and last step of the run's schedule;
- the detections of the first ``EVAL_SAMPLES`` val samples of the model after those steps: the eval step, box
  decoding and the results format.

Two code versions with the same fingerprint train and score a cell alike, so ``distill_table.py`` names and
reuses run folders by it (a refactor that changes no number keeps every cell). Not covered: the devkit's
DetectionEval (a pinned version) and the loop's bookkeeping (checkpoints, resume: tested bitwise elsewhere).
"""
import hashlib
import json
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from fd3d_jax.cli import exit_on, parse_flags
from fd3d_jax.data import pipeline
from fd3d_jax.distill import build_distillation
from fd3d_jax.train import loop, mesh as mesh_lib, optim

STEPS = 3
EVAL_SAMPLES = 2


def _hex(tree):
    """Every leaf of ``tree`` as exact hex strings (float64 of the values; integers and booleans as they are)."""
    def one(value):
        array = np.asarray(value)
        if array.dtype.kind == 'f':
            return [float(v).hex() for v in array.astype(np.float64).ravel()]
        return array.ravel().tolist()
    return jax.tree_util.tree_map(one, tree)


def schedule_points(config, steps_per_epoch, num_steps):
    """The learning rate (hex) at the first, middle and last step of a run of ``num_steps``."""
    schedule = optim.lr_schedule(config.optim, steps_per_epoch, num_steps)
    last = num_steps - 1
    return [float(schedule(step)).hex() for step in (0, last // 2, last)]


def fingerprint(config):
    """{'steps': logged values of STEPS steps, 'lr': the schedule at its first/middle/last step, 'detections':
    of the first EVAL_SAMPLES val samples}, every float as hex."""
    config, _ = mesh_lib.launch_config(config, jax.device_count())
    config.train.log_every = 1   # every step a logged one
    data_cfg = config.data
    train = loop.load_split(config, data_cfg.train_split)
    distiller, expert_params = build_distillation(config)
    trainer = loop.Trainer(config, len(train['samples']), distiller=distiller, expert_params=expert_params)
    expert_bev = pipeline.bev_config(config.expert.model) if distiller is not None else None
    batches = iter(pipeline.train_dataset(train, data_cfg.dataroot, data_cfg,
                                          mesh_lib.process_batch_size(config.train.batch_size, trainer.mesh),
                                          config.seed, 0, 1, pipeline.bev_config(config.model), expert_bev))
    steps = [_hex(jax.device_get(trainer.step(mesh_lib.shard_batch(next(batches), trainer.mesh))))
             for _ in range(STEPS)]
    lr = schedule_points(config, trainer.steps_per_epoch, trainer.num_steps)
    val = loop.load_split(config, data_cfg.val_split)
    first = dict(val, samples=val['samples'][:EVAL_SAMPLES])
    detections = loop.predict(trainer, trainer.eval_params(), first)
    return dict(steps=steps, lr=lr, detections=json.loads(json.dumps(detections, sort_keys=True,
                                                                    default=float)))


def behaviour_hash(values):
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    values = exit_on(fingerprint, flags.FLAGS.config)
    loss = [float.fromhex(step['loss'][0]) for step in values['steps']]
    print(json.dumps(dict(behaviour=behaviour_hash(values), loss=loss)), flush=True)


if __name__ == '__main__':   # flags defined here: the tests import this file beside other tools' --config
    config_flags.DEFINE_config_file('config', None, 'the cell\'s distillation pair config')
    app.run(main, argv=sys.argv, flags_parser=parse_flags)
