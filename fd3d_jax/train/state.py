"""The training state: a plain pytree of arrays (checkpointed as is)."""
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step () int32; params {'model': detector params[, 'distill': generator params]};
    opt_state: optax state of the trainable leaves; rng (2,) uint32 base key (step keys are
    ``fold_in(rng, step)``); skipped () int32 steps whose non-finite update was skipped
    (``train.nonfinite='skip'``)."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array


def init_params(model, batch, seed):
    """Detector params from one batch (jit-compiled; parameter shapes do not depend on the image
    size, so a small dummy batch will do)."""
    rngs = {'params': jax.random.PRNGKey(seed), 'dropout': jax.random.PRNGKey(seed + 1)}
    return jax.jit(lambda r, b: model.init(r, b)['params'])(rngs, batch)


def create_state(params, tx, seed):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.PRNGKey(seed)).astype(jnp.uint32),
                      skipped=jnp.zeros((), jnp.int32))


def step_rng(state_rng, step):
    """The dropout/distillation key of one step (the same on every device and after a resume)."""
    return jax.random.fold_in(state_rng, step)
