"""Batches placed on the device ahead of the step that uses them (bounded run-ahead).

``shard_batch`` starts the host-to-device copies of a batch and returns at once; doing it ``size`` batches
ahead lets the copies of the next batches run while the current step computes, instead of in front of it. The
batches and their order are unchanged, so training is bit for bit the same with any ``size``.
"""
import collections

import jax

from fd3d_jax.train import mesh as mesh_lib


def as_global_batch(batch, mesh):
    """A process-local numpy batch sharded over ``mesh`` (``mesh.shard_batch``); one already placed (jax arrays,
    from ``DevicePrefetcher``) as it is."""
    leaves = jax.tree_util.tree_leaves(batch)
    if leaves and all(isinstance(leaf, jax.Array) for leaf in leaves):
        return batch
    return mesh_lib.shard_batch(batch, mesh)


class DevicePrefetcher:
    """Wraps a host batch iterator (``pipeline.BatchIterator``): ``next`` returns global sharded batches, with
    up to ``size`` further batches drawn and sent ahead (0: none). ``get_state`` is the state after the last
    batch returned (not after the ones sent ahead), so a checkpoint resumes with the next unused batch;
    ``set_state`` drops the batches sent ahead; ``close`` closes the host iterator."""

    def __init__(self, iterator, mesh, size=2):
        self._it, self._mesh, self._size = iterator, mesh, size
        self._ahead = collections.deque()    # (sharded batch, host iterator state after it)
        self._state = iterator.get_state()
        self._exhausted = False

    def __iter__(self):
        return self

    def _draw(self):
        """Draws and sends one more batch; False when the host iterator is exhausted (evaluation)."""
        if self._exhausted:
            return False
        try:
            batch = next(self._it)
        except StopIteration:
            self._exhausted = True
            return False
        self._ahead.append((mesh_lib.shard_batch(batch, self._mesh), self._it.get_state()))
        return True

    def __next__(self):
        while len(self._ahead) <= self._size and self._draw():
            pass
        if not self._ahead:
            raise StopIteration
        batch, self._state = self._ahead.popleft()
        return batch

    def get_state(self):
        return self._state

    def set_state(self, state):
        self._ahead.clear()
        self._exhausted = False
        self._it.set_state(state)
        self._state = state

    def close(self):
        self._ahead.clear()
        self._it.close()
