"""BEVFormer's encoder: layers of ``TSA -> LN -> SCA -> LN -> FFN -> LN`` on the BEV queries.

With a previous BEV, every layer's TSA value is ``[rotated previous BEV, the initial BEV queries]``
(the "current" half stays the initial queries across layers); without one it is ``[bev, bev]`` from
the layer input. Both cases are computed per sample with the ``prev_exists`` flag (static shapes).

The layers run as one ``nn.scan`` (parameters stacked on axis 0 under ``layers``), optionally
rematerialised: the backward pass then keeps one (B, Q, C) BEV per layer and recomputes one
layer at a time, whatever the backend's scheduler does with unrolled checkpoints.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fd3d_jax.models.decoder import FFN, layer_norm
from fd3d_jax.models.spatial_cross_attention import SpatialCrossAttention
from fd3d_jax.models.temporal_self_attention import TemporalSelfAttention


class EncoderLayer(nn.Module):
    """One layer as a scan step: (bev, broadcast inputs...) -> (bev, None)."""
    embed_dims: int
    num_heads: int
    ffn_dims: int
    num_levels: int
    sca_points: int
    tsa_points: int
    num_z_anchors: int
    bev_hw: tuple
    spatial_shapes: tuple
    deterministic: bool = True
    dropout: float = 0.1
    tsa_batch_bug: bool = False
    sca_batch0_hits: bool = False
    sca_max_cameras: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, bev, bev_pos, prev_stack, prev_exists, ref_hybrid, feats, ref_cam, bev_mask):
        det = self.deterministic
        value = jnp.where(prev_exists[:, None, None, None], prev_stack, jnp.stack([bev, bev], 1))
        bev, _ = TemporalSelfAttention(self.embed_dims, self.num_heads, self.tsa_points, self.dropout,
                                       self.tsa_batch_bug, self.dtype,
                                       name='tsa')(bev, bev_pos, value, ref_hybrid, self.bev_hw, det)
        bev = layer_norm('norm1', self.dtype)(bev)
        bev, _ = SpatialCrossAttention(self.embed_dims, self.num_heads, self.num_levels, self.sca_points,
                                       self.num_z_anchors, self.dropout, self.sca_batch0_hits, self.sca_max_cameras,
                                       self.dtype, name='sca')(bev, feats, self.spatial_shapes, ref_cam, bev_mask, det)
        bev = layer_norm('norm2', self.dtype)(bev)
        bev = FFN(self.embed_dims, self.ffn_dims, self.dropout, self.dtype, name='ffn')(bev, det)
        return layer_norm('norm3', self.dtype)(bev), None


class BEVEncoder(nn.Module):
    num_layers: int
    layer_kwargs: dict
    remat: bool = False

    @nn.compact
    def __call__(self, bev_query, bev_pos, prev_bev, prev_exists, ref_hybrid, feats, spatial_shapes,
                 ref_cam, bev_mask, deterministic=True):
        """bev_query, bev_pos, prev_bev (B, Q, C); prev_exists (B,); ref_hybrid (B, 2, Q, 2);
        feats (B, N, S, C); ref_cam (B, N, Q, D, 2); bev_mask (B, N, Q, D) -> (B, Q, C)."""
        prev_stack = jnp.stack([prev_bev, bev_query], 1)
        step = nn.remat(EncoderLayer, prevent_cse=False) if self.remat else EncoderLayer
        layers = nn.scan(step, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                         in_axes=(nn.broadcast,) * 7, length=self.num_layers)
        bev, _ = layers(**self.layer_kwargs, spatial_shapes=tuple(tuple(s) for s in spatial_shapes),
                        deterministic=deterministic, name='layers')(
            bev_query, bev_pos, prev_stack, prev_exists, ref_hybrid, feats, ref_cam, bev_mask)
        return bev
