"""BEVFormer's spatial cross-attention (SCA): BEV pillars read the six cameras' features.

Layouts are batch-major (the original is camera-major): reference points (B, N, Q, D, 2), masks
(B, N, Q, D), image features flattened over levels (B, N, S, C) with S = sum(H_l * W_l).

**Deviation (exact for B = 1):** the original gathers, per camera, the BEV queries that hit it
(``bev_mask`` true for any Z anchor), pads them to ``max_len`` and runs ``MSDeformableAttention3D``
on that rebatched set, then scatters the results back and divides by the number of hit cameras.
MSDA is independent per query, so running it densely on all Q queries for every camera,
multiplying each camera's output by its hit mask, summing over cameras and dividing by
``max(1, #hits)`` gives the same numbers with static shapes (cost: N / mean-hits more sampling).
The original takes the hit lists from batch element 0 for every element but divides each element's sum by
its own hit count (``sca_batch0_hits`` reproduces that; the default uses each element's own hits for both).

**Sparse (``max_cameras = K > 0``):** each query samples only K camera slots (``camera_slots``: the cameras it
hits, lowest index first, then unhit cameras with weight 0), through ``ms_deform_attn``'s ``value_index``; K / N
of the dense sampling, static shapes. Exactly the dense result when no query hits more than K cameras (on the
nuScenes rig no BEV query hits more than 2: ``experiments/sca_camera_hits.py``); a query hitting more keeps its
K lowest-index cameras and averages over those (``dropped`` counts the hits left out). The original has no such
limit: K = N is always exact.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.models.deformable_attention import grid_init_bias, ms_deform_attn

EPS_DEPTH = 1e-5
xavier_uniform = nn.initializers.xavier_uniform()


def grid_init(num_heads, num_levels, num_points):
    """Bias initializer of ``sampling_offsets``: Deformable-DETR's head-direction grid."""
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(grid_init_bias(num_heads, num_levels, num_points), dtype).reshape(shape)
    return init


def reference_points_3d(bev_h, bev_w, num_points_in_pillar, z_size):
    """Normalised pillar points (D, Q, 3) as (x, y, z) in [0, 1]: ``x = (j + .5) / W``,
    ``y = (i + .5) / H`` for ``q = i * W + j``, and D anchors ``linspace(.5, Z - .5, D) / Z`` with Z the pillar
    height in metres (the original passes ``pc_range[5] - pc_range[2]``; 8 for the shipped range)."""
    zs = np.linspace(0.5, z_size - 0.5, num_points_in_pillar) / z_size
    ys, xs = np.meshgrid((np.arange(bev_h) + 0.5) / bev_h, (np.arange(bev_w) + 0.5) / bev_w, indexing='ij')
    xy = np.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    return np.concatenate([np.broadcast_to(xy, (len(zs),) + xy.shape),
                           np.broadcast_to(zs[:, None, None], (len(zs), len(xy), 1))], -1).astype(np.float32)


def camera_slots(hit, max_cameras):
    """hit (B, N, Q) bool -> (cameras (B, Q, K) int32, kept (B, Q, K) bool, dropped (B, Q) int32): per query the
    K = ``max_cameras`` cameras it hits, lowest index first, padded with the lowest unhit ones (``kept`` False);
    ``dropped`` = hits beyond K."""
    num_cams = hit.shape[1]
    rank = jnp.where(hit, 2 * num_cams, num_cams) - jnp.arange(num_cams)[None, :, None]   # hits first, low index first
    _, cameras = jax.lax.top_k(jnp.moveaxis(rank, 1, -1), max_cameras)
    kept = jnp.take_along_axis(jnp.moveaxis(hit, 1, -1), cameras, -1)
    return cameras.astype(jnp.int32), kept, hit.sum(1).astype(jnp.int32) - kept.sum(-1).astype(jnp.int32)


def reference_points_2d(bev_h, bev_w):
    """Normalised BEV cell centres (Q, 2) as (x, y)."""
    return reference_points_3d(bev_h, bev_w, 1, 1.0)[0, :, :2]


def point_sampling(ref_3d, pc_range, lidar2img, img_hw):
    """Projects pillar points into every camera (BEVFormer ``point_sampling``, float32).

    Args:
      ref_3d: (D, Q, 3) normalised points; pc_range: 6 floats; lidar2img: (B, N, 4, 4);
      img_hw: padded (H, W) the projections are normalised by.
    Returns:
      ref_cam (B, N, Q, D, 2) normalised (u, v) and bev_mask (B, N, Q, D): in front of the camera
      (``w' > 1e-5``) and strictly inside (0, 1)^2; masked points keep their (possibly wild) values.
    """
    lo = jnp.asarray(pc_range[:3], jnp.float32)
    hi = jnp.asarray(pc_range[3:], jnp.float32)
    pts = jnp.asarray(ref_3d, jnp.float32) * (hi - lo) + lo                       # (D, Q, 3)
    pts = jnp.concatenate([pts, jnp.ones(pts.shape[:-1] + (1,), jnp.float32)], -1)
    cam = jnp.einsum('bnij,dqj->bnqdi', lidar2img.astype(jnp.float32), pts,
                     precision=jax.lax.Precision.HIGHEST)                          # (B, N, Q, D, 4)
    depth = cam[..., 2:3]
    mask = depth[..., 0] > EPS_DEPTH
    uv = cam[..., 0:2] / jnp.maximum(depth, EPS_DEPTH)
    uv = uv / jnp.asarray([img_hw[1], img_hw[0]], jnp.float32)
    mask &= (uv[..., 1] > 0) & (uv[..., 1] < 1) & (uv[..., 0] > 0) & (uv[..., 0] < 1)
    return jnp.nan_to_num(uv), mask


class SpatialCrossAttention(nn.Module):
    """SCA with its inner ``MSDeformableAttention3D`` (``value_proj``, ``sampling_offsets``,
    ``attention_weights``) and the outer ``output_proj`` + dropout + residual (no query_pos)."""
    embed_dims: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 8
    num_z_anchors: int = 4
    dropout: float = 0.1
    sca_batch0_hits: bool = False
    max_cameras: int = 0                  # 0: dense over all N cameras; K > 0: K camera slots per query
    dtype: Any = jnp.float32              # projections; offsets, softmax and locations in float32

    @nn.compact
    def __call__(self, query, feats, spatial_shapes, ref_cam, bev_mask, deterministic=True):
        """query (B, Q, C); feats (B, N, S, C); ref_cam (B, N, Q, D, 2); bev_mask (B, N, Q, D).
        Returns (B, Q, C) and the sampling dict (locations (B, N, Q, M, L, P, 2), weights)."""
        batch, nq, channels = query.shape
        num_cams = feats.shape[1]
        num_heads, lv, num_points, num_anchors = self.num_heads, self.num_levels, self.num_points, self.num_z_anchors
        assert len(spatial_shapes) == lv and num_points % num_anchors == 0, (spatial_shapes, num_points, num_anchors)
        inner = 'deformable_attention'
        value = nn.Dense(channels, kernel_init=xavier_uniform, dtype=self.dtype, name=f'{inner}_value_proj')(feats)
        value = value.reshape(batch * num_cams, -1, num_heads, channels // num_heads)
        # Offsets and weights depend on the query only, which is the same for every camera.
        off = nn.Dense(num_heads * lv * num_points * 2, kernel_init=nn.initializers.zeros,
                       bias_init=grid_init(num_heads, lv, num_points), dtype=jnp.float32,
                       name=f'{inner}_sampling_offsets')(query)
        off = off.reshape(batch, nq, num_heads, lv, num_points // num_anchors, num_anchors, 2)
        normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], off.dtype)
        off = off / normalizer[None, None, None, :, None, None, :]
        attn = nn.Dense(num_heads * lv * num_points, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                        dtype=jnp.float32, name=f'{inner}_attention_weights')(query)
        attn = jax.nn.softmax(attn.reshape(batch, nq, num_heads, lv * num_points), -1).reshape(
            batch, nq, num_heads, lv, num_points)
        if self.max_cameras:
            assert not self.sca_batch0_hits, 'sca_batch0_hits is a dense-only quirk'
            slots, aux = self.sparse(value, off, attn, spatial_shapes, ref_cam, bev_mask)
        else:
            slots, aux = self.dense(value, off, attn, spatial_shapes, ref_cam, bev_mask)
        slots = nn.Dense(channels, kernel_init=xavier_uniform, dtype=self.dtype, name='output_proj')(slots)
        slots = nn.Dropout(self.dropout)(slots, deterministic=deterministic)
        return slots + query, aux

    def dense(self, value, off, attn, spatial_shapes, ref_cam, bev_mask):
        """Every camera for every query, masked: value (B*N, S, M, Dh); off (B, Q, M, L, P/D, D, 2) normalised;
        attn (B, Q, M, L, P); ref_cam (B, N, Q, D, 2); bev_mask (B, N, Q, D) -> (slots (B, Q, C) averaged over
        hit cameras, the sampling dict)."""
        batch, num_cams, nq = bev_mask.shape[:3]
        # Anchor index fastest: point k * D + z samples around the projection of anchor z.
        ref = ref_cam.astype(off.dtype)[:, :, :, None, None, None, :, :]          # (B, N, Q, 1, 1, 1, D, 2)
        loc = (ref + off[:, None]).reshape(batch, num_cams, nq, *attn.shape[2:], 2)
        weights = jnp.broadcast_to(attn[:, None], (batch, num_cams) + attn.shape[1:])
        out = ms_deform_attn(value, tuple(spatial_shapes), loc.reshape(batch * num_cams, nq, *attn.shape[2:], 2),
                             weights.reshape(batch * num_cams, nq, *attn.shape[2:]))
        out = out.reshape(batch, num_cams, nq, -1)
        hit = bev_mask.any(-1).astype(out.dtype)                                   # (B, N, Q)
        count = jnp.maximum(hit.sum(1), 1.0)[..., None]                            # each element's own
        if self.sca_batch0_hits:   # the queries summed are element 0's, the count stays per element
            hit = jnp.broadcast_to(hit[:1], hit.shape)
        slots = jnp.einsum('bnqc,bnq->bqc', out, hit) / count
        return slots, dict(sampling_locations=loc, attention_weights=attn, hit=hit)

    def sparse(self, value, off, attn, spatial_shapes, ref_cam, bev_mask):
        """The K-slot SCA: value (B*N, S, M, Dh); off (B, Q, M, L, P/D, D, 2) normalised; attn (B, Q, M, L, P);
        ref_cam (B, N, Q, D, 2); bev_mask (B, N, Q, D) -> (slots (B, Q, C) averaged over kept cameras,
        dict(dropped=(B, Q) hits left out))."""
        batch, num_cams, nq = bev_mask.shape[:3]
        num_slots = min(self.max_cameras, num_cams)
        cameras, kept, dropped = camera_slots(bev_mask.any(-1), num_slots)                 # (B, Q, K)
        ref = jnp.take_along_axis(jnp.moveaxis(ref_cam, 1, 2), cameras[..., None, None], 2)  # (B, Q, K, D, 2)
        ref = ref.astype(off.dtype)[:, :, :, None, None, None, :, :]
        loc = (ref + off[:, :, None]).reshape(batch, nq * num_slots, *attn.shape[2:], 2)
        weights = jnp.broadcast_to(attn[:, :, None], (batch, nq, num_slots) + attn.shape[2:])
        value_index = jnp.arange(batch, dtype=jnp.int32)[:, None, None] * num_cams + cameras
        out = ms_deform_attn(value, tuple(spatial_shapes), loc, weights.reshape(batch, nq * num_slots, *attn.shape[2:]),
                             value_index=value_index.reshape(batch, nq * num_slots))
        out = out.reshape(batch, nq, num_slots, -1)
        count = jnp.maximum(kept.sum(-1), 1).astype(out.dtype)[..., None]
        return jnp.einsum('bqkc,bqk->bqc', out, kept.astype(out.dtype)) / count, dict(dropped=dropped)
