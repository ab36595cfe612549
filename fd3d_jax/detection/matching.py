"""Hungarian matching of queries to GT boxes (``HungarianAssigner3D`` of BEVFormer/DETR3D).

Cost per decoder layer and sample: ``FocalLossCost(weight=2)`` on the class logits plus
``BBox3DL1Cost(weight=0.25)`` on the first 8 box-code entries (velocity excluded); the
assignment is solved exactly on the host with ``scipy.optimize.linear_sum_assignment``.
GT is padded to a static G with a mask; padded columns are sliced out on the host.
"""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from fd3d_jax.models.box_coder import normalize_bbox

# Replaces NaN/inf costs before scipy (which rejects them): such pairs are matched last.
_BIG_COST = 1e10


def focal_cost(cls_logits, gt_labels, weight=2.0, alpha=0.25, gamma=2.0, eps=1e-12):
    """Focal classification cost (mmdet ``FocalLossCost``).

    Args:
      cls_logits: (..., Q, K) logits; gt_labels: (..., G) int, padding (-1) allowed (its column
        holds an arbitrary finite value and must be masked by the caller).
    Returns:
      (..., Q, G): ``weight * (pos - neg)[q, label_g]`` with ``p = sigmoid(logits)``,
      ``pos = -log(p + eps) alpha (1 - p)^gamma``, ``neg = -log(1 - p + eps) (1 - alpha) p^gamma``.
    """
    prob = jax.nn.sigmoid(cls_logits)
    neg = -jnp.log(1.0 - prob + eps) * (1.0 - alpha) * prob ** gamma
    pos = -jnp.log(prob + eps) * alpha * (1.0 - prob) ** gamma
    cost = weight * (pos - neg)
    labels = jnp.clip(gt_labels, 0, cls_logits.shape[-1] - 1)
    idx = jnp.broadcast_to(labels[..., None, :], cost.shape[:-1] + labels.shape[-1:])
    return jnp.take_along_axis(cost, idx, axis=-1)


def l1_cost(bbox_pred, gt_code, weight=0.25):
    """Box L1 cost (``BBox3DL1Cost``): ``weight * cdist_L1`` over the first 8 code entries.

    bbox_pred: (..., Q, 10) code; gt_code: (..., G, 10) normalised GT. Returns (..., Q, G).
    """
    diff = bbox_pred[..., :, None, :8] - gt_code[..., None, :, :8]
    return weight * jnp.sum(jnp.abs(diff), axis=-1)


def _assign_host(cost, gt_mask):
    """Numpy: cost (..., Q, G), gt_mask (..., G) -> assigned (..., Q) int32, -1 unmatched."""
    cost = np.asarray(cost, np.float64)
    gt_mask = np.broadcast_to(np.asarray(gt_mask, bool), cost.shape[:-2] + cost.shape[-1:])
    num_queries, num_gt = cost.shape[-2:]
    flat_cost, flat_mask = cost.reshape(-1, num_queries, num_gt), gt_mask.reshape(-1, num_gt)
    out = np.full((flat_cost.shape[0], num_queries), -1, np.int32)
    for sample in range(flat_cost.shape[0]):
        cols = np.flatnonzero(flat_mask[sample])  # slice padded GT out ("slicer")
        if cols.size == 0 or num_queries == 0:
            continue
        sample_cost = np.nan_to_num(flat_cost[sample][:, cols], nan=_BIG_COST, posinf=_BIG_COST, neginf=-_BIG_COST)
        rows, sel = scipy.optimize.linear_sum_assignment(sample_cost)
        out[sample, rows] = cols[sel]
    return out.reshape(cost.shape[:-1])


def hungarian(cost, gt_mask):
    """Optimal one-to-one assignment per sample, on the host (``linear_sum_assignment``).

    Works under ``jit`` (also sharded: the callback receives the whole batch) and ``vmap``
    (``vmap_method='broadcast_all'``: one host call for the whole vmapped batch). On TPU, prefer an
    in-graph matcher (e.g. scenic's ``hungarian_jax`` / ``hungarian_cover``): host callbacks are slow
    there.

    Args:
      cost: (B, Q, G) matching cost; non-finite entries are replaced by a large finite cost.
      gt_mask: (B, G) bool, False for padded GT (those columns are ignored).
    Returns:
      (B, Q) int32: index of the GT matched to each query, -1 if unmatched (every valid GT is
      matched when Q >= number of valid GT). No gradient.
    """
    cost = jax.lax.stop_gradient(cost)
    out_shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    assigned = jax.pure_callback(_assign_host, out_shape, cost, gt_mask, vmap_method='broadcast_all')
    return jax.lax.stop_gradient(assigned)


def match(cls_logits, bbox_preds, gt_boxes, gt_labels, gt_mask, cls_weight=2.0, bbox_weight=0.25,
          alpha=0.25, gamma=2.0):
    """Hungarian assignment of one decoder layer (``HungarianAssigner3D.assign``, per sample).

    Args:
      cls_logits: (B, Q, K); bbox_preds: (B, Q, 10) code with metric centres.
      gt_boxes: (B, G, 9) ``(x, y, z_gravity, w, l, h, yaw, vx, vy)``; gt_labels: (B, G) int
        (-1 padding); gt_mask: (B, G) bool.
    Returns:
      (B, Q) int32 matched GT index per query, -1 for background.
    """
    cls_logits, bbox_preds = jax.lax.stop_gradient((cls_logits, bbox_preds))
    valid = gt_mask[..., None]
    # Padded rows are zeros (log 0 = -inf): give them a harmless box before coding.
    safe_boxes = jnp.where(valid, gt_boxes, jnp.ones_like(gt_boxes))
    gt_code = jnp.where(valid, normalize_bbox(safe_boxes), 0.0)
    cost = (focal_cost(cls_logits, gt_labels, cls_weight, alpha, gamma)
            + l1_cost(bbox_preds, gt_code, bbox_weight))
    cost = jnp.where(gt_mask[..., None, :], cost, 0.0)
    return hungarian(cost, gt_mask)
