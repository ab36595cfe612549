"""Params folders: a detector's params alone (nested dicts of arrays), written by ``save_params`` (e.g. by the
converter or ``experiments/export_expert.py``) or read from a training workdir's checkpoint, and checked leaf by
leaf against a model's params. Used by every layer that reads weights (expert loading, evaluation, conversion),
so it sits below them and imports only ``fd3d_jax.errors`` and ``fd3d_jax.storage`` (a folder may be a URL,
``gs://bucket/expert``)."""
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from fd3d_jax import storage
from fd3d_jax.errors import CheckpointError

PARAMS_DIR = 'params'


def brief_error(error, most=300):
    """An exception in a few words, on one line: its type and message; of a TensorStore error (orbax reads arrays
    with TensorStore) its status and the innermost causes from the last file it names, without its spec."""
    text = re.sub(r'\s*\[tensorstore_spec=.*$', '', ' '.join(str(error).split()))
    parts = text.split(': ')
    if len(parts) > 2 and re.fullmatch(r'[A-Z_]+', parts[0]):   # 'DATA_LOSS: Error opening ...: ...'
        naming = [index for index, part in enumerate(parts) if 'file "' in part]
        if naming:
            text = ': '.join([parts[0]] + parts[naming[-1]:])
    if len(text) > most:
        text = text[:most].rstrip() + ' ...'
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _abandoned_read(unraisable):
    """Whether an exception Python could not raise comes from orbax's reads of a step abandoned when another read
    failed: their tensorstore callbacks find the event loop closed, their coroutines are collected unfinished."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed':
        return True
    code = getattr(unraisable.object, 'cr_code', None)
    return code is not None and '/orbax/' in code.co_filename.replace('\\', '/')


def quiet_abandoned_reads():
    """Installs a ``sys.unraisablehook`` that drops the exceptions of abandoned reads (``_abandoned_read``), which
    Python would print in other threads, during and after the failed read, as 'Exception ignored ...' with a
    traceback, after the step's error was reported or a run resumed from another step; every other exception goes
    to the hook before. Returns that hook, or None when it is installed already."""
    previous = sys.unraisablehook
    if getattr(previous, 'drops_abandoned_reads', False):
        return None

    def hook(unraisable):
        if not _abandoned_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
    return previous


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
    corrupt = f'checkpoint {item.parent} is corrupt or unreadable'
    previous_hook = quiet_abandoned_reads()
    try:
        try:
            tree = handler.metadata(state_dir).tree
        except Exception as error:   # noqa: BLE001 (whatever orbax raises on unreadable files: named, one line)
            raise CheckpointError(f'{corrupt} (its state metadata cannot be read: {brief_error(error)})') from None
        try:
            model = tree['params']['model']
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f'{item} holds no params.model (not a fd3d_jax training state)') from None
        ema = tree.get('ema') if hasattr(tree, 'get') else None
        sub = {'ema': ema} if ema else {'params': {'model': model}}   # a run with train.ema_decay: its average
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), sub)
        try:
            restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(item=sub, restore_args=as_numpy,
                                                                              partial_restore=True))
        except Exception as error:   # noqa: BLE001
            raise CheckpointError(f'{corrupt} (its arrays cannot be read: {brief_error(error)})') from None
    finally:
        handler.close()
    if previous_hook is not None:   # read well, nothing abandoned (after an error the hook stays for late reports)
        sys.unraisablehook = previous_hook
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
