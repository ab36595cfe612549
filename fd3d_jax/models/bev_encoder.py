"""BEVFormer's encoder: layers of ``TSA -> LN -> SCA -> LN -> FFN -> LN`` on the BEV queries.

With a previous BEV, every layer's TSA value is ``[rotated previous BEV, the initial BEV queries]``
(the "current" half stays the initial queries across layers); without one it is ``[x, x]`` from the
layer input. Both cases are computed per sample with the ``prev_exists`` flag (static shapes).
"""
import flax.linen as nn
import jax.numpy as jnp

from fd3d_jax.models.decoder import FFN, layer_norm
from fd3d_jax.models.spatial_cross_attention import SpatialCrossAttention
from fd3d_jax.models.temporal_self_attention import TemporalSelfAttention


class EncoderLayer(nn.Module):
    embed_dims: int
    num_heads: int
    ffn_dims: int
    num_levels: int
    sca_points: int
    tsa_points: int
    num_z_anchors: int
    bev_hw: tuple
    dropout: float = 0.1
    tsa_batch_bug: bool = False
    sca_batch0_hits: bool = False

    @nn.compact
    def __call__(self, x, bev_pos, prev_stack, prev_exists, ref_hybrid, feats, spatial_shapes, ref_cam,
                 bev_mask, deterministic=True):
        own = jnp.stack([x, x], 1)
        value = jnp.where(prev_exists[:, None, None, None], prev_stack, own)
        x, tsa = TemporalSelfAttention(self.embed_dims, self.num_heads, self.tsa_points, self.dropout,
                                       self.tsa_batch_bug, name='tsa')(x, bev_pos, value, ref_hybrid,
                                                                       self.bev_hw, deterministic)
        x = layer_norm('norm1')(x)
        x, sca = SpatialCrossAttention(self.embed_dims, self.num_heads, self.num_levels, self.sca_points,
                                       self.num_z_anchors, self.dropout, self.sca_batch0_hits,
                                       name='sca')(x, feats, spatial_shapes, ref_cam, bev_mask, deterministic)
        x = layer_norm('norm2')(x)
        x = FFN(self.embed_dims, self.ffn_dims, self.dropout, name='ffn')(x, deterministic)
        return layer_norm('norm3')(x), dict(tsa=tsa, sca=sca)


class BEVEncoder(nn.Module):
    num_layers: int
    layer_kwargs: dict
    remat: bool = False

    @nn.compact
    def __call__(self, bev_query, bev_pos, prev_bev, prev_exists, ref_hybrid, feats, spatial_shapes,
                 ref_cam, bev_mask, deterministic=True):
        """bev_query, bev_pos, prev_bev (B, Q, C); prev_exists (B,); ref_hybrid (B, 2, Q, 2);
        feats (B, N, S, C); ref_cam (B, N, Q, D, 2); bev_mask (B, N, Q, D) -> (B, Q, C), samplings."""
        prev_stack = jnp.stack([prev_bev, bev_query], 1)
        layer_cls = nn.remat(EncoderLayer, static_argnums=(7, 10)) if self.remat else EncoderLayer
        x, samplings = bev_query, []
        for i in range(self.num_layers):
            x, sampling = layer_cls(**self.layer_kwargs, name=f'layers_{i}')(
                x, bev_pos, prev_stack, prev_exists, ref_hybrid, feats, tuple(spatial_shapes), ref_cam,
                bev_mask, deterministic)
            samplings.append(sampling)
        return x, samplings
