"""Pictures of a sample: the six cameras with projected 3D boxes and a bird's-eye view.

GT boxes are drawn solid in their class colour, predictions dashed (with their score in BEV).
"""
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fd3d_jax.data import geometry  # noqa: E402
from fd3d_jax.data.nuscenes_meta import CLASS_NAMES  # noqa: E402
from fd3d_jax.data.pipeline import load_image  # noqa: E402

CLASS_COLORS = dict(zip(CLASS_NAMES, plt.get_cmap('tab10').colors))
# Camera panels as laid out on the car: front row left-to-right, back row mirrored.
PANEL_ORDER = ('CAM_FRONT_LEFT', 'CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_RIGHT', 'CAM_BACK', 'CAM_BACK_LEFT')
_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7), (0, 5), (1, 4)]


def gt_of_record(record, class_names=CLASS_NAMES):
    """(boxes (n, 7), names) of a record's valid GT of the given classes."""
    keep = [i for i, n in enumerate(record['gt_names']) if n in class_names and record['valid_flag'][i]]
    return np.asarray(record['gt_boxes']).reshape(-1, 7)[keep], [record['gt_names'][i] for i in keep]


def _draw_camera(ax, img, lidar2img, boxes, names, style):
    height, width = img.shape[:2]
    for box, name in zip(boxes, names):
        uv, depth, _ = geometry.project_points(geometry.box_corners(box[None, :7])[0], lidar2img)
        if not ((depth > 0.5) & (uv[:, 0] > -width) & (uv[:, 0] < 2 * width)).any():
            continue
        for start, end in _EDGES:  # the front face carries a cross
            if depth[start] > 0.5 and depth[end] > 0.5:
                ax.plot(uv[[start, end], 0], uv[[start, end], 1], style, color=CLASS_COLORS.get(name, 'w'), lw=0.8)


def _draw_bev(ax, boxes, names, style, scores=None):
    for index, (box, name) in enumerate(zip(boxes, names)):
        corners = geometry.box_corners(box[None, :7])[0, [0, 1, 2, 3, 0], :2]
        color = CLASS_COLORS.get(name, 'k')
        ax.plot(corners[:, 0], corners[:, 1], style, color=color, lw=0.9)
        front = corners[[0, 3]].mean(0)
        ax.plot([box[0], front[0]], [box[1], front[1]], style, color=color, lw=0.9)
        if scores is not None:
            ax.text(box[0], box[1], f'{scores[index]:.2f}', fontsize=4, color=color)


def render_sample(record, dataroot, out_path, pred=None, score_threshold=0.3, bev_range=51.2,
                  class_names=CLASS_NAMES):
    """Writes one PNG for a record.

    Args:
      record: a sample record; dataroot: where its image paths are relative to.
      pred: optional dict(boxes (n, >=7) LiDAR frame, labels (n,), scores (n,)); boxes scoring
        below ``score_threshold`` are not drawn.
    """
    gt_boxes, gt_names = gt_of_record(record, class_names)
    if pred is not None:
        keep = np.asarray(pred['scores']) >= score_threshold
        p_boxes = np.asarray(pred['boxes'])[keep]
        p_names = [class_names[int(i)] for i in np.asarray(pred['labels'])[keep]]
        p_scores = np.asarray(pred['scores'])[keep]
    cams = {c['channel']: c for c in record['cams']}
    aspect = cams['CAM_FRONT']['height'] / cams['CAM_FRONT']['width']
    fig = plt.figure(figsize=(15, 2 * 5 * aspect + 5.2), dpi=100)
    grid = fig.add_gridspec(3, 6, height_ratios=[5 * aspect, 5 * aspect, 5.2])
    for panel, channel in enumerate(PANEL_ORDER):
        ax = fig.add_subplot(grid[panel // 3, 2 * (panel % 3):2 * (panel % 3) + 2])
        cam = cams[channel]
        img = load_image(os.path.join(dataroot, cam['path']), record['token'])
        l2i = geometry.lidar2img(np.asarray(cam['intrinsic']), np.asarray(cam['sensor2lidar']))
        ax.imshow(img)
        _draw_camera(ax, img, l2i, gt_boxes, gt_names, '-')
        if pred is not None:
            _draw_camera(ax, img, l2i, p_boxes, p_names, '--')
        ax.set_xlim(0, img.shape[1])
        ax.set_ylim(img.shape[0], 0)
        ax.set_title(channel, fontsize=7)
        ax.axis('off')
    ax = fig.add_subplot(grid[2, 2:4])
    pts_path = os.path.join(dataroot, record['lidar_path'])
    if os.path.exists(pts_path):
        pts = np.fromfile(pts_path, np.float32).reshape(-1, 5)
        ax.scatter(pts[::3, 0], pts[::3, 1], s=0.05, c='0.6')
    _draw_bev(ax, gt_boxes, gt_names, '-')
    if pred is not None:
        _draw_bev(ax, p_boxes, p_names, '--', p_scores)
    ax.plot([0, 0], [0, 3], 'k-', lw=1.5)  # ego heading (LiDAR +y)
    ax.set_xlim(-bev_range, bev_range)
    ax.set_ylim(-bev_range, bev_range)
    ax.set_aspect('equal')
    ax.tick_params(labelsize=6)
    ax.set_title('BEV (LiDAR frame; solid GT, dashed predictions)', fontsize=7)
    handles = [plt.Line2D([], [], color=CLASS_COLORS[n], label=n) for n in class_names]
    fig.legend(handles=handles, loc='lower right', fontsize=7, frameon=False)
    fig.suptitle(f"{record['scene_name']} frame {record['frame_idx']}  sample {record['token']}", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.03, wspace=0.02, hspace=0.12)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def render_distillation(out_path, bev_t, bev_s, bev_mask, boxes, points, point_weights, pc_range,
                        gt_boxes=(), gt_names=(), image=None, pv_mask=None, title=''):
    """One PNG of FD3D's query-guided regions and focal points on a sample.

    Args:
      bev_t, bev_s: (H_t, W_t, C) expert and (H_s, W_s, C) apprentice BEV features (row = y, col = x);
        drawn as the L2 norm over channels.
      bev_mask: (H_t, W_t) query mask on the expert grid; boxes: (n, >=7) the selected queries' boxes.
      points: (k, 2) focal sampling points normalised to [0, 1] (x, y) and point_weights (k,) their
        attention weights (drawn on both BEVs: the same positions are read from both).
      image: optional (H, W, 3) uint8 camera image and pv_mask (h, w) its mask on one feature level.
    """
    x0, y0, x1, y1 = pc_range[0], pc_range[1], pc_range[3], pc_range[4]
    extent = (x0, x1, y0, y1)
    panels = 3 + (image is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.4), dpi=110)
    px = x0 + np.asarray(points)[:, 0] * (x1 - x0)
    py = y0 + np.asarray(points)[:, 1] * (y1 - y0)
    size = 40 * np.asarray(point_weights) / max(float(np.max(point_weights)), 1e-9)
    for ax, feat, label in ((axes[0], bev_t, 'expert BEV'), (axes[2], bev_s, 'apprentice BEV')):
        ax.imshow(np.linalg.norm(feat, axis=-1), origin='lower', extent=extent, cmap='viridis')
        ax.set_title(f'{label} |f| {feat.shape[0]}x{feat.shape[1]}', fontsize=8)
    axes[1].imshow(np.linalg.norm(bev_t, axis=-1), origin='lower', extent=extent, cmap='gray')
    axes[1].imshow(np.ma.masked_where(np.asarray(bev_mask) == 0, bev_mask), origin='lower', extent=extent,
                   cmap='autumn', alpha=0.6, vmin=0, vmax=1)
    axes[1].set_title(f'query mask ({len(boxes)} queries, {float(np.mean(bev_mask)):.1%} of the BEV)', fontsize=8)
    for ax in axes[:3]:
        _draw_bev(ax, np.asarray(gt_boxes), gt_names, '-')
        for box in np.asarray(boxes):
            corners = geometry.box_corners(box[None, :7])[0, [0, 1, 2, 3, 0], :2]
            ax.plot(corners[:, 0], corners[:, 1], '--', color='w', lw=0.8)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.tick_params(labelsize=6)
    for ax in (axes[0], axes[2]):
        ax.scatter(px, py, s=size, c='r', marker='.', linewidths=0)
    if image is not None:
        height, width = image.shape[:2]
        axes[3].imshow(image)
        mask = np.asarray(pv_mask)
        axes[3].imshow(np.ma.masked_where(mask == 0, mask), extent=(0, width, height, 0), cmap='autumn', alpha=0.45,
                       vmin=0, vmax=1)
        axes[3].set_title(f'PV query mask on a {mask.shape[0]}x{mask.shape[1]} feature level', fontsize=8)
        axes[3].axis('off')
    fig.suptitle(title + '  (solid: GT; dashed white: selected queries; red: focal points sized by weight)',
                 fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
