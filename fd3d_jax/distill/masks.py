"""Query-guided instance masks: which queries, and their boxes rasterised on the BEV grid and on
the perspective-view (PV) feature maps; and MGD's random spatial mask (``random_mask``).

**Reconstruction.** FD3D's mask rule was never released (docs/fd3d_reconstruction.md). The method figure
only shows the distillation head's 3D boxes "proj."-ected to BEV and PV as rectangles. Chosen here:

- queries: score >= threshold, top-k per sample, or the Hungarian-matched ones (``select_queries``);
- hard 0/1 masks, union over the kept boxes, an optional ``box_scale`` enlarging/shrinking the box;
- BEV: the rotated footprint, cell centre inside (plus the cell holding the box centre, so that
  boxes smaller than a cell never vanish);
- PV: the axis-aligned 2D hull of the projected box, with the box edges clipped against the near
  plane, clipped to the image, and every feature cell whose pixel footprint overlaps it.

Box convention (``fd3d_jax.data.nuscenes_meta``): ``(x, y, z_gravity, w, l, h, yaw, ...)`` in the
LiDAR frame, ``l`` along the heading, trailing entries ignored. BEV layout as BEVFormer:
row = y, column = x, flat index = row * W + col.
"""
import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.data_parallel import on_data_shards

EPS_DEPTH = 1e-5  # near plane; BEVFormer/DETR3D point_sampling's eps on the homogeneous depth
SELECT_RULES = ('score', 'topk', 'gt')

# Corner signs (l, w, h) / 2, order of fd3d_jax.data.geometry.box_corners: bottom face counter-
# clockwise from front-left (+l/2, +w/2), then the top face in the same order.
_SX = np.array([1, -1, -1, 1, 1, -1, -1, 1], np.float32) * 0.5
_SY = np.array([1, 1, -1, -1, 1, 1, -1, -1], np.float32) * 0.5
_SZ = np.array([-1, -1, -1, -1, 1, 1, 1, 1], np.float32) * 0.5
# The 12 edges of a box as corner-index pairs: bottom ring, top ring, verticals.
BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4],
                      [0, 4], [1, 5], [2, 6], [3, 7]])


def random_mask(rng, shape, ratio):
    """MGD's random spatial mask, shared over channels.

    ``mat = rand(N, 1, H, W); mat = where(mat > 1 - lambda_mgd, 0, 1)`` (yzd-v/MGD mgd.py ``get_dis_loss``):
    a fraction ``ratio`` of the positions is dropped (0), the rest kept (1).

    Args:
      rng: a ``jax.random`` key.
      shape: the features' shape ``(..., H, W, C)`` (the last axis is replaced by 1, so passing
        ``(..., H, W, 1)`` works too).
      ratio: λ, the expected fraction of dropped positions.
    Returns:
      float32 mask ``(..., H, W, 1)``.
    """
    mask_shape = tuple(shape[:-1]) + (1,)
    uniform = jax.random.uniform(rng, mask_shape, jnp.float32)
    return jnp.where(uniform > 1.0 - ratio, 0.0, 1.0).astype(jnp.float32)


def select_queries(cls_logits, rule, score_thresh=0.3, topk=30, matched=None):
    """Which queries' boxes make the masks.

    Args:
      cls_logits: (B, NQ, K) classification logits (sigmoid per class).
      rule: 'score' (max-class score >= score_thresh), 'topk' (the top-k scores per sample, k
        clipped to NQ) or 'gt' (``matched``, (B, NQ) bool: the Hungarian-matched queries).
    Returns:
      keep (B, NQ) float32 in {0, 1} and scores (B, NQ) = max_k sigmoid(cls_logits).
    """
    scores = jnp.max(jax.nn.sigmoid(cls_logits.astype(jnp.float32)), axis=-1)
    if rule == 'score':
        keep = scores >= score_thresh
    elif rule == 'topk':
        count = min(int(topk), scores.shape[-1])

        def top(sample_scores):   # per sample (vmapped scatter, per device shard: no gather of the batch)
            _, idx = jax.lax.top_k(sample_scores, count)                    # (k,)
            return jnp.zeros(sample_scores.shape, bool).at[idx].set(True)

        keep = on_data_shards(jax.vmap(top), scores)
    elif rule == 'gt':
        if matched is None:
            raise ValueError("distill.mask.select = 'gt' needs the matched queries (matched=None)")
        keep = jnp.asarray(matched, bool)
    else:
        raise ValueError(f'distill.mask.select must be one of {SELECT_RULES}, got {rule!r}')
    return keep.astype(jnp.float32), scores


def box_corners(boxes):
    """(..., >=7) boxes (x, y, z, w, l, h, yaw) -> (..., 8, 3) corners (geometry.box_corners order)."""
    boxes = jnp.asarray(boxes, jnp.float32)
    cx, cy, cz, width, length, height, yaw = (boxes[..., i:i + 1] for i in range(7))
    lx, ly, lz = length * _SX, width * _SY, height * _SZ
    cos_yaw, sin_yaw = jnp.cos(yaw), jnp.sin(yaw)
    return jnp.stack([cx + cos_yaw * lx - sin_yaw * ly, cy + sin_yaw * lx + cos_yaw * ly, cz + lz], axis=-1)


def _scaled(boxes, box_scale):
    """Boxes (..., >=7) with w, l, h multiplied by box_scale, trailing entries dropped."""
    boxes = jnp.asarray(boxes, jnp.float32)[..., :7]
    return boxes * jnp.asarray([1, 1, 1, box_scale, box_scale, box_scale, 1], jnp.float32)


def bev_box_mask(boxes, keep, bev_hw, pc_range, box_scale=1.0):
    """Union of the kept boxes' rotated BEV footprints.

    Args:
      boxes: (B, M, >=7); keep: (B, M) {0, 1} (or bool); bev_hw: (H, W); pc_range: 6 floats;
      box_scale: multiplies w and l.
    Returns:
      (B, H, W) float32: 1 where a cell centre ``(x0 + (col + .5) * dx, y0 + (row + .5) * dy)`` lies in
      a kept footprint (boundary included) or the cell holds a kept box's centre.
    """
    h_bev, w_bev = bev_hw
    x0, y0 = float(pc_range[0]), float(pc_range[1])
    dx = (float(pc_range[3]) - x0) / w_bev
    dy = (float(pc_range[4]) - y0) / h_bev
    xs = jnp.asarray(x0 + (np.arange(w_bev) + 0.5) * dx, jnp.float32)          # (W,)
    ys = jnp.asarray(y0 + (np.arange(h_bev) + 0.5) * dy, jnp.float32)          # (H,)
    scaled = _scaled(boxes, box_scale)
    cx, cy, width, length, yaw = (scaled[..., i, None, None] for i in (0, 1, 3, 4, 6))   # (B, M, 1, 1)
    cos_yaw, sin_yaw = jnp.cos(yaw), jnp.sin(yaw)
    ex, ey = xs[None, None, None, :] - cx, ys[None, None, :, None] - cy         # (B,M,1,W), (B,M,H,1)
    along = cos_yaw * ex + sin_yaw * ey                                        # (B, M, H, W)
    across = -sin_yaw * ex + cos_yaw * ey
    inside = (jnp.abs(along) <= 0.5 * length) & (jnp.abs(across) <= 0.5 * width)
    col = jnp.floor((cx - x0) / dx)
    row = jnp.floor((cy - y0) / dy)
    holds_centre = ((jnp.arange(w_bev, dtype=jnp.float32) == col)
                    & (jnp.arange(h_bev, dtype=jnp.float32)[:, None] == row))
    kept = jnp.asarray(keep)[..., None, None] > 0
    return jnp.any((inside | holds_centre) & kept, axis=1).astype(jnp.float32)


def project_box_extent(boxes, lidar2img, eps=EPS_DEPTH):
    """Pixel hull of boxes in every camera, with the box edges clipped against the near plane.

    The hull is the min/max over the corners in front (depth > eps) and the points where the 12
    edges cross depth = eps (projected with depth eps, as point_sampling's ``max(d, eps)``).

    Args:
      boxes: (B, M, >=7) (already scaled); lidar2img: (B, N, 4, 4).
    Returns:
      (B, N, M, 4) ``(u_min, v_min, u_max, v_max)`` and (B, N, M) bool ``any corner in front``.
    """
    corners = box_corners(boxes)                                               # (B, M, 8, 3)
    hom = jnp.concatenate([corners, jnp.ones(corners.shape[:-1] + (1,), jnp.float32)], -1)
    cam = jnp.einsum('bnij,bmkj->bnmki', lidar2img.astype(jnp.float32), hom,
                     precision=jax.lax.Precision.HIGHEST)[..., :3]             # (B, N, M, 8, 3)
    depth = cam[..., 2]
    front = depth > eps
    uv = cam[..., :2] / jnp.maximum(depth, eps)[..., None]
    ca, cb = cam[..., BOX_EDGES[:, 0], :], cam[..., BOX_EDGES[:, 1], :]        # (B, N, M, 12, 3)
    fa, fb = front[..., BOX_EDGES[:, 0]], front[..., BOX_EDGES[:, 1]]
    crosses = fa != fb
    denom = jnp.where(crosses, cb[..., 2] - ca[..., 2], 1.0)
    fraction = (eps - ca[..., 2]) / denom
    cut_uv = (ca[..., :2] + fraction[..., None] * (cb[..., :2] - ca[..., :2])) / eps  # depth = eps there
    pts = jnp.concatenate([uv, cut_uv], axis=-2)                               # (B, N, M, 20, 2)
    ok = jnp.concatenate([front, crosses], axis=-1)[..., None]
    lo = jnp.min(jnp.where(ok, pts, jnp.inf), axis=-2)
    hi = jnp.max(jnp.where(ok, pts, -jnp.inf), axis=-2)
    return jnp.concatenate([lo, hi], -1), jnp.any(front, axis=-1)


def pv_box_mask(boxes, keep, lidar2img, img_hw, feat_hws, box_scale=1.0):
    """Union of the kept boxes' projected 2D hulls on every PV feature level.

    Args:
      boxes: (B, M, >=7); keep: (B, M); lidar2img: (B, N, 4, 4) LiDAR -> pixels of the padded image
      of size img_hw = (H, W); feat_hws: [(h_l, w_l), ...]; box_scale: multiplies w, l and h.
    Returns:
      [(B, N, h_l, w_l) float32, ...]: 1 where the cell's pixel footprint
      ``[j * sx, (j + 1) * sx) x [i * sy, (i + 1) * sy)`` (sx = W / w_l, sy = H / h_l) overlaps the
      hull clipped to the image. Boxes wholly behind the camera or off the image give nothing.
    """
    img_h, img_w = img_hw
    ext, seen = project_box_extent(_scaled(boxes, box_scale), lidar2img)       # (B,N,M,4), (B,N,M)
    u0, v0 = jnp.maximum(ext[..., 0], 0.0), jnp.maximum(ext[..., 1], 0.0)
    u1, v1 = jnp.minimum(ext[..., 2], float(img_w)), jnp.minimum(ext[..., 3], float(img_h))
    on = seen & (u1 > u0) & (v1 > v0) & (jnp.asarray(keep)[:, None, :] > 0)   # (B, N, M)
    masks = []
    for feat_h, feat_w in feat_hws:
        sx, sy = img_w / feat_w, img_h / feat_h
        left, right = (jnp.asarray(np.arange(k, feat_w + k) * sx, jnp.float32) for k in (0, 1))
        top, bottom = (jnp.asarray(np.arange(k, feat_h + k) * sy, jnp.float32) for k in (0, 1))
        ox = (u0[..., None] < right) & (u1[..., None] >= left)                 # (B, N, M, w)
        oy = (v0[..., None] < bottom) & (v1[..., None] >= top) & on[..., None]  # (B, N, M, h)
        hits = jnp.einsum('bnmh,bnmw->bnhw', oy.astype(jnp.float32), ox.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
        masks.append((hits > 0.5).astype(jnp.float32))
    return masks
