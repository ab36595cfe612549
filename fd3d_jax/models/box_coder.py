"""Box code of BEVFormer/DETR3D (``core/bbox/util.py``, ``NMSFreeCoder``), in jnp.

Boxes: ``(x, y, z_gravity, w, l, h, yaw, vx, vy)`` in the LiDAR frame (``nuscenes_meta``).
Code (``CODE_SIZE`` = 10): ``(cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy)`` with
centres in metres (``normalize_bbox`` does not normalise centres, despite its name).
"""
import jax
import jax.numpy as jnp

CODE_SIZE = 10
# Loss weights per code entry (velocity down-weighted), BEVFormer/DETR3D ``code_weights``.
CODE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
# Predicted centres outside this range are dropped (``post_center_range``).
POST_CENTER_RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)


def inverse_sigmoid(prob, eps=1e-5):
    """``log(prob / (1 - prob))`` with prob clamped to [0, 1] and both terms to >= eps (mmdet)."""
    prob = jnp.clip(prob, 0.0, 1.0)
    return jnp.log(jnp.maximum(prob, eps) / jnp.maximum(1.0 - prob, eps))


def normalize_bbox(boxes):
    """(..., 9) boxes -> (..., 10) code (``normalize_bbox``)."""
    cx, cy, cz, width, length, height, yaw, vx, vy = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx, cy, jnp.log(width), jnp.log(length), cz, jnp.log(height), jnp.sin(yaw), jnp.cos(yaw),
                      vx, vy], -1)


def denormalize_bbox(code):
    """(..., 10) code -> (..., 9) boxes (``denormalize_bbox``; yaw = atan2(sin, cos))."""
    cx, cy, lw, ll, cz, lh, sin_yaw, cos_yaw, vx, vy = jnp.moveaxis(code, -1, 0)
    return jnp.stack([cx, cy, cz, jnp.exp(lw), jnp.exp(ll), jnp.exp(lh), jnp.arctan2(sin_yaw, cos_yaw), vx, vy], -1)


def decode_centers(raw, reference, pc_range):
    """Regression-branch output -> code with metric centres (BEVFormer/DETR3D head forward).

    ``cx = sigmoid(t0 + r0)`` scaled to pc_range x, ``cy`` likewise with ``(t1, r1)``, ``cz`` with
    ``(t4, r2)``; ``r = ref_logit = inverse_sigmoid(reference)``. raw: (..., 10), reference: (..., 3) in [0, 1].
    """
    ref_logit = inverse_sigmoid(reference)
    lo, hi = jnp.asarray(pc_range[:3], raw.dtype), jnp.asarray(pc_range[3:], raw.dtype)
    xy = jax.nn.sigmoid(raw[..., 0:2] + ref_logit[..., 0:2]) * (hi[:2] - lo[:2]) + lo[:2]
    cz = jax.nn.sigmoid(raw[..., 4:5] + ref_logit[..., 2:3]) * (hi[2] - lo[2]) + lo[2]
    return jnp.concatenate([xy, raw[..., 2:4], cz, raw[..., 5:]], -1)


def refine_reference(raw, reference):
    """Iterative box refinement of the decoder: new (x, y) from ``raw[0:2]`` and z from ``raw[4]``
    in inverse-sigmoid space, with a stop-gradient (``.detach()``). raw (..., 10), reference (..., 3)."""
    ref_logit = inverse_sigmoid(reference)
    new = jax.nn.sigmoid(jnp.concatenate([raw[..., 0:2] + ref_logit[..., 0:2],
                                          raw[..., 4:5] + ref_logit[..., 2:3]], -1))
    return jax.lax.stop_gradient(new)


def decode_topk(cls_logits, bbox_code, max_num=300, post_center_range=POST_CENTER_RANGE):
    """NMS-free decoding of one sample (``NMSFreeCoder.decode_single``), static shapes.

    Args:
      cls_logits: (NQ, K) last-layer logits; bbox_code: (NQ, 10) last-layer code.
      max_num: boxes kept (top-k over all NQ*K scores; ``label = idx % K``, ``query = idx // K``).
    Returns:
      boxes (max_num, 9) with gravity-centre z (mmdet3d's ``get_bboxes`` moves z to the bottom
      centre for ``LiDARInstance3DBoxes`` and the nuScenes conversion moves it back; we skip that
      round trip), scores (max_num,), labels (max_num,) int32, and valid (max_num,) — False for
      centres outside ``post_center_range``.
    """
    num_classes = cls_logits.shape[-1]
    scores, idx = jax.lax.top_k(jax.nn.sigmoid(cls_logits).reshape(-1), max_num)
    labels = (idx % num_classes).astype(jnp.int32)
    boxes = denormalize_bbox(bbox_code[idx // num_classes])
    rng = jnp.asarray(post_center_range, boxes.dtype)
    valid = jnp.all((boxes[:, :3] >= rng[:3]) & (boxes[:, :3] <= rng[3:]), axis=-1)
    return boxes, scores, labels, valid
