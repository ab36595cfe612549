"""``build(config.model)``: the detector module named by ``config.model.name``."""


def build(model_cfg):
    if model_cfg.name == 'bevformer':
        from fd3d_jax.models import bevformer
        return bevformer.from_config(model_cfg)
    if model_cfg.name == 'detr3d':
        from fd3d_jax.models import detr3d
        return detr3d.from_config(model_cfg)
    raise ValueError(f"config.model.name must be 'bevformer' or 'detr3d', got {model_cfg.name!r}")
