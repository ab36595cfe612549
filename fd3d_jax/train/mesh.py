"""Device mesh and data placement: one ``data`` axis, batch sharded, state replicated.

Multi-host: join the processes first (``fd3d_jax.train.distributed.initialize_distributed``); every process
feeds its own slice of the global batch (``process_batch_size``) and ``shard_batch`` assembles the
global array with ``jax.make_array_from_process_local_data``.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fd3d_jax.data_parallel import DATA
from fd3d_jax.errors import ConfigError


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


LR_SCALING = ('none', 'linear')   # the values of ``config.optim.lr_scaling``


def launch_config(config, num_devices):
    """``(config, line)``: the config a launch on ``num_devices`` devices runs, and the line saying so.

    With ``train.per_device_batch_size`` > 0 the global batch ``train.batch_size`` is that times the devices (a
    32-chip pod runs 32 samples a step without a flag); with ``optim.lr_scaling='linear'`` the learning rate is
    ``optim.lr`` (given for the global batch ``optim.lr_base_batch``, the original's 8) times global batch /
    ``lr_base_batch``: the linear scaling rule (Goyal et al. 2017, "Accurate, large minibatch SGD"), warm-up
    kept. The returned config has both resolved (``per_device_batch_size`` 0, ``lr_scaling`` 'none'), so that
    what ``W/config.json`` holds resolves to itself. Configs without these keys are returned as they are."""
    config = config.copy_and_resolve_references()
    train, optim = config.train, config.optim
    per_device = train.get('per_device_batch_size', 0)
    if per_device:
        train.batch_size, train.per_device_batch_size = per_device * num_devices, 0
        batch = f'global batch {train.batch_size} = {per_device} per device x {num_devices} devices'
    else:
        batch = f'global batch {train.batch_size} (train.batch_size) on {num_devices} devices'
    scaling = optim.get('lr_scaling', 'none')
    if scaling == 'linear':
        base = optim.lr
        optim.lr, optim.lr_scaling = base * train.batch_size / optim.lr_base_batch, 'none'
        lr = f'lr {optim.lr:.3g} = {base:.3g} x {train.batch_size} / {optim.lr_base_batch} (linear scaling)'
    else:
        lr = f'lr {optim.lr:.3g} (optim.lr, not scaled)'
    return config, f'{batch}; {lr}'


def shard_batch(batch, mesh):
    """Process-local numpy batch (leading axis = this process's samples) -> global jax arrays
    sharded along ``data``."""
    sharding = data_sharded(mesh)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh):
    return jax.device_put(tree, replicated(mesh))
