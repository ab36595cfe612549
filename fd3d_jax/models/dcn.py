"""Modulated deformable convolution (DCNv2), mmcv ``ModulatedDeformConv2dPack`` semantics, in JAX.

Layout is channel-last: ``inputs`` (N, H, W, C_in), ``kernel`` (kh, kw, C_in, C_out) (flax HWIO).

Offset / mask channels (one deformable group). mmcv's CUDA im2col kernel
(``modulated_deform_conv_cuda_kernel.cuh``, ``modulated_deformable_im2col_gpu_kernel``) reads, for
kernel point ``k = i * kw + j`` (row-major over the kernel window),

    offset_h = offset[2 * k],  offset_w = offset[2 * k + 1],  mask = mask[k]

(``data_offset_h_ptr = ((2 * (i * kernel_w + j)) * height_col + h_col) * width_col + w_col`` and
``data_offset_w_ptr`` with ``2 * (...) + 1``). ``ModulatedDeformConv2dPack.forward`` runs a
``conv_offset`` conv with ``3 * kh * kw`` output channels, ``o1, o2, mask = chunk(out, 3)`` and
``offset = cat(o1, o2)``: the chunk+cat is the identity on the first ``2 * kh * kw`` channels, so

    offset = out[..., :2K]   interleaved (dy_0, dx_0, dy_1, dx_1, ...),  K = kh * kw
    mask   = sigmoid(out[..., 2K:3K])

Sampling (same kernel): output pixel ``(ho, wo)`` and kernel point ``(i, j)`` sample the input at
pixel coordinates (integer = pixel centre, no -0.5 shift)

    h = ho * stride_h - pad_h + i * dilation_h + dy
    w = wo * stride_w - pad_w + j * dilation_w + dx

with bilinear interpolation; the sample is 0 unless ``-1 < h < H`` and ``-1 < w < W``; inside, each
of the 4 corners outside ``[0, H-1] x [0, W-1]`` contributes 0 (zero padding). The sample is
multiplied by the mask, then ``out = sum_{k, c} W[k, c, :] * mask_k * sample_k[c] (+ bias)``.
"""
import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IntOrPair = Union[int, Sequence[int]]


def _pair(value: IntOrPair) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(a) for a in value)
    assert len(value) == 2, value
    return value


def deform_conv_output_size(size: int, kernel: int, stride: int, padding: int,
                            dilation: int) -> int:
    """Output length of a (deformable) conv along one axis, PyTorch formula."""
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def bilinear_corners(coord_y, coord_x, height: int, width: int):
    """mmcv DCNv2 bilinear taps at pixel coordinates.

    Args:
      coord_y, coord_x: (...,) float sampling coordinates (pixel centres at integers).
      height, width: input map size.
    Returns:
      idx (..., 4) int32 flat indices ``row * width + col`` (clipped into range) and
      w (..., 4) weights, zero for invalid corners and for points outside ``(-1, H) x (-1, W)``.
    """
    inside = (coord_y > -1) & (coord_x > -1) & (coord_y < height) & (coord_x < width)
    y0 = jnp.floor(coord_y)
    x0 = jnp.floor(coord_x)
    ly, lx = coord_y - y0, coord_x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)
    y1, x1 = y0 + 1, x0 + 1
    idx, wts = [], []
    for yc, xc, wc in ((y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)):
        ok = inside & (yc >= 0) & (yc <= height - 1) & (xc >= 0) & (xc <= width - 1)
        idx.append(jnp.clip(yc, 0, height - 1) * width + jnp.clip(xc, 0, width - 1))
        wts.append(jnp.where(ok, wc, 0.0))
    return jnp.stack(idx, axis=-1), jnp.stack(wts, axis=-1)


def _point_contribution(x_flat, coord_y, coord_x, mask_k, w_k, height: int, width: int):
    """One kernel point: bilinear sample * mask, then (C_in -> C_out) matmul.

    x_flat (N, H*W, C_in); coord_y, coord_x, mask_k (N, Ho, Wo); w_k (C_in, C_out) -> (N, Ho, Wo, C_out).
    """
    num_images, ho, wo = coord_y.shape
    idx, wts = bilinear_corners(coord_y, coord_x, height, width)  # (N, Ho, Wo, 4)
    wts = (wts * mask_k[..., None]).astype(x_flat.dtype)
    idx = idx.reshape(num_images, ho * wo * 4)
    taps = jax.vmap(lambda xf, i: jnp.take(xf, i, axis=0))(x_flat, idx)  # (N, Ho*Wo*4, C_in)
    taps = taps.reshape(num_images, ho, wo, 4, -1)
    sample = jnp.einsum('nhwk,nhwkc->nhwc', wts, taps)           # (N, Ho, Wo, C_in)
    return jnp.einsum('nhwc,co->nhwo', sample, w_k.astype(sample.dtype))


def modulated_deform_conv(inputs, offset, mask, kernel, stride: IntOrPair = 1, padding: IntOrPair = 0,
                          dilation: IntOrPair = 1, bias=None, remat_points: bool = True):
    """Modulated deformable conv v2 (one deformable group, one conv group).

    A ``lax.scan`` over the kh*kw kernel points; each step gathers the 4 bilinear taps of every
    output pixel, applies weights * mask and accumulates ``sample @ kernel[i, j]``.

    Args:
      inputs: (N, H, W, C_in) input.
      offset: (N, Ho, Wo, 2*kh*kw), interleaved ``(dy_k, dx_k)`` per kernel point ``k = i*kw + j``.
      mask: (N, Ho, Wo, kh*kw) modulation (already through the sigmoid).
      kernel: (kh, kw, C_in, C_out).
      stride, padding, dilation: int or (h, w) pair.
      bias: optional (C_out,).
      remat_points: checkpoint the scan body, so that the backward pass recomputes one kernel
        point's gather at a time instead of storing ``4 * kh * kw`` gathered copies of the input
        (grad temp memory ~11x the input instead of ~90x, measured with XLA:CPU memory_analysis
        on (6, 58, 100, 256)).
    Returns:
      (N, Ho, Wo, C_out).
    """
    kh, kw, cin, cout = kernel.shape
    num_images, height, width, channels = inputs.shape
    assert channels == cin, (inputs.shape, kernel.shape)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho = deform_conv_output_size(height, kh, sh, ph, dh)
    wo = deform_conv_output_size(width, kw, sw, pw, dw)
    kk = kh * kw
    assert offset.shape == (num_images, ho, wo, 2 * kk), (offset.shape, (num_images, ho, wo, 2 * kk))
    assert mask.shape == (num_images, ho, wo, kk), (mask.shape, (num_images, ho, wo, kk))

    coord_dtype = jnp.promote_types(offset.dtype, jnp.float32)
    x_flat = inputs.reshape(num_images, height * width, cin)
    base_y = (jnp.arange(ho) * sh - ph).astype(coord_dtype)[None, :, None]
    base_x = (jnp.arange(wo) * sw - pw).astype(coord_dtype)[None, None, :]
    ii, jj = np.meshgrid(np.arange(kh), np.arange(kw), indexing='ij')  # k = i * kw + j
    xs = (jnp.asarray(ii.ravel() * dh, coord_dtype), jnp.asarray(jj.ravel() * dw, coord_dtype),
          jnp.moveaxis(offset.reshape(num_images, ho, wo, kk, 2), 3, 0).astype(coord_dtype),
          jnp.moveaxis(mask, 3, 0), kernel.reshape(kk, cin, cout))

    def body(out, inp):
        di, dj, off, msk, w_k = inp
        coord_y = base_y + di + off[..., 0]
        xx = base_x + dj + off[..., 1]
        return out + _point_contribution(x_flat, coord_y, xx, msk, w_k, height, width), None

    if remat_points:
        body = jax.checkpoint(body)
    out_dtype = jnp.result_type(inputs.dtype, kernel.dtype)
    out, _ = jax.lax.scan(body, jnp.zeros((num_images, ho, wo, cout), out_dtype), xs)
    if bias is not None:
        out = out + bias.astype(out.dtype)
    return out


class ModulatedDeformConv2dPack(nn.Module):
    """DCNv2 layer that acts like a conv (mmcv ``ModulatedDeformConv2dPack``, ``type='DCNv2'``).

    Params: ``kernel`` (kh, kw, C_in, C_out), optional ``bias``, and the sub-conv ``conv_offset``
    (same kernel/stride/padding/dilation, ``3*kh*kw`` outputs, zero-initialised so the layer starts
    as a plain conv with mask 0.5). Input (N, H, W, C_in) -> (N, Ho, Wo, features).
    """
    features: int
    kernel_size: IntOrPair = 3
    strides: IntOrPair = 1
    padding: IntOrPair = 1
    dilation: IntOrPair = 1
    use_bias: bool = False
    deform_groups: int = 1
    dtype: Optional[Any] = None
    # mmcv ModulatedDeformConv2d.init_weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    kernel_init: Callable = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
    remat_points: bool = True

    @nn.compact
    def __call__(self, inputs):
        assert self.deform_groups == 1, 'only deform_groups=1 is implemented'
        kh, kw = _pair(self.kernel_size)
        pad = _pair(self.padding)
        cin = inputs.shape[-1]
        kernel = self.param('kernel', self.kernel_init, (kh, kw, cin, self.features))
        bias = None
        if self.use_bias:
            bias = self.param('bias', nn.initializers.zeros, (self.features,))
        dtype = self.dtype or inputs.dtype
        # Offsets are geometry: in a reduced dtype the offset conv accumulates and returns float32 (its operands
        # stay in the compute dtype: a float32 conv would keep a float32 copy of every DCN input for the backward
        # pass, 0.8 GB in bevformer_base).
        wide = jnp.dtype(dtype) != jnp.float32
        out = nn.Conv(3 * kh * kw, (kh, kw), strides=_pair(self.strides),
                      padding=((pad[0], pad[0]), (pad[1], pad[1])),
                      kernel_dilation=_pair(self.dilation), use_bias=True, dtype=dtype,
                      conv_general_dilated=(functools.partial(jax.lax.conv_general_dilated,
                                                              preferred_element_type=jnp.float32)
                                            if wide else jax.lax.conv_general_dilated),
                      kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                      name='conv_offset')(inputs)
        offset = out[..., :2 * kh * kw]
        mask = jax.nn.sigmoid(out[..., 2 * kh * kw:])
        return modulated_deform_conv(
            inputs.astype(dtype), offset, mask.astype(dtype), kernel.astype(dtype), self.strides,
            self.padding, self.dilation, None if bias is None else bias.astype(dtype),
            remat_points=self.remat_points)
