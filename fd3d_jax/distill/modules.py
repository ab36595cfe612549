"""Training-only distillation layers: channel alignment, MGD generator, BEV upsampler.

Features are channels-last with any leading dims: BEV ``(B, H, W, C)``, FPN levels
``(B, N_cam, H, W, C)``; the convs fold the leading dims into one batch axis and unfold after.
Init is PyTorch's default for ``nn.Conv2d`` / ``nn.ConvTranspose2d``: kernel
``kaiming_uniform(a=sqrt(5))`` = U(±1/sqrt(fan_in)) = ``variance_scaling(1/3, 'fan_in', 'uniform')``
and bias U(±1/sqrt(fan_in)). None of these layers is used at inference. ``dtype``: the convs' compute
precision (``config.model.dtype``); params are float32, BatchStatNorm's statistics float32.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-5
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in):
    """PyTorch's default conv/linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _conv(features, kernel_size, fan_in, name, dtype=jnp.float32):
    """``nn.Conv2d(fan_in / k², features, k, padding=k // 2)`` with bias and PyTorch init."""
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in), name=name)


def _as_4d(feats):
    """(..., H, W, C) -> (N, H, W, C) and a function restoring the leading dims."""
    lead = feats.shape[:-3]
    return feats.reshape((-1,) + feats.shape[-3:]), lambda out: out.reshape(lead + out.shape[1:])


class Align(nn.Module):
    """MGD's ``align``: ``Conv2d(C_in, out_channels, 1)`` with bias when ``C_in != out_channels``,
    identity (no params) otherwise (yzd-v/MGD ``det/mmdet/distillation/losses/mgd.py``).

    ``(..., H, W, C_in) -> (..., H, W, out_channels)``.
    """
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats):
        in_channels = feats.shape[-1]
        if in_channels == self.out_channels:
            return feats
        feats4, back = _as_4d(feats)
        return back(_conv(self.out_channels, 1, in_channels, 'conv', self.dtype)(feats4))


class Generator(nn.Module):
    """MGD's generation block ``Conv3x3(p1) -> ReLU -> Conv3x3(p1)``, C -> C, with bias
    (yzd-v/MGD ``mgd.py``, ``self.generation``). ``(..., H, W, C) -> (..., H, W, channels)``."""
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats):
        feats4, back = _as_4d(feats)
        hidden = nn.relu(_conv(self.channels, 3, 9 * feats.shape[-1], 'conv1', self.dtype)(feats4))
        return back(_conv(self.channels, 3, 9 * self.channels, 'conv2', self.dtype)(hidden))


class BatchStatNorm(nn.Module):
    """BatchNorm that always normalises with the batch statistics (training mode) over every
    axis but the last, biased variance, eps 1e-5, learned ``scale`` (1) and ``bias`` (0); no running
    averages, so no mutable collection. Statistics are computed in float32.

    Under jit with a data-sharded batch the mean/variance are over the global batch (like SyncBN);
    the original's per-GPU ``nn.BatchNorm2d`` with 1 sample/GPU uses one sample's statistics.
    """
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, feats):
        channels = feats.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (channels,))
        bias = self.param('bias', nn.initializers.zeros, (channels,))
        feats32 = feats.astype(jnp.float32)
        axes = tuple(range(feats.ndim - 1))
        mean = jnp.mean(feats32, axes)
        var = jnp.mean(jnp.square(feats32 - mean), axes)
        out = (feats32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return out.astype(feats.dtype)


class BEVUpsampler(nn.Module):
    """The released baseline's ``bev_restore_layers`` that brings a smaller apprentice BEV to the
    expert's resolution (``kd/distillers/heatmap_detection_distiller.py``, ``_make_deconv_layers``).

    Read in the released code: ``num_deconv_layers`` repetitions of
    ``[ConvTranspose2d(C_in, C, 4, stride=2, padding=1, output_padding=0, bias=False),
    BatchNorm2d(C, momentum=0.1), ReLU]``, then **one** ``Conv2d(C, C, 3, padding=1)`` (with bias,
    not repeated). The original sets ``num_deconv_layers = int(H_T / H_S // 2)``, which equals
    log2(factor) only for factors 2 and 4 (the released pair uses 200/100 -> 1 layer); here it is
    log2(factor). ``factor == 1``: identity, no params (the original builds no layers when the
    resolutions match). Later deconvs map C -> C (the original passes ``C_in`` again, which only
    works when ``C_in == C``).

    Each ConvTranspose2d(k4, s2, p1) gives exactly 2H x 2W: flax ``ConvTranspose`` with explicit
    padding ``k - 1 - p = 2`` per side and ``transpose_kernel=True`` (kernel ``(4, 4, C_out, C_in)``
    = torch weight ``(C_in, C_out, 4, 4)`` transposed (2, 3, 1, 0)). BN: ``BatchStatNorm`` (batch
    statistics always; the module is training-only). The kernel init's fan_in is ``16 * C_out``
    for that kernel layout, which is also what PyTorch uses for a ConvTranspose2d weight.

    ``(..., H, W, C_in) -> (..., factor*H, factor*W, channels)``.
    """
    channels: int
    factor: int = 2
    dtype: Any = jnp.float32

    def __post_init__(self):
        factor = self.factor
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            raise ValueError(f'BEVUpsampler factor must be a power of two, got {factor!r}')
        super().__post_init__()

    @nn.compact
    def __call__(self, bev):
        num_layers = self.factor.bit_length() - 1  # log2(factor)
        if num_layers == 0:
            return bev
        out, back = _as_4d(bev)
        for layer in range(num_layers):
            out = nn.ConvTranspose(self.channels, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                                   use_bias=False, transpose_kernel=True, dtype=self.dtype,
                                   kernel_init=torch_kernel_init, name=f'deconv_{layer}')(out)
            out = nn.relu(BatchStatNorm(name=f'bn_{layer}')(out))
        return back(_conv(self.channels, 3, 9 * self.channels, 'conv', self.dtype)(out))
