"""The released FocalDistiller baseline (``HeatmapDistiller``): channel-wise distillation (CWD, tau 2, weight
0.25) on the paired FPN levels and an L2 on the BEV masked by a class-agnostic CenterPoint Gaussian heatmap of
the GT boxes (weight 0.1); the only distillation method with published numbers from the FD3D authors' code.
Weights: ``config.distill.heatmap.cwd_weight`` and ``bev_weight`` (per element; the pair configs set it to the released
0.1 times the expert's BEV channels, the released per-cell channel sum).

Read in ``OpenDriveLab/Birds-eye-view-Perception@dd329bd`` (files added in 705b01f),
``nuScenes_playground/FocalDistiller/``:

- ``projects/mmdet3d_plugin/bevformer/dense_heads/bevformer_head.py`` ``get_heatmaps_single``, with
  the expert's ``train_cfg.pts`` from ``projects/configs/bevformer/bevformer_base.py``
  (``grid_size=[512, 512, 1]``, ``voxel_size=[0.2, 0.2, 8]``, ``out_size_factor=4``,
  ``point_cloud_range=[-51.2, -51.2, -5, 51.2, 51.2, 3]``):
  - one single-channel map ``(1, 128 (y), 128 (x))`` per sample, i.e. cells of 0.2 * 4 = 0.8 m; all
    boxes whatever their class are drawn into it (class-agnostic);
  - box sizes in *cells*: ``width = w / 0.2 / 4``, ``length = l / 0.2 / 4`` (box tensor columns 3, 4);
    a box with ``width <= 0`` or ``length <= 0`` is skipped;
  - ``radius = max(int(gaussian_radius((length, width), min_overlap=0.1)), 2)``;
  - centre cell ``(x - x_min) / 0.2 / 4`` and the same for y, cast with ``.to(torch.int32)``
    (truncation toward zero; the pipeline's ObjectRangeFilter keeps centres strictly inside the
    range, so this is a floor); boxes whose centre cell is outside the map are skipped.
- ``projects/mmdet3d_plugin/core/heatmap/gaussian.py`` (mmdet3d's): ``draw_heatmap_gaussian`` draws
  ``gaussian_2d((2r+1, 2r+1), sigma=(2r+1)/6)`` on the square window ``|dx|, |dy| <= r`` around the
  centre cell, clipped to the map, by an element-wise max; ``gaussian_2d`` zeroes values below
  ``np.finfo(float64).eps * max`` (never active on that window: its smallest value is
  ``exp(-36 r^2 / (2r+1)^2) > exp(-9)``). ``gaussian_radius`` is CenterPoint's (three quadratics,
  each root halved by 2, not by 2a).
- ``projects/mmdet3d_plugin/kd/distillers/heatmap_detection_distiller.py`` ``forward_train``:
  ``torch.cat(htmap).max(dim=0)`` is a max over a list holding the *same* per-sample tensor once per
  drawn box (a no-op; with no GT box in range the list is empty and ``torch.stack`` raises, here the
  map is simply zero); ``F.interpolate(mask, size=(bev_h_T, bev_w_T))`` with the default mode
  'nearest' (src = ``min(floor(dst * float32(in / out)), in - 1)``), 128 -> 200; then
  ``loss = 0.1 * sum_{B,C,H,W} (M S - M T)^2 / sum_{B,1,H,W} M`` (``kd/losses/l2loss.py``: a plain
  sum): the normaliser counts the mask once per cell, not per channel.
"""
import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.distill import losses
from fd3d_jax.distill.distiller import Distiller

MIN_OVERLAP = 0.1
MIN_RADIUS = 2
GRID_HW = (128, 128)  # 512 voxels of 0.2 m / out_size_factor 4 over [-51.2, 51.2]
GAUSSIAN_EPS = float(np.finfo(np.float64).eps)


def gaussian_radius(height, width, min_overlap=0.5):
    """CenterPoint / mmdet3d ``gaussian_radius`` (sizes in cells); numpy or jnp arrays, elementwise."""
    xp = jnp if any(isinstance(v, jax.Array) for v in (height, width)) else np
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + xp.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + xp.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + xp.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return xp.minimum(xp.minimum(r1, r2), r3)


def nearest_indices(in_size, out_size):
    """PyTorch ``F.interpolate(mode='nearest')`` source indices (out_size,) along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def gt_heatmap(boxes, valid, pc_range, grid_hw=GRID_HW, out_hw=(200, 200), min_overlap=MIN_OVERLAP,
               min_radius=MIN_RADIUS):
    """Class-agnostic GT Gaussian heatmap of the FocalDistiller baseline.

    Args:
      boxes: (B, M, >=7) GT boxes (x, y, z, w, l, h, yaw, ...) in the LiDAR frame; valid: (B, M) bool.
      pc_range: 6 floats; the grid covers [x_min, x_max] x [y_min, y_max] with grid_hw = (rows = y,
        cols = x) cells; out_hw: the size the map is nearest-resized to (the expert BEV).
    Returns:
      (B, out_h, out_w) float32 in [0, 1]: per cell the max over the valid boxes' Gaussians.
    """
    gh, gw = grid_hw
    x0, y0 = float(pc_range[0]), float(pc_range[1])
    cell_x = (float(pc_range[3]) - x0) / gw
    cell_y = (float(pc_range[4]) - y0) / gh
    boxes = jnp.asarray(boxes, jnp.float32)
    width = boxes[..., 3] / cell_x                                             # (B, M) cells
    length = boxes[..., 4] / cell_y
    radius = jnp.maximum(jnp.floor(gaussian_radius(length, width, min_overlap)), min_radius)
    radius = jnp.where(jnp.isfinite(radius), radius, min_radius)
    col = jnp.trunc((boxes[..., 0] - x0) / cell_x)
    row = jnp.trunc((boxes[..., 1] - y0) / cell_y)
    drawn = (jnp.asarray(valid, bool) & (width > 0) & (length > 0)
             & (col >= 0) & (col < gw) & (row >= 0) & (row < gh))
    sigma = (2 * radius + 1) / 6
    reach, s2 = radius[..., None, None], (2 * sigma ** 2)[..., None, None]    # (B, M, 1, 1)
    dx = jnp.arange(gw, dtype=jnp.float32) - col[..., None, None]              # (B, M, 1, W)
    dy = jnp.arange(gh, dtype=jnp.float32)[:, None] - row[..., None, None]     # (B, M, H, 1)
    gaussian = jnp.exp(-(dx * dx + dy * dy) / s2)
    gaussian = jnp.where(gaussian < GAUSSIAN_EPS, 0.0, gaussian)
    gaussian = jnp.where((jnp.abs(dx) <= reach) & (jnp.abs(dy) <= reach) & drawn[..., None, None], gaussian, 0.0)
    heat = jnp.max(gaussian, axis=1, initial=0.0)                              # (B, gh, gw)
    rows = nearest_indices(gh, out_hw[0])
    cols = nearest_indices(gw, out_hw[1])
    return heat[:, rows][:, :, cols]


class HeatmapDistiller(Distiller):
    @staticmethod
    def weights(distill_cfg):
        return dict(heatmap_bev=distill_cfg.heatmap.bev_weight, cwd_pv=distill_cfg.heatmap.cwd_weight)

    def terms(self, params, expert_params, feats, expert_out, batch, rng):
        heatmap_cfg, terms, diagnostics = self.distill_cfg.heatmap, {}, {}
        if self.has_bev and self.active('heatmap_bev'):
            expert = self.expert_cfg
            heat = gt_heatmap(batch['gt_boxes'], batch['gt_mask'], tuple(expert.pc_range), tuple(heatmap_cfg.grid_hw),
                              self.expert.bev_shape()[:2], min_overlap=heatmap_cfg.min_overlap,
                              min_radius=heatmap_cfg.min_radius)
            terms['heatmap_bev'] = losses.masked_l2_loss(feats.apprentice_bev, feats.expert_bev, heat)
            diagnostics['mask_bev'] = jnp.mean(heat > 0)
        if self.pairs and self.active('cwd_pv'):
            terms['cwd_pv'] = [losses.cwd_loss(apprentice, expert, heatmap_cfg.cwd_tau)
                               for apprentice, expert in zip(feats.apprentice_pv, feats.expert_pv)]
        return terms, diagnostics
