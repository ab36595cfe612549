"""The detectors, by the name a config gives them (``config.model.name``), and ``build(config.model)``.

Every detector implements ``fd3d_jax.models.detector.Detector``: the rest of the package asks it what it needs
(its BEV, the batch keys it reads, its head and what the head attends to) and never compares names.
"""
import dataclasses

from fd3d_jax.errors import ConfigError
from fd3d_jax.models.bevformer import BEVFormer
from fd3d_jax.models.detector import Detector
from fd3d_jax.models.detr3d import DETR3D

DETECTORS = {'bevformer': BEVFormer, 'detr3d': DETR3D}

__all__ = ['DETECTORS', 'Detector', 'build', 'detector_class']


def detector_class(model_cfg):
    """The ``Detector`` subclass named by ``model_cfg.name``."""
    if model_cfg.name not in DETECTORS:
        raise ConfigError(f"config.model.name must be one of {', '.join(DETECTORS)}, got {model_cfg.name!r}")
    return DETECTORS[model_cfg.name]


def build(model_cfg, dtype=None):
    """The detector of a model config section: ``cls(**fields)`` of its class (keys that are not fields, like
    ``name``, are ignored; ``backbone`` and ``neck`` are passed as plain dicts). ``dtype``: a compute precision
    that replaces the section's (the distiller runs the expert in the apprentice's)."""
    cls = detector_class(model_cfg)
    names = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    kwargs = {k: v for k, v in model_cfg.items() if k in names}
    kwargs['backbone'] = dict(model_cfg.backbone)
    kwargs['neck'] = dict(model_cfg.neck)
    if dtype is not None:
        kwargs['dtype'] = dtype
    return cls(**kwargs)
