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
    (``train.nonfinite='skip'``); ema: the exponential moving average of ``params['model']`` when
    ``train.ema_decay`` > 0 (``ema_update``), else None (no leaves: nothing stored)."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    ema: Any = None


def init_params(model, batch, seed):
    """Detector params from one batch (jit-compiled; parameter shapes do not depend on the image
    size, so a small dummy batch will do)."""
    rngs = {'params': jax.random.PRNGKey(seed), 'dropout': jax.random.PRNGKey(seed + 1)}
    return jax.jit(lambda r, b: model.init(r, b)['params'])(rngs, batch)


def create_state(params, tx, seed, ema=False):
    """The step-0 state; ``ema``: start the moving average at the initial detector params."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.PRNGKey(seed)).astype(jnp.uint32),
                      skipped=jnp.zeros((), jnp.int32),
                      ema=jax.tree_util.tree_map(jnp.array, params['model']) if ema else None)


def ema_decay_at(decay, ramp_steps, step):
    """The decay of update ``step`` (0-based): ``decay * (1 - exp(-(step + 1) / ramp_steps))``, the ramp of the
    EMA used by BEVDet (MEGVII's ``ema_decay * (1 - exp(-updates / 2000))``), so that early averages do not hold
    the random init; ``ramp_steps`` 0: constant ``decay``."""
    step = jnp.asarray(step, jnp.float32) + 1.0
    return decay * (1.0 - jnp.exp(-step / ramp_steps)) if ramp_steps else jnp.asarray(decay, jnp.float32)


def ema_update(ema, params, decay):
    """``ema * decay + params * (1 - decay)`` leaf by leaf (float32)."""
    return jax.tree_util.tree_map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)


def step_rng(state_rng, step):
    """The dropout/distillation key of one step (the same on every device and after a resume)."""
    return jax.random.fold_in(state_rng, step)
