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
would otherwise zero the loss; fd3d.md §4).
"""
import jax
import jax.numpy as jnp

from fd3d_jax.models.deformable_attention import ms_deform_attn


def _value_proj(head_params, layer):
    p = head_params[f'layers_{layer}']['cross_attn']['attn']['value_proj']
    return jax.lax.stop_gradient(p['kernel']), jax.lax.stop_gradient(p['bias'])


def bev_focal_features(head_params, sampling, bev_t, bev_s, num_heads):
    """Per-layer aggregated features of the expert and apprentice BEVs.

    Args:
      head_params: the distillation head's params (``params['head']`` layout, ``layers_{l}``).
      sampling: per layer dict(sampling_locations (B, Q, M, 1, P, 2), attention_weights (B, Q, M, 1, P)).
      bev_t, bev_s: (B, H, W, C) expert and apprentice BEV on the same grid (row = y, column = x).
      num_heads: M.
    Returns:
      (feat_t, feat_s), each (L, B, Q, C).
    """
    b, h, w, c = bev_t.shape
    assert bev_s.shape == bev_t.shape, (bev_s.shape, bev_t.shape)
    feats_t, feats_s = [], []
    for layer, smp in enumerate(sampling):
        kernel, bias = _value_proj(head_params, layer)
        loc = jax.lax.stop_gradient(smp['sampling_locations'])
        wts = jax.lax.stop_gradient(smp['attention_weights'])
        for bev, acc in ((bev_t, feats_t), (bev_s, feats_s)):
            value = (bev.reshape(b, h * w, c) @ kernel.astype(bev.dtype) + bias.astype(bev.dtype))
            out = ms_deform_attn(value.reshape(b, h * w, num_heads, c // num_heads), ((h, w),), loc, wts)
            acc.append(jnp.nan_to_num(out))
    return jnp.stack(feats_t), jnp.stack(feats_s)


def pv_focal_features(sampling, feats_t, feats_s):
    """DETR3D's per-layer sums of projected-reference samples on expert and apprentice FPN levels.

    Args:
      sampling: per layer dict(points (B, N, Q, 2) in [0, 1], weights (B, Q, N, 1, L_e)) of the
        distillation head (the expert's DETR3D head).
      feats_t: the expert's levels, list of (B, N, H_l, W_l, C).
      feats_s: list like ``feats_t`` with the (aligned) apprentice level of the same size, or None
        where the apprentice has none (that level is left out of both sums).
    Returns:
      (feat_t, feat_s), each (L, B, Q, C).
    """
    levels = [i for i, f in enumerate(feats_s) if f is not None]
    if not levels:
        raise ValueError('DETR3D focal distillation needs at least one FPN level of equal size in the '
                         'expert and the apprentice')
    b, n = feats_t[0].shape[:2]
    shapes = tuple(feats_t[i].shape[2:4] for i in levels)

    def table(feats):
        return jnp.concatenate([feats[i].reshape(b * n, -1, 1, feats[i].shape[-1]) for i in levels], 1)

    value_t, value_s = table(feats_t), table(feats_s)
    out_t, out_s = [], []
    for smp in sampling:
        uv = jax.lax.stop_gradient(smp['points'])
        q = uv.shape[2]
        wts = jax.lax.stop_gradient(smp['weights'])[..., jnp.asarray(levels)]       # (B, Q, N, 1, L)
        wts = wts.transpose(0, 2, 1, 3, 4).reshape(b * n, q, 1, len(levels), 1)
        loc = jnp.broadcast_to(uv.reshape(b * n, q, 1, 1, 1, 2), (b * n, q, 1, len(levels), 1, 2))
        for value, acc in ((value_t, out_t), (value_s, out_s)):
            out = ms_deform_attn(value, shapes, loc.astype(value.dtype), wts.astype(value.dtype))
            acc.append(jnp.nan_to_num(out.reshape(b, n, q, -1).sum(1)))
    return jnp.stack(out_t), jnp.stack(out_s)
