"""Device mesh and data placement: one ``data`` axis, batch sharded, state replicated.

Multi-host: call ``jax.distributed.initialize()`` first (``initialize_distributed``); every process
feeds its own slice of the global batch (``process_batch_size``) and ``shard_batch`` assembles the
global array with ``jax.make_array_from_process_local_data``.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fd3d_jax.data_parallel import DATA
from fd3d_jax.errors import ConfigError


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, auto=False):
    """``jax.distributed.initialize`` when running on several hosts: with explicit arguments, or with ``auto``
    from the cluster's environment (TPU pod slices, SLURM, Open MPI: JAX discovers the coordinator, process
    count and id). No-op otherwise (one process)."""
    if coordinator_address or num_processes:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()


def make_mesh(devices=None):
    """A 1-D mesh over ``devices`` (default: all) with axis ``data`` (automatic axis type, so
    reshapes of sharded arrays do not need explicit sharding annotations)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh):
    return NamedSharding(mesh, P())


def data_sharded(mesh):
    return NamedSharding(mesh, P(DATA))


def process_batch_size(global_batch_size, mesh):
    """This process's share of the global batch (must divide evenly over the mesh's devices)."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ConfigError(f'config train.batch_size={global_batch_size} must be a multiple of the '
                          f'{num_devices} devices of the mesh')
    return global_batch_size // jax.process_count()


def shard_batch(batch, mesh):
    """Process-local numpy batch (leading axis = this process's samples) -> global jax arrays
    sharded along ``data``."""
    sharding = data_sharded(mesh)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh):
    return jax.device_put(tree, replicated(mesh))
