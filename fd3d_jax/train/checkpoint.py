"""Orbax checkpoints of the training state and the data iterator's position.

Layout: ``W/checkpoints/<step>/{state,data}`` (``state``: the ``TrainState`` pytree — params,
optimiser state, step, RNG; ``data``: the grain iterator state as JSON). Saves are asynchronous
and atomic (orbax writes to a temporary folder and renames it), so a run killed at any moment
resumes from the last complete checkpoint; ``keep`` newest are kept. ``W`` is a local folder or a URL
(``gs://bucket/run``: ``fd3d_jax.storage``).

A step that cannot be read is told apart from a checkpoint of another model. The tree on disk (orbax's
metadata: every leaf's path and shape) is compared with the state to restore before any array is read: a
difference is a ``CheckpointError`` saying the checkpoint does not match this config's model/optimiser state,
with the leaves that differ. A step is *corrupt* when its metadata, its data iterator state or, with the tree
matching, its arrays cannot be read (files missing, truncated, overwritten, not orbax data, no permission):
``restore`` names it, and ``restore_latest`` resumes from the newest intact step instead. The corrupt step is
not deleted but renamed ``<step>.corrupt`` (a name orbax neither lists nor deletes): left under its own name it
would stop the run when training reaches its step again (orbax refuses to save a step that exists), and orbax's
``keep`` would delete it, or an intact step, in its turn.

Processes of a multi-host job all restore (each reads its own shards). This module assumes they all read one
shared workdir (a bucket or a shared file system), so that a step corrupt for one is corrupt for all; each
process's verdict on a step (intact, corrupt, another model) is still combined with the others'
(``multihost_utils.process_allgather``) before it is acted on, so that all resume from the same step or all
stop with an error. The state and data are read with orbax's handlers, without ``CheckpointManager.restore``'s
closing barrier: a process whose reading failed must not leave the others waiting at it. Only process 0 renames
a corrupt step, and all processes wait for it.
"""
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from fd3d_jax import storage
from fd3d_jax.params_io import brief_error, quiet_abandoned_reads
from fd3d_jax.errors import CheckpointError

CORRUPT_SUFFIX = '.corrupt'   # a corrupt step folder set aside by ``restore_latest``: <step>.corrupt[-<n>]

# A step's verdict, ordered so that the largest over the processes is the one all act on.
INTACT, CORRUPT, MISMATCH = 0, 1, 2


def _shapes(tree):
    """``{'a/b/c': shape}`` of a pytree's leaves (arrays, shape structs, or orbax's array metadata); None for a
    leaf without a shape."""
    shapes = {}
    for key, leaf in ocp.tree.to_flat_dict(tree).items():
        shape = getattr(leaf, 'shape', None)
        shapes['/'.join(str(part) for part in key)] = None if shape is None else tuple(shape)
    return shapes


def tree_mismatches(on_disk, abstract_state, most=8):
    """Lines ``missing: a/b`` (in the state, not on disk), ``unexpected: a/b`` (on disk only) and
    ``shape: a/b: checkpoint (..), this config (..)`` of a checkpoint's tree metadata against the state to
    restore into (at most ``most`` of them, then how many more); [] when they fit."""
    have, want = _shapes(on_disk), _shapes(abstract_state)
    lines = ([f'missing: {key}' for key in sorted(set(want) - set(have))]
             + [f'unexpected: {key}' for key in sorted(set(have) - set(want))]
             + [f'shape: {key}: checkpoint {have[key]}, this config {want[key]}' for key in sorted(set(have) & set(want))
                if None not in (have[key], want[key]) and have[key] != want[key]])
    return lines[:most] + ([f'... {len(lines) - most} more'] if len(lines) > most else [])


def _agreed(verdict):
    """The largest verdict over all processes (this process's own when it runs alone)."""
    if jax.process_count() == 1:
        return verdict
    return int(np.max(multihost_utils.process_allgather(np.int32(verdict))))


class Checkpointer:
    def __init__(self, workdir, keep=3, async_save=True):
        self.directory = storage.as_path(workdir) / 'checkpoints'   # an epath.Path
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step, state, data_state=None):
        items = dict(state=ocp.args.StandardSave(state))
        if data_state is not None:
            items['data'] = ocp.args.JsonSave(data_state)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def _check_step(self, step):
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f'no checkpoint in {self.directory}')
        if step not in self.all_steps():
            raise CheckpointError(f'no checkpoint for step {step} in {self.directory} '
                                  f'(have {sorted(self.all_steps())})')
        return step

    def _read(self, abstract_state, step, with_data):
        """This process's reading of ``step``: ``(INTACT, (state, data_state or None))``, ``(CORRUPT, why)`` or
        ``(MISMATCH, message)``."""
        path = self.directory / str(step)
        handler = ocp.PyTreeCheckpointHandler()
        try:
            try:
                on_disk = handler.metadata(path / 'state').tree
            except Exception as error:   # whatever orbax raises on a missing, truncated or overwritten file
                return CORRUPT, f'its state metadata cannot be read: {brief_error(error)}'
        finally:
            handler.close()
        mismatches = tree_mismatches(on_disk, abstract_state)
        if mismatches:
            return MISMATCH, (f"checkpoint {path} does not match this config's model/optimiser state: "
                              + '; '.join(mismatches))
        data_state = None
        if with_data and (path / 'data').is_dir():
            handler = ocp.JsonCheckpointHandler()
            try:
                data_state = handler.restore(path / 'data')
            except Exception as error:
                return CORRUPT, f'its data iterator state cannot be read: {brief_error(error)}'
            finally:
                handler.close()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        handler = ocp.StandardCheckpointHandler()
        try:
            state = handler.restore(path / 'state', args=ocp.args.StandardRestore(abstract))
        except Exception as error:   # the tree fits: the arrays' files are damaged
            return CORRUPT, f'its arrays cannot be read: {brief_error(error)}'
        finally:
            handler.close()
        return INTACT, (state, data_state)

    def _attempt(self, abstract_state, step, with_data):
        """``_read`` with the verdict all processes agree on (a process that read the step well gives way to one
        that could not)."""
        before = quiet_abandoned_reads()
        verdict, payload = self._read(abstract_state, step, with_data)
        if verdict != CORRUPT and before is not None and getattr(sys.unraisablehook, 'drops_abandoned_reads', False):
            sys.unraisablehook = before   # nothing was abandoned; a corrupt step keeps the hook for what comes later
        agreed = _agreed(verdict)
        if agreed == verdict:
            return verdict, payload
        path = self.directory / str(step)
        if agreed == MISMATCH:
            return MISMATCH, (f"checkpoint {path} does not match this config's model/optimiser state "
                              f'(found by another process)')
        return CORRUPT, 'another process could not read it'

    def restore(self, abstract_state, step=None, with_data=True):
        """Restores ``step`` (default: latest) into the structure/shardings of ``abstract_state``
        (a pytree of arrays or ``jax.ShapeDtypeStruct``). Returns (state, data_state or None). A CheckpointError
        names the step's folder when its tree does not fit ``abstract_state`` (a checkpoint of another config)
        or when it is corrupt (what could not be read, and the other steps)."""
        step = self._check_step(step)
        verdict, payload = self._attempt(abstract_state, step, with_data)
        if verdict == INTACT:
            return payload
        if verdict == MISMATCH:
            raise CheckpointError(payload)
        others = sorted(s for s in self.all_steps() if s != step)
        raise CheckpointError(f'checkpoint {self.directory / str(step)} is corrupt or unreadable ({payload}); '
                              f'the other steps are {others or "none"}')

    def restore_latest(self, abstract_state):
        """Where to resume: ``(state, data_state, step, note)``. No checkpoint: ``(abstract_state, None, None,
        None)``. Otherwise the newest intact step, tried newest first: ``note`` is None when that is the latest
        step, else one line naming each newer, corrupt step with what could not be read, the step resumed from,
        and where the corrupt ones were set aside (``<step>.corrupt``, to delete when no longer needed). A
        CheckpointError when a step does not fit ``abstract_state`` (another config's checkpoint: no fallback),
        and when no step is intact (naming each, and how to start over)."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return abstract_state, None, None, None
        corrupt = []
        for step in steps:
            verdict, payload = self._attempt(abstract_state, step, True)
            if verdict == MISMATCH:
                raise CheckpointError(payload)
            if verdict == INTACT:
                break
            corrupt.append((step, payload))
        else:
            listing = '; '.join(f'{self.directory / str(s)}: {why}' for s, why in corrupt)
            raise CheckpointError(f'no intact checkpoint to resume from in {self.directory}, every step is corrupt '
                                  f'or unreadable ({listing}); to start over, delete {self.directory} or train in '
                                  f'another --workdir')
        state, data_state = payload
        if not corrupt:
            return state, data_state, step, None
        moved = self._set_aside([s for s, _ in corrupt])
        found = '; '.join(f'checkpoint {self.directory / str(s)} is corrupt or unreadable ({why})' for s, why in corrupt)
        places = ', '.join(str(target) for target in moved.values())
        note = (f'{found}; resumed from {self.directory / str(step)}, the newest intact checkpoint; the corrupt '
                f'checkpoint{"s" if len(moved) > 1 else ""} moved to {places} (out of the way of new checkpoints, '
                f'kept to look at: delete when no longer needed)')
        return state, data_state, step, note

    def _set_aside(self, steps):
        """Renames the folders of ``steps`` to ``<step>.corrupt`` (``-2``, ``-3``, ... when taken) on process 0,
        waits for it on all processes and has orbax list the steps again. Returns {step: new path}."""
        taken = {path.name for path in self.directory.iterdir()}
        moved = {}
        for step in steps:
            name, count = f'{step}{CORRUPT_SUFFIX}', 1
            while name in taken:
                count += 1
                name = f'{step}{CORRUPT_SUFFIX}-{count}'
            taken.add(name)
            moved[step] = self.directory / name
        _agreed(INTACT)   # every process has its names before process 0 renames
        failure = None
        if jax.process_index() == 0:
            for step, target in moved.items():
                try:
                    (self.directory / str(step)).rename(target)
                except Exception as error:
                    failure = f'cannot rename the corrupt checkpoint {self.directory / str(step)} to {target} ' \
                              f'({brief_error(error)})'
                    break
        failed = _agreed(int(failure is not None))
        self.manager.reload()
        if failed:
            raise CheckpointError((failure or 'process 0 could not rename the corrupt checkpoints')
                                  + f'; move or delete {", ".join(str(self.directory / str(s)) for s in steps)} '
                                  f'and run again')
        return moved

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
