"""``build(config.model)``: the detector module named by ``config.model.name``."""
import dataclasses

from fd3d_jax.cli import ConfigError


def from_config(cls, model_cfg):
    """``cls(**fields)`` from a model config section (keys that are not fields are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    kwargs = {k: v for k, v in model_cfg.items() if k in names}
    kwargs['backbone'] = dict(model_cfg.backbone)
    kwargs['neck'] = dict(model_cfg.neck)
    return cls(**kwargs)


def build(model_cfg):
    if model_cfg.name == 'bevformer':
        from fd3d_jax.models.bevformer import BEVFormer
        return from_config(BEVFormer, model_cfg)
    if model_cfg.name == 'detr3d':
        from fd3d_jax.models.detr3d import DETR3D
        return from_config(DETR3D, model_cfg)
    raise ConfigError(f"config.model.name must be 'bevformer' or 'detr3d', got {model_cfg.name!r}")


def build_head(model_cfg, img_hw=None):
    """The detector's query decoder + head alone (``DetectionHead`` with the detector's
    cross-attention), whose params have the layout of ``params['head']`` of ``build(model_cfg)``.
    BEVFormer's reads ``dict(bev=(B, Q, C))``; DETR3D's ``dict(feats=[...], lidar2img=...)`` of images of
    size ``img_hw`` (padded (H, W))."""
    import functools
    from fd3d_jax.models.decoder import BEVCrossAttention, DetectionHead
    m = model_cfg
    if m.name == 'bevformer':
        cross = functools.partial(BEVCrossAttention, (m.bev_h, m.bev_w), m.embed_dims, m.num_heads,
                                  m.decoder_points, m.dropout)
    elif m.name == 'detr3d':
        from fd3d_jax.models.detr3d import Detr3DCrossAttention
        cross = functools.partial(Detr3DCrossAttention, tuple(img_hw), m.embed_dims, m.num_cams, m.num_levels,
                                  m.dropout, tuple(m.pc_range))
    else:
        raise ConfigError(f"config.model.name must be 'bevformer' or 'detr3d', got {m.name!r}")
    return DetectionHead(m.num_query, m.embed_dims, m.num_heads, m.ffn_dims, m.decoder_layers, m.num_classes,
                         m.dropout, tuple(m.pc_range), cross, m.remat)
