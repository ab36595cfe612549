"""BEVFormer's temporal self-attention (TSA): BEV queries read the aligned previous BEV and
themselves with deformable attention; the two queue entries are averaged.

The ego-motion alignment is host-side metadata (``fd3d_jax.data.geometry.bev_shift`` and
``bev_rotation_index``): the shift moves the reference points of the previous-BEV half, the rotation
is a nearest-neighbour gather of the previous BEV (``rotate_prev_bev``).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fd3d_jax.models.deformable_attention import ms_deform_attn
from fd3d_jax.models.spatial_cross_attention import grid_init, xavier_uniform

NUM_BEV_QUEUE = 2


def rotate_bev(bev, index, valid):
    """Applies a rotation index map: bev (B, Q, C), index/valid (B, Q) -> (B, Q, C)."""
    rotated = jnp.take_along_axis(bev, index[..., None].astype(jnp.int32), axis=1)
    return jnp.where(valid[..., None], rotated, jnp.zeros_like(rotated))


def hybrid_reference_points(ref_2d, shift, prev_exists, reproduce_shift_bug=False):
    """TSA reference points (B, 2, Q, 2): the previous-BEV half shifted by ``shift`` (B, 2) when a
    previous BEV exists, the current half unshifted — or shifted too with ``reproduce_shift_bug``
    (the in-place ``+=`` of the code that produced the paper's checkpoints; HEAD clones)."""
    ref = jnp.broadcast_to(ref_2d, shift.shape[:1] + ref_2d.shape)
    shifted = ref + shift[:, None, :]
    prev = jnp.where(prev_exists[:, None, None], shifted, ref)
    cur = jnp.where(prev_exists[:, None, None], shifted, ref) if reproduce_shift_bug else ref
    return jnp.stack([prev, cur], 1)


class TemporalSelfAttention(nn.Module):
    """TSA (``num_bev_queue=2``, one BEV level): value = [previous BEV, current queries]."""
    embed_dims: int = 256
    num_heads: int = 8
    num_points: int = 4
    dropout: float = 0.1
    tsa_batch_bug: bool = False
    dtype: Any = jnp.float32              # projections; offsets, softmax and locations in float32

    @nn.compact
    def __call__(self, query, query_pos, value, ref_hybrid, bev_hw, deterministic=True):
        """query, query_pos (B, Q, C); value (B, 2, Q, C) = [prev (rotated), current]; ref_hybrid
        (B, 2, Q, 2). Returns (B, Q, C) and the sampling dict (locations (B, 2, Q, M, 1, P, 2))."""
        batch, nq, channels = query.shape
        num_heads, num_points, nv = self.num_heads, self.num_points, NUM_BEV_QUEUE
        identity = query
        query = query + query_pos
        # The offset/weight input is [value[:B], query]; value is queue-major per sample, so for
        # B > 1 the original's value[:B] picks (b0-prev, b0-cur, b1-prev, ...) (tsa_batch_bug).
        first = value.reshape(batch * nv, nq, channels)[:batch] if self.tsa_batch_bug else value[:, 0]
        q_in = jnp.concatenate([first, query], -1)
        proj_value = nn.Dense(channels, kernel_init=xavier_uniform, dtype=self.dtype, name='value_proj')(
            value).reshape(batch * nv, nq, num_heads, channels // num_heads)
        off = nn.Dense(num_heads * nv * num_points * 2, kernel_init=nn.initializers.zeros,
                       bias_init=grid_init(num_heads, nv, num_points), dtype=jnp.float32,
                       name='sampling_offsets')(q_in).reshape(batch, nq, num_heads, nv, 1, num_points, 2)
        attn = nn.Dense(num_heads * nv * num_points, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                        dtype=jnp.float32, name='attention_weights')(q_in)
        attn = jax.nn.softmax(attn.reshape(batch, nq, num_heads, nv, num_points), -1).reshape(
            batch, nq, num_heads, nv, 1, num_points)
        off = jnp.moveaxis(off, 3, 1).reshape(batch * nv, nq, num_heads, 1, num_points, 2)
        attn = jnp.moveaxis(attn, 3, 1).reshape(batch * nv, nq, num_heads, 1, num_points)
        normalizer = jnp.asarray([bev_hw[1], bev_hw[0]], off.dtype)
        loc = ref_hybrid.reshape(batch * nv, nq, 1, 1, 1, 2).astype(off.dtype) + off / normalizer
        out = ms_deform_attn(proj_value, (tuple(bev_hw),), loc, attn).reshape(batch, nv, nq, channels).mean(1)
        out = nn.Dense(channels, kernel_init=xavier_uniform, dtype=self.dtype, name='output_proj')(out)
        out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
        return out + identity, dict(sampling_locations=loc.reshape(batch, nv, nq, num_heads, 1, num_points, 2),
                                    attention_weights=attn.reshape(batch, nv, nq, num_heads, 1, num_points))
