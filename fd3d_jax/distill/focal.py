"""Focal features: what the distillation head's queries read at their sampling points, from the
expert's and the apprentice's features at the same points.

BEVFormer (released fact, ``distill_branch/decoderDistiller.py`` of OpenDriveLab/Birds-eye-view-
Perception, ``CustomMSDeformableAttentionDistiller``): each decoder layer's deformable cross-attention
samples ``value_proj(BEV)`` at its (query, head, point) locations with its attention weights; the
distiller runs the same locations and weights on the expert BEV and on the apprentice BEV through the
same ``value_proj`` and keeps both aggregated vectors ((B, Q, C) each, before ``output_proj``, after
``nan_to_num``). The loss on these pairs was never released (``losses.focal_loss``).

DETR3D (reconstruction: the paper gives no detail): a query samples each camera and FPN level at
its projected 3D reference point (no learned offsets, no value projection) and sums the samples with
``sigmoid(Linear(query)) * in-image``; the focal features are that sum taken on the expert's and on
the apprentice's FPN levels, over the levels the two share (equal spatial size).

Locations, weights and ``value_proj`` are passed through ``stop_gradient``: the distillation loss must
reach only the apprentice features (shrinking ``value_proj`` or moving the points to flat regions
would otherwise zero the loss).
"""
import jax
import jax.numpy as jnp

from fd3d_jax.models.deformable_attention import ms_deform_attn


def _value_proj(head_params, layer):
    proj = head_params[f'layers_{layer}']['cross_attn']['attn']['value_proj']
    return jax.lax.stop_gradient(proj['kernel']), jax.lax.stop_gradient(proj['bias'])


def bev_focal_features(head_params, sampling, apprentice_bev, expert_bev, num_heads):
    """Per-layer aggregated features of the apprentice and expert BEVs, in ``losses.focal_loss``'s order.

    Args:
      head_params: the distillation head's params (``params['head']`` layout, ``layers_{l}``).
      sampling: per layer dict(sampling_locations (B, Q, M, 1, P, 2), attention_weights (B, Q, M, 1, P)).
      apprentice_bev, expert_bev: (B, H, W, C) apprentice and expert BEV on the same grid (row = y, column = x).
      num_heads: M.
    Returns:
      (apprentice_feats, expert_feats), each (L, B, Q, C).
    """
    batch, height, width, channels = expert_bev.shape
    assert apprentice_bev.shape == expert_bev.shape, (apprentice_bev.shape, expert_bev.shape)
    expert_feats, apprentice_feats = [], []
    for layer, layer_sampling in enumerate(sampling):
        kernel, bias = _value_proj(head_params, layer)
        locations = jax.lax.stop_gradient(layer_sampling['sampling_locations'])
        weights = jax.lax.stop_gradient(layer_sampling['attention_weights'])
        for bev, acc in ((expert_bev, expert_feats), (apprentice_bev, apprentice_feats)):
            value = (bev.reshape(batch, height * width, channels) @ kernel.astype(bev.dtype) + bias.astype(bev.dtype))
            out = ms_deform_attn(value.reshape(batch, height * width, num_heads, channels // num_heads),
                                 ((height, width),), locations, weights)
            acc.append(jnp.nan_to_num(out))
    return jnp.stack(apprentice_feats), jnp.stack(expert_feats)


def pv_focal_features(sampling, apprentice_levels, expert_levels):
    """DETR3D's per-layer sums of projected-reference samples on apprentice and expert FPN levels, in
    ``losses.focal_loss``'s order.

    Args:
      sampling: per layer dict(points (B, N, Q, 2) in [0, 1], weights (B, Q, N, 1, L_e)) of the
        distillation head (the expert's DETR3D head).
      apprentice_levels: list like ``expert_levels`` with the (aligned) apprentice level of the same size, or
        None where the apprentice has none (that level is left out of both sums).
      expert_levels: the expert's levels, list of (B, N, H_l, W_l, C).
    Returns:
      (apprentice_feats, expert_feats), each (L, B, Q, C).
    """
    levels = [index for index, feat in enumerate(apprentice_levels) if feat is not None]
    if not levels:
        raise ValueError('DETR3D focal distillation needs at least one FPN level of equal size in the '
                         'expert and the apprentice')
    batch, cams = expert_levels[0].shape[:2]
    shapes = tuple(expert_levels[level].shape[2:4] for level in levels)

    def table(feats):
        return jnp.concatenate([feats[level].reshape(batch * cams, -1, 1, feats[level].shape[-1])
                                for level in levels], 1)

    expert_value, apprentice_value = table(expert_levels), table(apprentice_levels)
    expert_feats, apprentice_feats = [], []
    for layer_sampling in sampling:
        points = jax.lax.stop_gradient(layer_sampling['points'])
        num_queries = points.shape[2]
        weights = jax.lax.stop_gradient(layer_sampling['weights'])[..., jnp.asarray(levels)]       # (B, Q, N, 1, L)
        weights = weights.transpose(0, 2, 1, 3, 4).reshape(batch * cams, num_queries, 1, len(levels), 1)
        locations = jnp.broadcast_to(points.reshape(batch * cams, num_queries, 1, 1, 1, 2),
                                     (batch * cams, num_queries, 1, len(levels), 1, 2))
        for value, acc in ((expert_value, expert_feats), (apprentice_value, apprentice_feats)):
            out = ms_deform_attn(value, shapes, locations, weights)   # locations and weights stay float32
            acc.append(jnp.nan_to_num(out.reshape(batch, cams, num_queries, -1).sum(1)))
    return jnp.stack(apprentice_feats), jnp.stack(expert_feats)
