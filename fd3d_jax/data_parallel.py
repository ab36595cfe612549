"""Per-sample work on the ``data`` mesh axis: ``on_data_shards`` runs a function on each device's own samples.

Why it is needed: under ``jit`` with a batch-sharded input, XLA's SPMD partitioner splits elementwise work and
reductions along the batch, but not a loop whose sliced axis carries the batch (deformable attention's
``lax.map`` / ``lax.scan`` over chunks of flattened batch x query rows) nor a host callback (the scipy
matcher). For those it gathers the global batch onto every device (or onto device 0) and runs all of it there,
so each of N devices does the work of all N and the step moves the gathered tensors every time. The losses are
unchanged, which is why only the compiled program shows it (``experiments/bench_partition.py``).
``jax.shard_map`` gives the function its own shard only: no loop trip count and no gather spans the batch.

The mesh is the one being traced under (``jax.sharding.get_abstract_mesh()``), set by the compiled steps
(``fd3d_jax.train.train_step.compile_train_step`` / ``compile_eval_step``). The function runs on the whole
arrays, as before, when there is no mesh, when its ``data`` axis has one device (a one-device program is the
same program as without this module), when the caller already runs inside a shard of ``data``, or when a
batched axis does not divide by the number of devices (e.g. a batch-1 shape probe).

This module sits below every layer (like ``fd3d_jax.errors``): models and the detection objective use it.
"""
import jax
from jax.sharding import PartitionSpec as P

DATA = 'data'   # the mesh axis the batch is sharded over (``fd3d_jax.train.mesh``)


def data_axis_size():
    """Number of devices along ``data`` of the mesh being traced under; 1 without a mesh or that axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA not in mesh.axis_names:
        return 1
    return int(mesh.shape[DATA])


def inside_data_shard():
    """True inside ``on_data_shards`` (or any ``shard_map`` that made ``data`` manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and DATA in mesh.manual_axes


def shard_index():
    """This device's position along ``data`` inside ``on_data_shards`` (a traced int32), 0 outside one: shard k
    holds global batch rows ``[k * local_batch, (k + 1) * local_batch)``."""
    return jax.lax.axis_index(DATA) if inside_data_shard() else 0


def _spec(axis):
    return P() if axis is None else P(*((None,) * axis + (DATA,)))


def on_data_shards(fn, *args, in_axes=0, out_axes=0):
    """``fn(*args)`` computed per shard of the ``data`` mesh axis (``jax.shard_map``), or on the whole arrays
    when sharding does not apply (module docstring).

    ``in_axes``: the batch axis of every leaf of an argument (an int), ``None`` for a replicated argument, or a
    tuple with one such entry per argument (a ``None`` argument is allowed). ``out_axes``: the batch axis of the
    outputs (an int for every leaf, or a tuple matching ``fn``'s output tuple). ``fn`` must be per-sample along
    those axes: row b of its outputs may depend only on row b of its batched inputs (use ``shard_index`` to
    translate global row numbers inside ``fn``). Differentiable like ``fn``.
    """
    num = data_axis_size()
    in_axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    assert len(in_axes) == len(args), (in_axes, len(args))
    batched = [(leaf, axis) for arg, axis in zip(args, in_axes) if axis is not None
               for leaf in jax.tree.leaves(arg)]
    if num == 1 or inside_data_shard() or not batched or any(leaf.shape[axis] % num for leaf, axis in batched):
        return fn(*args)
    out_specs = tuple(map(_spec, out_axes)) if isinstance(out_axes, (tuple, list)) else _spec(out_axes)
    # check_vma=False: the loops inside (lax.map / scan / fori_loop carries started from zeros) would otherwise
    # need every initial carry cast to "varying over data"; a replicated argument's cotangent is summed over the
    # shards by the transpose either way.
    return jax.shard_map(fn, in_specs=tuple(map(_spec, in_axes)), out_specs=out_specs, check_vma=False)(*args)
