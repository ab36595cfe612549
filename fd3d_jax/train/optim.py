"""Optimiser and learning-rate schedule: the original recipe (the ``optimizer`` /
``optimizer_config`` / ``lr_config`` of BEVFormer's and DETR3D's configs).

AdamW (decoupled weight decay on every trainable parameter), image backbone lr x
``backbone_lr_mult``, gradients clipped to a global L2 norm, mmcv ``CosineAnnealing`` (per epoch by
default) with a linear warm-up over the first ``warmup_iters`` iterations.

Frozen backbone leaves (``resnet_trainable_mask``: BatchNorm, stem and ``layer1..frozen_stages``)
behave like PyTorch's ``requires_grad=False`` parameters: no gradient (so they are left out of the
clipping norm), no update, no weight decay and no optimiser state.
"""
import math

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from fd3d_jax.models.backbone import resnet_trainable_mask

BACKBONE_PATH = ('image_features', 'backbone')  # where both detectors keep the ResNet's params


def num_train_steps(train_cfg, steps_per_epoch: int) -> int:
    """``train.num_steps`` if positive, else ``train.epochs x steps_per_epoch``."""
    if train_cfg.num_steps > 0:
        return int(train_cfg.num_steps)
    return int(train_cfg.epochs) * int(steps_per_epoch)


def lr_schedule(optim_cfg, steps_per_epoch: int, num_steps: int):
    """mmcv ``CosineAnnealing`` + linear warm-up as an optax schedule ``step -> lr`` (jit-safe).

    ``e = step // steps_per_epoch`` (``by_epoch``) or ``step / steps_per_epoch``; over
    ``E = num_steps / steps_per_epoch`` epochs ``lr(e) = min + (base - min)(1 + cos(pi e / E)) / 2``
    with ``min = min_lr_ratio x base``. For ``step < warmup_iters`` (iterations, as mmcv):
    ``lr = lr(e) (1 - (1 - step / warmup_iters)(1 - warmup_ratio))``. ``step`` 0 is the first
    iteration (optax's update count).
    """
    base = float(optim_cfg.lr)
    min_lr = base * float(optim_cfg.min_lr_ratio)
    by_epoch = bool(optim_cfg.by_epoch)
    total = num_steps / steps_per_epoch if by_epoch else float(num_steps)  # in units of progress
    warmup_iters = int(optim_cfg.warmup_iters or 0)
    warmup_ratio = float(optim_cfg.warmup_ratio)

    def schedule(step):
        step = jnp.asarray(step)
        progress = jnp.floor_divide(step, steps_per_epoch) if by_epoch else step
        # (1 + cos(pi p / T)) / 2 = sin^2(pi (T - p) / 2T), exact and free of float32 cancellation
        # near the end of the schedule, where the lr is small.
        left = (total - progress.astype(jnp.float32)) / total
        lr = min_lr + (base - min_lr) * jnp.sin(0.5 * math.pi * left) ** 2
        if warmup_iters > 0:
            frac = step.astype(jnp.float32) / warmup_iters
            lr = jnp.where(step < warmup_iters, lr * (1.0 - (1.0 - frac) * (1.0 - warmup_ratio)), lr)
        return lr

    return schedule


def param_labels(params, model_cfg):
    """Pytree like ``params`` (the detector's ``'params'`` collection, or the training state's
    ``{'model': ..., 'distill': ...}``) of ``'default'``, ``'backbone'`` (image backbone leaves that
    train) or ``'frozen'`` (``resnet_trainable_mask`` is False)."""
    path = (('model',) if 'model' in params else ()) + BACKBONE_PATH
    backbone = params
    for key in path:
        backbone = backbone.get(key, {}) if hasattr(backbone, 'get') else {}
    trainable = traverse_util.flatten_dict(
        resnet_trainable_mask(backbone, model_cfg.backbone.frozen_stages)) if backbone else {}

    def label(leaf_path, _):
        keys = tuple(getattr(p, 'key', p) for p in leaf_path)
        if keys[:len(path)] != path:
            return 'default'
        return 'backbone' if trainable[keys[len(path):]] else 'frozen'

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, params, steps_per_epoch: int, num_steps: int = None):
    """``(tx, schedule)``: the training ``optax.GradientTransformation`` for ``params`` and the base
    lr schedule (``step -> lr``, for logging; the backbone group runs at ``backbone_lr_mult`` x it).

    ``tx`` = zero the frozen gradients -> clip to global norm ``grad_clip`` (frozen leaves thus
    excluded; torch's ``max_norm / (norm + 1e-6)`` differs below float32 resolution) -> per group
    AdamW (torch semantics: ``p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)``, decay scaled by the
    group lr); frozen leaves get ``set_to_zero`` and hold no state. ``params`` may be abstract
    (``jax.eval_shape``): only its tree structure is used. ``num_steps`` defaults to
    ``num_train_steps(config.train, steps_per_epoch)``.
    """
    optim_cfg = config.optim
    if num_steps is None:
        num_steps = num_train_steps(config.train, steps_per_epoch)
    schedule = lr_schedule(optim_cfg, steps_per_epoch, num_steps)
    labels = param_labels(params, config.model)
    frozen = jax.tree_util.tree_map(lambda l: l == 'frozen', labels)

    def adamw(mult):
        lr = schedule if mult == 1.0 else (lambda step: mult * schedule(step))
        return optax.adamw(lr, b1=optim_cfg.betas[0], b2=optim_cfg.betas[1], eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay)

    tx = optax.chain(
        optax.masked(optax.set_to_zero(), frozen),
        optax.clip_by_global_norm(optim_cfg.grad_clip),
        optax.multi_transform({'default': adamw(1.0), 'backbone': adamw(float(optim_cfg.backbone_lr_mult)),
                               'frozen': optax.set_to_zero()}, labels),
    )
    return tx, schedule
