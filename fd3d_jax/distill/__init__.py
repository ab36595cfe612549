"""Distillation from a frozen expert: the methods by the name ``config.distill.method`` gives them ('none' =
no distillation loss), each a ``Distiller`` subclass in a module of its own, and ``build_distillation``.

- ``fitnet``: FitNet hints (MSE) on the BEV and the paired FPN levels (``fitnet.py``);
- ``mgd``: MGD with random spatial masks (``mgd.py``);
- ``heatmap``: the released FocalDistiller baseline, CWD + GT-heatmap-masked BEV L2 (``heatmap.py``);
- ``fd3d``: FD3D, query-guided masked generative + focal distillation (``fd3d.py``).

The pure, unweighted loss functions (``losses.py``, argument order apprentice, expert, masks, options) are
exported here too: ``cwd_loss``, ``fitnet_loss``, ``focal_loss``, ``generative_loss``, ``masked_l2_loss``.
"""
from fd3d_jax.distill.distiller import Distiller
from fd3d_jax.distill.expert import load_expert_params
from fd3d_jax.distill.fd3d import FD3D
from fd3d_jax.distill.fitnet import FitNet
from fd3d_jax.distill.heatmap import HeatmapDistiller
from fd3d_jax.distill.losses import cwd_loss, fitnet_loss, focal_loss, generative_loss, masked_l2_loss
from fd3d_jax.distill.mgd import MGD

METHODS = {'fitnet': FitNet, 'mgd': MGD, 'heatmap': HeatmapDistiller, 'fd3d': FD3D}

__all__ = ['METHODS', 'Distiller', 'build_distillation', 'make_distiller', 'uses_expert',
           'cwd_loss', 'fitnet_loss', 'focal_loss', 'generative_loss', 'masked_l2_loss']


def uses_expert(config):
    """True when ``config`` distils from an expert (``config.distill.method`` is not 'none')."""
    return 'distill' in config and config.distill.method != 'none'


def make_distiller(config):
    """The ``Distiller`` of ``config.distill.method`` (None for 'none' or without ``config.distill``); its
    expert's params are not loaded (``build_distillation`` does both)."""
    return METHODS[config.distill.method](config) if uses_expert(config) else None


def build_distillation(config):
    """``(distiller, expert_params)`` for ``config``: (None, None) without ``config.distill`` or for
    method 'none' (then ``expert_params`` is still loaded when ``distill.init_apprentice_head`` and a
    checkpoint are set, so that "apprentice alone" starts from the same head). The expert comes from
    ``config.distill.expert_checkpoint`` (``fd3d_jax.distill.expert.load_expert_params``)."""
    if 'distill' not in config:
        return None, None
    if not uses_expert(config):
        if config.distill.init_apprentice_head and config.distill.expert_checkpoint:
            abstract = Distiller(config, abstract_only=True).expert_abstract_params
            return None, load_expert_params(config.distill.expert_checkpoint, config.expert, abstract)
        return None, None
    distiller = make_distiller(config)
    params = load_expert_params(config.distill.expert_checkpoint, config.expert, distiller.expert_abstract_params)
    return distiller, params
