"""Multi-scale deformable attention (Deformable DETR / mmcv), the core of all three BEVFormer
attentions and of DETR3D's feature sampling.

Sampling convention (mmcv CUDA kernel = ``grid_sample(align_corners=False, padding_mode='zeros')``):
a normalised location (x, y) of level l is the pixel coordinate ``(x * W_l - 0.5, y * H_l - 0.5)``;
bilinear interpolation over the four neighbouring pixel centres, each corner outside the map
contributing zero.

``ms_deform_attn`` bounds memory: the gathered ``(B, M, Q, P, 4 corners, D)`` tensor is only built
for one block of queries at a time (``lax.map`` over query blocks), and the block function is
``jax.checkpoint``-ed so the backward pass recomputes each block's gather instead of storing it.
``ms_deform_attn_reference`` is the direct version (tests compare both with numpy).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_BYTES = 64 << 20  # gathered bytes per query block
xavier_uniform = nn.initializers.xavier_uniform()


def grid_init_bias(num_heads, num_levels, num_points):
    """Deformable-DETR's ``sampling_offsets`` bias (M, L, P, 2): head m points along
    ``(cos, sin)(2 pi m / M)`` scaled to the unit square's boundary, point p at radius p + 1."""
    theta = np.arange(num_heads) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.broadcast_to(grid[:, None, None, :], (num_heads, num_levels, num_points, 2))
    return (grid * (np.arange(num_points) + 1.0)[None, None, :, None]).astype(np.float32)


def _sample_level(value, height, width, loc, attn):
    """One level. value (B, M, H*W, D); loc (B, M, q, P, 2); attn (B, M, q, P) -> (B, M, q, D)."""
    x = loc[..., 0].astype(jnp.float32) * width - 0.5
    y = loc[..., 1].astype(jnp.float32) * height - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    lx, ly = x - x0, y - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    idx, wts = [], []
    for dy, dx, w in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yi, xi = y0 + dy, x0 + dx
        inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
        idx.append(jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1))
        wts.append(jnp.where(inside, w, 0.0))
    b, m, q, p = attn.shape
    idx = jnp.stack(idx, -1).reshape(b, m, q * p * 4)
    wts = (jnp.stack(wts, -1) * attn.astype(jnp.float32)[..., None]).reshape(b, m, q, p * 4)
    gather = jax.vmap(jax.vmap(lambda v, i: jnp.take(v, i, axis=0, mode='clip')))
    taps = gather(value, idx).reshape(b, m, q, p * 4, -1)
    return jnp.einsum('bmqk,bmqkd->bmqd', wts.astype(value.dtype), taps)


def _split_levels(value, spatial_shapes):
    """(B, S, M, D) -> list of (B, M, H_l * W_l, D)."""
    sizes = [h * w for h, w in spatial_shapes]
    assert sum(sizes) == value.shape[1], (spatial_shapes, value.shape)
    starts = np.cumsum([0] + sizes)
    return [jnp.moveaxis(value[:, starts[i]:starts[i + 1]], 2, 1) for i in range(len(sizes))]


def _attend(levels, spatial_shapes, loc, attn):
    """levels: per-level (B, M, HW, D); loc (B, M, q, L, P, 2); attn (B, M, q, L, P) -> (B, M, q, D)."""
    out = 0.0
    for lvl, (h, w) in enumerate(spatial_shapes):
        out = out + _sample_level(levels[lvl], h, w, loc[:, :, :, lvl], attn[:, :, :, lvl])
    return out


def ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights):
    """Direct (unblocked) MSDA. value (B, S, M, D); spatial_shapes ((H_l, W_l), ...);
    sampling_locations (B, Q, M, L, P, 2) normalised (x, y); attention_weights (B, Q, M, L, P)
    -> (B, Q, M * D)."""
    b, q, m = sampling_locations.shape[:3]
    levels = _split_levels(value, spatial_shapes)
    out = _attend(levels, spatial_shapes, jnp.moveaxis(sampling_locations, 2, 1),
                  jnp.moveaxis(attention_weights, 2, 1))
    return jnp.moveaxis(out, 1, 2).reshape(b, q, -1)


def query_block_size(value, sampling_locations, block_bytes=DEFAULT_BLOCK_BYTES):
    """Queries per block so that the gathered taps of a block take about ``block_bytes``."""
    b, _, m, lv, p, _ = sampling_locations.shape
    per_query = b * m * lv * p * 4 * value.shape[-1] * max(jnp.dtype(value.dtype).itemsize, 4) * 2
    return max(1, block_bytes // per_query)


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, *, query_block=None,
                   block_bytes=DEFAULT_BLOCK_BYTES):
    """Memory-bounded MSDA, numerically equal to ``ms_deform_attn_reference`` (same shapes).

    Queries are processed in blocks of ``query_block`` (default: from ``block_bytes``) with
    ``lax.map`` over a rematerialised block function; Q is padded to a multiple of the block.
    """
    spatial_shapes = tuple(tuple(int(v) for v in s) for s in spatial_shapes)
    b, q, m, lv, p, _ = sampling_locations.shape
    block = int(query_block or query_block_size(value, sampling_locations, block_bytes))
    if block >= q:
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    levels = _split_levels(value, spatial_shapes)
    nb = -(-q // block)
    pad = nb * block - q
    loc = jnp.pad(sampling_locations, ((0, 0), (0, pad)) + ((0, 0),) * 4)
    attn = jnp.pad(attention_weights, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    # (B, nb*block, M, ...) -> (nb, B, M, block, ...)
    loc = jnp.moveaxis(loc.reshape(b, nb, block, m, lv, p, 2), (1, 3), (0, 2))
    attn = jnp.moveaxis(attn.reshape(b, nb, block, m, lv, p), (1, 3), (0, 2))

    @jax.checkpoint
    def one_block(args):
        return _attend(levels, spatial_shapes, *args)

    out = jax.lax.map(one_block, (loc, attn))                      # (nb, B, M, block, D)
    out = jnp.moveaxis(out, (0, 1, 2), (1, 0, 3)).reshape(b, nb * block, m, -1)[:, :q]
    return out.reshape(b, q, -1)


class MSDeformableAttention(nn.Module):
    """mmcv ``MultiScaleDeformableAttention`` / BEVFormer ``CustomMSDeformableAttention``:
    ``value_proj``, ``sampling_offsets`` (weight 0, bias ``grid_init_bias``), ``attention_weights``
    (0; softmax over L*P per head), ``output_proj`` (xavier), dropout, residual (query before pos).

    query (B, Q, C), value (B, S, C), reference_points (B, Q, L, 2) normalised (x, y) ->
    (B, Q, C) and dict(sampling_locations (B, Q, M, L, P, 2), attention_weights (B, Q, M, L, P)).
    """
    embed_dims: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    dropout: float = 0.1

    @nn.compact
    def __call__(self, query, value, reference_points, spatial_shapes, query_pos=None, deterministic=True):
        identity = query
        if query_pos is not None:
            query = query + query_pos
        b, nq, c = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        v = nn.Dense(c, kernel_init=xavier_uniform, name='value_proj')(value).reshape(b, -1, m, c // m)
        bias = grid_init_bias(m, lv, p)
        off = nn.Dense(m * lv * p * 2, kernel_init=nn.initializers.zeros,
                       bias_init=lambda key, shape, dtype=jnp.float32: jnp.asarray(bias, dtype).reshape(shape),
                       name='sampling_offsets')(query).reshape(b, nq, m, lv, p, 2)
        attn = nn.Dense(m * lv * p, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                        name='attention_weights')(query)
        attn = jax.nn.softmax(attn.reshape(b, nq, m, lv * p), -1).reshape(b, nq, m, lv, p)
        normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], query.dtype)
        loc = reference_points[:, :, None, :, None, :].astype(query.dtype) + off / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(v, spatial_shapes, loc, attn)
        out = nn.Dense(c, kernel_init=xavier_uniform, name='output_proj')(out)
        out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
        return out + identity, dict(sampling_locations=loc, attention_weights=attn)
