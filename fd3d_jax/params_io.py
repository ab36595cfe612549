"""Params folders: a detector's params alone (nested dicts of arrays), written by ``save_params`` (e.g. by the
converter or ``experiments/export_expert.py``) or read from a training workdir's checkpoint, and checked leaf by
leaf against a model's params. Used by every layer that reads weights (expert loading, evaluation, conversion),
so it sits below them and imports only ``fd3d_jax.errors`` and ``fd3d_jax.storage`` (a folder may be a URL,
``gs://bucket/expert``)."""
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from fd3d_jax import storage
from fd3d_jax.errors import CheckpointError

PARAMS_DIR = 'params'


def save_params(params, path):
    """Writes a params pytree to ``path/params`` (an orbax checkpoint; e.g. a converted expert)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(storage.as_path(path) / PARAMS_DIR, params, force=True)


def load_params(path, step=None):
    """Detector params (nested dicts of arrays) from ``path``: a params folder of ``save_params``, or
    a training workdir (``params['model']`` of its latest or ``step`` checkpoint as numpy arrays, read on its
    own: the optimiser state and a distillation run's ``params['distill']`` are not read; a run with
    ``train.ema_decay`` gives its moving average ``ema``, the params it evaluated)."""
    path = storage.as_path(path)
    if (path / PARAMS_DIR).is_dir():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path / PARAMS_DIR)
    ckdir = path / 'checkpoints'
    steps = ocp.utils.checkpoint_steps(ckdir) if ckdir.is_dir() else []
    if not steps:
        raise CheckpointError(f'no checkpoint in {path} (neither {ckdir}/<step> nor {path}/{PARAMS_DIR})')
    if step is not None and int(step) not in steps:
        raise CheckpointError(f'no checkpoint for step {step} in {ckdir} (have {sorted(steps)})')
    item = ckdir / str(max(steps) if step is None else int(step)) / 'state'
    handler, state_dir = ocp.PyTreeCheckpointHandler(), item   # params.model alone, no optimiser moments
    try:
        try:
            tree = handler.metadata(state_dir).tree
            model = tree['params']['model']
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f'{item} holds no params.model (not a fd3d_jax training state)') from None
        ema = tree.get('ema') if hasattr(tree, 'get') else None
        sub = {'ema': ema} if ema else {'params': {'model': model}}   # a run with train.ema_decay: its average
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), sub)
        restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(item=sub, restore_args=as_numpy,
                                                                          partial_restore=True))
    finally:
        handler.close()
    return restored['ema'] if ema else restored['params']['model']


def shape_mismatches(params, abstract):
    """Lines ``missing: a/b``, ``unexpected: a/b``, ``shape: a/b: checkpoint (..), model (..)`` for every leaf of
    ``params`` (nested dicts) that does not fit ``abstract`` (a model's params, arrays or shape structs), and the
    counts ``(missing, unexpected, wrong shape)``."""
    have = traverse_util.flatten_dict(params, sep='/')
    want = traverse_util.flatten_dict(abstract, sep='/')
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(f'{k}: checkpoint {tuple(np.shape(have[k]))}, model {tuple(want[k].shape)}'
                   for k in set(have) & set(want) if tuple(np.shape(have[k])) != tuple(want[k].shape))
    lines = ([f'missing: {k}' for k in missing] + [f'unexpected: {k}' for k in unexpected]
             + [f'shape: {k}' for k in wrong])
    return lines, (len(missing), len(unexpected), len(wrong))


def format_lines(lines, most=30):
    """Up to ``most`` lines, indented, and how many more there are."""
    return '\n  '.join(lines[:most]) + (f'\n  ... {len(lines) - most} more' if len(lines) > most else '')
