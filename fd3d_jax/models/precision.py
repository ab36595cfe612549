"""Compute precision (``config.model.dtype``): which dtype the matmuls and convolutions run in.

``'float32'`` (default) or ``'bfloat16'``. Parameters are always created and stored in float32 (flax's
``param_dtype``), so the optimiser state and the checkpoints stay float32; a module cast each kernel to the
compute dtype where it uses it (flax's ``dtype``), and the gradient flows back to the float32 parameter.

What stays float32 under ``'bfloat16'`` (by design, each for a reason):
  * geometry: reference points, the ``lidar2img`` projection, sampling locations (the ``sampling_offsets``
    Linear runs in float32: a bfloat16 offset of 30 px would be rounded by up to 0.06 px), DCNv2 offsets, box
    decoding (the branches' last Linear runs in float32, so ``cls_scores`` and ``bbox_preds`` are float32);
  * softmaxes and sigmoids of attention weights (their logits Linear runs in float32);
  * the statistics of every normalisation (flax's LayerNorm reduces in float32; ``BatchStatNorm`` too); its
    output is cast back to the compute dtype;
  * the deformable-attention accumulation (``ms_deform_attn`` sums bilinear taps in float32 and returns the
    value's dtype);
  * every loss (detection and distillation losses cast their inputs to float32), and the BEV a detector returns
    (carried between frames, read by the distiller) is float32.
bfloat16 has float32's exponent range, so no loss scaling is needed (unlike float16).
"""
import jax.numpy as jnp

from fd3d_jax.errors import ConfigError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name, key='config.model.dtype'):
    """The jnp dtype of a precision name (``'float32'`` or ``'bfloat16'``); ``ConfigError`` naming ``key``
    otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"{key} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
