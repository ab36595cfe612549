"""Detection losses of BEVFormer/DETR3D (``loss_single`` + mmdet ``DETRHead``, ``FocalLoss``, ``L1Loss``).

Every decoder layer is matched and weighted 1; keys follow mmdet: ``loss_cls``/``loss_bbox`` for
the last layer, ``d0.loss_cls``, ``d0.loss_bbox``, ... for the earlier ones.

Normalisers: the original sums ``num_pos`` over its per-GPU batch, ``reduce_mean``s it over GPUs and
clamps it at >= 1, then DDP averages gradients over GPUs. Here the loss is computed under ``jit`` on
the global batch, so ``global_sum / max(1, global_count)`` is used; this equals the original since
``mean_gpus(local_sum / mean_count) = global_sum / global_count`` (the clamp aside).
"""
import jax
import jax.numpy as jnp

from fd3d_jax.models.box_coder import normalize_bbox
from fd3d_jax.detection import matching


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Elementwise sigmoid focal loss (mmdet ``sigmoid_focal_loss``), via ``log_sigmoid``.

    logits, targets: same shape; targets are one-hot floats (background rows all zero).
    ``FL = BCE(x, t) * (alpha t + (1 - alpha)(1 - t)) * pt^gamma`` with ``pt = (1 - p) t + p (1 - t)``.
    """
    prob = jax.nn.sigmoid(logits)
    bce = -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
    pt = (1.0 - prob) * targets + prob * (1.0 - targets)
    weight = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * pt ** gamma
    return bce * weight


def _gather_targets(assigned, gt_boxes, gt_labels, gt_mask):
    """assigned (B, Q) -> matched (B, Q) bool, labels (B, Q), boxes (B, Q, 9)."""
    idx = jnp.maximum(assigned, 0)
    matched = (assigned >= 0) & jnp.take_along_axis(gt_mask, idx, axis=1)
    labels = jnp.take_along_axis(gt_labels, idx, axis=1)
    boxes = jnp.take_along_axis(gt_boxes, idx[..., None], axis=1)
    return matched, labels, boxes


def layer_loss(cls_logits, bbox_preds, assigned, gt_boxes, gt_labels, gt_mask, cfg):
    """Focal + L1 loss of one decoder layer given its assignment (``loss_single``).

    Args:
      cls_logits: (B, Q, K); bbox_preds: (B, Q, 10) code; assigned: (B, Q) int32 from ``match``.
      gt_boxes: (B, G, 9); gt_labels: (B, G) int (-1 padding); gt_mask: (B, G) bool.
      cfg: has ``cls_weight``, ``bbox_weight``, ``focal_alpha``, ``focal_gamma``, ``code_weights``.
    Returns:
      loss_cls, loss_bbox, num_pos (float), scalars. ``loss_cls = cls_weight * sum FL /
      max(1, num_pos)`` over all queries and classes; ``loss_bbox = bbox_weight * sum |pred -
      normalize_bbox(gt)| * code_weights / max(1, num_pos)`` over matched queries whose normalised
      target is finite (others dropped, ``isnotnan``); both ``nan_to_num``-ed.
    """
    cls_logits, bbox_preds = cls_logits.astype(jnp.float32), bbox_preds.astype(jnp.float32)
    num_classes = cls_logits.shape[-1]
    matched, labels, boxes = _gather_targets(assigned, gt_boxes, gt_labels, gt_mask)
    num_pos = jnp.sum(matched).astype(jnp.float32)
    avg = jnp.maximum(num_pos, 1.0)

    onehot = jax.nn.one_hot(labels, num_classes) * matched[..., None]
    fl = sigmoid_focal_loss(cls_logits, onehot, cfg.focal_alpha, cfg.focal_gamma)
    loss_cls = cfg.cls_weight * jnp.sum(fl) / avg

    target = jax.lax.stop_gradient(normalize_bbox(boxes))
    keep = matched & jnp.all(jnp.isfinite(target), axis=-1)
    target = jnp.where(keep[..., None], target, 0.0)  # no NaN may reach |pred - target|'s gradient
    weights = keep[..., None] * jnp.asarray(cfg.code_weights, jnp.float32)
    loss_bbox = cfg.bbox_weight * jnp.sum(jnp.abs(bbox_preds - target) * weights) / avg
    return jnp.nan_to_num(loss_cls), jnp.nan_to_num(loss_bbox), num_pos


def detection_loss(outputs, batch, cfg):
    """Sum of all decoder layers' losses, each layer matched separately (no gradient through
    the matching).

    Args:
      outputs: ``cls_scores`` (L, B, Q, K), ``bbox_preds`` (L, B, Q, 10).
      batch: ``gt_boxes`` (B, G, 9), ``gt_labels`` (B, G), ``gt_mask`` (B, G).
      cfg: the ``config.loss`` section (see ``layer_loss``); ``cfg.matcher`` (``'scipy'`` when absent)
        picks the Hungarian matcher (``matching.assign``).
    Returns:
      total scalar, and parts: ``loss_cls``, ``loss_bbox`` (last layer), ``d{i}.loss_cls``,
      ``d{i}.loss_bbox`` (earlier layers), ``num_pos`` (last layer).
    """
    gt = (batch['gt_boxes'], batch['gt_labels'], batch['gt_mask'])
    cls_all, box_all = outputs['cls_scores'], outputs['bbox_preds']
    num_layers = cls_all.shape[0]
    # every layer matched in one ``assign`` call (per device shard: ``matching.assign``); a config without the
    # key matches with scipy.
    matcher = getattr(cfg, 'matcher', 'scipy')
    cost_all = jax.vmap(lambda c, b: matching.match_cost(
        c, b, *gt, cls_weight=cfg.cls_weight, bbox_weight=cfg.bbox_weight, alpha=cfg.focal_alpha,
        gamma=cfg.focal_gamma))(cls_all, box_all)                            # (L, B, Q, G)
    assigned_all = matching.assign(cost_all, batch['gt_mask'], matcher)
    parts = {}
    for layer in range(num_layers):
        loss_cls, loss_bbox, num_pos = layer_loss(cls_all[layer], box_all[layer], assigned_all[layer], *gt, cfg)
        prefix = '' if layer == num_layers - 1 else f'd{layer}.'
        parts[prefix + 'loss_cls'], parts[prefix + 'loss_bbox'] = loss_cls, loss_bbox
    parts['num_pos'] = num_pos
    total = sum(v for k, v in parts.items() if k != 'num_pos')
    return total, parts
