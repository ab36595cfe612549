"""The detector interface: what the training loop, evaluation, the model summary and the distiller need to know
of a detector besides calling it. Nothing outside ``fd3d_jax/models`` compares model names; it asks these.

A detector is a flax module called as ``model.apply({'params': p}, batch, prev_bev=None, deterministic=...)``
on a batch of the input pipeline (``fd3d_jax.models.inputs.batch_spec``) and returning a dict with at least
``img_feats`` (list of FPN levels (B, N, H_l, W_l, C)) and its query head's outputs ``cls_scores``
(L, B, NQ, K), ``bbox_preds`` (L, B, NQ, 10), ``queries``, ``references`` and per-layer ``sampling``; a
detector with a BEV (``has_bev``) also returns ``bev`` (B, H*W, C), which evaluation carries to the next
frame of a scene as ``prev_bev``.
"""
from typing import ClassVar

import flax.linen as nn


class Detector(nn.Module):
    """Base class of the detectors (no fields of its own). Subclasses set ``has_bev`` and implement
    ``build_head`` and ``head_context``; a detector with a BEV also overrides ``bev_shape`` and
    ``extra_batch_keys``."""

    has_bev: ClassVar[bool] = False   # builds a BEV grid (``out['bev']``) and carries it between frames

    @nn.nowrap
    def bev_shape(self):
        """(H, W, C) of the BEV grid (row = y, column = x), or None without a BEV."""
        return None

    @nn.nowrap
    def carried_shape(self, batch_size):
        """Shape of what evaluation carries from one frame of a scene to the next (``prev_bev``): the BEV
        (B, H*W, C), or a (B, 1, 1) placeholder (ignored) for a detector without one, so that every detector's
        evaluation step has the same signature."""
        shape = self.bev_shape()
        return (batch_size, 1, 1) if shape is None else (batch_size, shape[0] * shape[1], shape[2])

    @nn.nowrap
    def extra_batch_keys(self, batch_size, queue_length):
        """``{key: (shape, dtype)}`` of the batch keys this detector reads beyond the common ones (``img``,
        ``lidar2img``, ``can_bus``, ``prev_bev_exists``, ground truth): BEVFormer's BEV alignment metadata."""
        del batch_size, queue_length
        return {}

    @nn.nowrap
    def build_head(self, img_hw, name=None):
        """The query decoder + head (``fd3d_jax.models.decoder.DetectionHead`` with this detector's cross-
        attention) whose params have the layout of ``params['head']``; ``img_hw``: padded (H, W) of the images
        it attends to (DETR3D normalises projections by it)."""
        raise TypeError(f'{type(self).__name__} does not implement Detector.build_head')

    @nn.nowrap
    def head_context(self, out, lidar2img):
        """What the head attends to, from this detector's outputs ``out`` (or another detector's of the same
        kind, e.g. an expert's) and the current frame's ``lidar2img`` (B, N, 4, 4): the ``context`` argument of
        ``build_head(...)``."""
        raise TypeError(f'{type(self).__name__} does not implement Detector.head_context')

