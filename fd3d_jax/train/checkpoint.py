"""Orbax checkpoints of the training state and the data iterator's position.

Layout: ``W/checkpoints/<step>/{state,data}`` (``state``: the ``TrainState`` pytree — params,
optimiser state, step, RNG; ``data``: the grain iterator state as JSON). Saves are asynchronous
and atomic (orbax writes to a temporary folder and renames it), so a run killed at any moment
resumes from the last complete checkpoint; ``keep`` newest are kept. ``W`` is a local folder or a URL
(``gs://bucket/run``: ``fd3d_jax.storage``).
"""
import jax
import orbax.checkpoint as ocp
from fd3d_jax import storage
from fd3d_jax.errors import CheckpointError


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

    def restore(self, abstract_state, step=None, with_data=True):
        """Restores ``step`` (default: latest) into the structure/shardings of ``abstract_state``
        (a pytree of arrays or ``jax.ShapeDtypeStruct``). Returns (state, data_state or None)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f'no checkpoint in {self.directory}')
        if step not in self.all_steps():
            raise CheckpointError(f'no checkpoint for step {step} in {self.directory} '
                                  f'(have {sorted(self.all_steps())})')
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = dict(state=ocp.args.StandardRestore(abstract))
        path = self.directory / str(step)
        has_data = with_data and (path / 'data').is_dir()
        if has_data:
            items['data'] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f'checkpoint {path} does not match this config\'s model/optimiser '
                                  f'state: {e}') from None
        return restored['state'], (restored['data'] if has_data else None)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
