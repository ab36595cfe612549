"""``build(config.model)``: the detector module named by ``config.model.name``."""
import dataclasses


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
    raise ValueError(f"config.model.name must be 'bevformer' or 'detr3d', got {model_cfg.name!r}")
