"""DETR3D (Wang et al., CoRL 2021) in Flax, faithful to WangYueFt/detr3d.

Each object query projects its 3D reference point into every camera and feature level
(``feature_sampling``: ``lidar2img``, ``w' > 1e-5``, normalised by the padded image size, strict
(-1, 1) range in grid coordinates), samples bilinearly (``grid_sample``, align_corners=False, zero
padding — the MSDA core with one head and one point per (camera, level)), and sums the samples
weighted by ``sigmoid(Linear(query)) * mask`` — a learned weighted sum, not an average, as in the
code. Decoder and head are shared with BEVFormer (``fd3d_jax.models.decoder``).

Outputs (dict): ``img_feats`` (list of (B, N, H_l, W_l, C)), the head's ``cls_scores``,
``bbox_preds``, ``queries``, ``references`` and per-layer ``sampling`` (the projected points
``(B, N, NQ, 2)`` in [0, 1], their mask and weights).

``dtype`` (``config.model.dtype``, ``fd3d_jax.models.precision``): the compute precision of the backbone and the
decoder; projections, sampling weights and their sigmoid stay float32.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fd3d_jax.models import box_coder
from fd3d_jax.models.bevformer import ImageFeatures
from fd3d_jax.models.decoder import DetectionHead, layer_norm, xavier_uniform
from fd3d_jax.models.deformable_attention import ms_deform_attn
from fd3d_jax.models.detector import Detector
from fd3d_jax.models.precision import compute_dtype
from fd3d_jax.models.spatial_cross_attention import EPS_DEPTH


def project_reference(reference, pc_range, lidar2img, img_hw):
    """Normalised 3D references (B, NQ, 3) -> (u, v) in [0, 1] (B, N, NQ, 2) and mask (B, N, NQ)
    (in front, and strictly inside the image: DETR3D's ``-1 < 2u - 1 < 1``)."""
    lo = jnp.asarray(pc_range[:3], jnp.float32)
    hi = jnp.asarray(pc_range[3:], jnp.float32)
    pts = reference.astype(jnp.float32) * (hi - lo) + lo
    pts = jnp.concatenate([pts, jnp.ones(pts.shape[:-1] + (1,), jnp.float32)], -1)
    cam = jnp.einsum('bnij,bqj->bnqi', lidar2img.astype(jnp.float32), pts, precision=jax.lax.Precision.HIGHEST)
    depth = cam[..., 2:3]
    uv = cam[..., :2] / jnp.maximum(depth, EPS_DEPTH) / jnp.asarray([img_hw[1], img_hw[0]], jnp.float32)
    grid = 2.0 * uv - 1.0
    mask = (depth[..., 0] > EPS_DEPTH) & jnp.all((grid > -1.0) & (grid < 1.0), -1)
    return jnp.nan_to_num(uv), mask


class Detr3DCrossAttention(nn.Module):
    """``Detr3DCrossAtten`` (num_points=1). context: dict(feats=list of (B, N, H_l, W_l, C),
    lidar2img=(B, N, 4, 4))."""
    img_hw: Sequence[int]
    embed_dims: int = 256
    num_cams: int = 6
    num_levels: int = 4
    dropout: float = 0.1
    pc_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query, query_pos, reference, context, deterministic=True):
        residual = query
        query = query + query_pos
        batch, nq, channels = query.shape
        num_cams, lv = self.num_cams, self.num_levels
        feats = context['feats']
        assert len(feats) == lv, (len(feats), lv)
        attn_logits = nn.Dense(num_cams * lv, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                               dtype=jnp.float32, name='attention_weights')(query).reshape(batch, nq, num_cams, 1, lv)
        uv, mask = project_reference(reference, self.pc_range, context['lidar2img'], self.img_hw)
        weights = (jax.nn.sigmoid(attn_logits)
                   * mask.transpose(0, 2, 1)[..., None, None].astype(attn_logits.dtype))      # (B, NQ, N, 1, L)
        value = jnp.concatenate([f.reshape(batch * num_cams, -1, 1, channels).astype(self.dtype)
                                 for f in feats], 1)                                     # (B*N, S, 1, C)
        shapes = tuple((f.shape[2], f.shape[3]) for f in feats)
        loc = jnp.broadcast_to(uv.reshape(batch * num_cams, nq, 1, 1, 1, 2),
                               (batch * num_cams, nq, 1, lv, 1, 2)).astype(attn_logits.dtype)
        wts = weights.transpose(0, 2, 1, 3, 4).reshape(batch * num_cams, nq, 1, lv, 1)
        out = ms_deform_attn(value, shapes, loc, wts).reshape(batch, num_cams, nq, channels).sum(1)
        out = nn.Dense(channels, kernel_init=xavier_uniform, dtype=self.dtype, name='output_proj')(out)
        pos = box_coder.inverse_sigmoid(reference)
        for layer in range(2):
            pos = nn.relu(layer_norm(f'position_encoder_norm{layer}', self.dtype)(
                nn.Dense(channels, kernel_init=xavier_uniform, dtype=self.dtype,
                         name=f'position_encoder_fc{layer}')(pos)))
        out = nn.Dropout(self.dropout)(out, deterministic=deterministic) + residual + pos
        return out, dict(points=uv, mask=mask, weights=weights)


class DETR3D(Detector):
    """DETR3D (``Detector``): no BEV; the head samples the FPN levels at projected reference points."""

    backbone: dict
    neck: dict
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 512
    dropout: float = 0.1
    num_cams: int = 6
    num_levels: int = 4
    num_points: int = 1
    decoder_layers: int = 6
    num_query: int = 900
    num_classes: int = 10
    pc_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    remat: bool = False
    grid_mask: bool = False               # GridMask on the images in training
    dtype: str = 'float32'                # compute precision ('float32' | 'bfloat16'); params stay float32

    @nn.nowrap
    def build_head(self, img_hw, name=None):
        """The decoder reads the FPN levels of padded images ``img_hw`` (context ``dict(feats=[...],
        lidar2img=(B, N, 4, 4))``)."""
        dtype = compute_dtype(self.dtype)
        cross = functools.partial(Detr3DCrossAttention, tuple(img_hw), self.embed_dims, self.num_cams,
                                  self.num_levels, self.dropout, tuple(self.pc_range), dtype)
        return DetectionHead(self.num_query, self.embed_dims, self.num_heads, self.ffn_dims, self.decoder_layers,
                             self.num_classes, self.dropout, tuple(self.pc_range), cross, self.remat, dtype,
                             name=name)

    @nn.nowrap
    def head_context(self, out, lidar2img):
        return dict(feats=out['img_feats'], lidar2img=lidar2img)

    @nn.compact
    def __call__(self, batch, prev_bev=None, deterministic=True):
        """batch: img (B, T, N, H, W, 3) (the last frame is used), lidar2img (B, T, N, 4, 4). ``prev_bev`` is
        ignored (no BEV: ``Detector.carried_shape``)."""
        del prev_bev
        assert self.num_points == 1, 'DETR3D samples one point per camera and level'
        img = batch['img'][:, -1]
        lidar2img = batch['lidar2img'][:, -1]
        feats = ImageFeatures(dict(self.backbone), dict(self.neck), self.grid_mask, compute_dtype(self.dtype),
                              name='image_features')(img, deterministic)
        out = dict(img_feats=feats)
        head = self.build_head(img.shape[2:4], name='head')
        return dict(head(self.head_context(out, lidar2img), img.shape[0], deterministic), img_feats=feats)
