"""Renders camera images and lidar sweeps of a synthetic scene by ray casting.

Images: every pixel's ray is cast against the ground plane (a textured road map in global
coordinates, so texture perspective carries depth) and the boxes (z-buffered, so occlusion is
exact); boxes are shaded per face with class-specific patterns (windows, wheels, stripes, heads).
Lidar: a 32-beam spinning sensor with the same ray caster; the point count per box gives
``num_lidar_pts`` and the pixel counts give the visibility level.
"""
import cv2
import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data.nuscenes_meta import CLASS_NAMES
from fd3d_jax.data import rig
from fd3d_jax.data.synthetic import raycast, world

MAP_RESOLUTION = 0.1  # m / pixel, the resolution nuScenes' MapMask assumes
GROUND_MAX_RANGE = 150.0
BOX_RENDER_RANGE = 90.0
SUN = np.array([0.45, 0.30, 0.84]) / np.linalg.norm([0.45, 0.30, 0.84])

# Ground labels of the road map.
VERGE, ASPHALT, MARKING, SIDEWALK, BIKE, PARKING, CENTRE = range(7)
DRIVABLE = (ASPHALT, MARKING, BIKE, PARKING, CENTRE)
_GROUND_RGB = np.array([
    [0.36, 0.42, 0.24],  # verge: grass
    [0.30, 0.30, 0.31],  # asphalt
    [0.88, 0.88, 0.86],  # white marking
    [0.62, 0.60, 0.57],  # sidewalk
    [0.42, 0.27, 0.25],  # bike lane
    [0.34, 0.34, 0.36],  # parking strip
    [0.85, 0.70, 0.15],  # yellow centre line
])
_SKY_HORIZON, _SKY_TOP, _HAZE = np.array([0.80, 0.85, 0.90]), np.array([0.35, 0.55, 0.85]), np.array([0.66, 0.68, 0.70])


class GroundMap:
    """Label raster of the road in global coordinates, pixel (row, col) = (y, x) / resolution from
    the global origin."""

    def __init__(self, road, s_range, shape):
        self.labels = np.zeros(shape, np.uint8)
        arc_lengths = np.arange(s_range[0], s_range[1], road.step)

        def line(offset):
            xy, _ = road.pose(arc_lengths, np.full_like(arc_lengths, offset))
            return np.round(xy / MAP_RESOLUTION * 8).astype(np.int32)  # 3 fractional bits

        def stroke(offset, width_m, label, dash=None):
            pts = line(offset)
            thick = max(1, int(round(width_m / MAP_RESOLUTION)))
            if dash is None:
                cv2.polylines(self.labels, [pts], False, int(label), thick, cv2.LINE_8, shift=3)
                return
            on, period = int(dash[0] / road.step), int(dash[1] / road.step)
            for start in range(0, len(pts) - on, period):
                cv2.polylines(self.labels, [pts[start:start + on + 1]], False, int(label), thick, cv2.LINE_8, shift=3)

        stroke(0.0, 2 * world.SIDEWALK[1], SIDEWALK)
        stroke(0.0, 2 * world.ROAD_HALF_WIDTH, PARKING)
        stroke(0.0, 2 * world.BIKE_MARKING, BIKE)
        stroke(0.0, 2 * world.LANE_MARKING, ASPHALT)
        for side in (-1, 1):
            stroke(side * world.LANE_MARKING, 0.15, MARKING)
            stroke(side * world.BIKE_MARKING, 0.15, MARKING)
        stroke(0.0, 0.15, CENTRE, dash=(3.0, 9.0))
        rng = np.random.default_rng(0)
        tile = cv2.GaussianBlur(rng.normal(0, 1, (256, 256)).astype(np.float32), (0, 0), 1.2)
        self.fine = tile / tile.std()
        coarse = cv2.GaussianBlur(rng.normal(0, 1, (64, 64)).astype(np.float32), (0, 0), 3.0)
        self.coarse = coarse / coarse.std()

    def drivable_png(self):
        """uint8 mask (255 = drivable), rows flipped so that row 0 is the largest y (MapMask)."""
        return np.flipud(np.isin(self.labels, DRIVABLE).astype(np.uint8) * 255)

    def color(self, xy):
        """(P, 2) global ground points -> (P, 3) RGB in [0, 1]."""
        col = np.floor(xy[:, 0] / MAP_RESOLUTION).astype(np.int64)
        row = np.floor(xy[:, 1] / MAP_RESOLUTION).astype(np.int64)
        inside = (row >= 0) & (row < self.labels.shape[0]) & (col >= 0) & (col < self.labels.shape[1])
        label = np.where(inside, self.labels[np.clip(row, 0, self.labels.shape[0] - 1),
                                             np.clip(col, 0, self.labels.shape[1] - 1)], VERGE)
        rgb = _GROUND_RGB[label]
        fine = self.fine[row % 256, col % 256]
        coarse = self.coarse[(row // 20) % 64, (col // 20) % 64]
        amp = np.where(label == VERGE, 0.10, 0.05)
        shade = 1.0 + amp * fine + 0.06 * coarse
        tiles = (label == SIDEWALK) & ((np.abs(xy[:, 0] % 1.5) < 0.06) | (np.abs(xy[:, 1] % 1.5) < 0.06))
        shade = np.where(tiles, shade * 0.8, shade)
        return rgb * shade[:, None]


def _class_pattern(name_idx, uvh, face, size, base, style):
    """Per-pixel albedo of box surfaces. uvh: (P, 3) normalised local coords (1 = front, left,
    top); face: (P,) face axis; size: (P, 3) (w, l, h); base: (P, 3) colour; style: (P,) int."""
    along, across, up = uvh[:, 0], uvh[:, 1], uvh[:, 2]
    w_m, l_m, h_m = size[:, 0], size[:, 1], size[:, 2]
    rgb = base.copy()
    glass = np.array([0.12, 0.16, 0.22])
    dark = np.array([0.06, 0.06, 0.07])
    name = np.asarray(CLASS_NAMES)[name_idx]
    vertical = face != 2

    def paint(mask, color):
        rgb[mask] = color if np.ndim(color) == 1 else color[mask]

    car = name == 'car'
    paint(car & vertical & (up > 0.55) & (up < 0.9) & (along > 0.12) & (along < 0.88), glass)
    paint(car & (face == 0) & (up > 0.5) & (up < 0.9), glass)
    truck = name == 'truck'
    paint(truck & (along < 0.72), np.array([0.86, 0.86, 0.84]) * (1 - 0.08 * ((along * l_m / 0.5) % 1 < 0.15))[:, None])
    paint(truck & (along >= 0.72) & vertical & (up > 0.6) & (up < 0.85), glass)
    bus = name == 'bus'
    paint(bus & vertical & (up > 0.45) & (up < 0.85) & ((along * l_m / 1.6) % 1 > 0.12), glass)
    paint(bus & (face == 0) & (along > 0.5) & (up > 0.3) & (up < 0.9), glass)
    trailer = name == 'trailer'
    paint(trailer & ((along * l_m / 0.6) % 1 < 0.12), base * 0.7)
    cv = name == 'construction_vehicle'
    paint(cv & (up < 0.22) & (((along * l_m + up * h_m) / 0.45) % 2 < 1), dark)
    paint(cv & vertical & (along > 0.55) & (up > 0.65) & (up < 0.92), glass)
    barrier = name == 'barrier'
    paint(barrier & ((((across * w_m) + up * h_m) / 0.45) % 2 < 1), np.array([0.95, 0.95, 0.95]))
    cone = name == 'traffic_cone'
    paint(cone & (up > 0.55) & (up < 0.75), np.array([0.95, 0.95, 0.95]))
    paint(cone & (up < 0.08), dark)
    ped = name == 'pedestrian'
    trousers = np.stack([np.full_like(up, 0.1), np.full_like(up, 0.12), 0.15 + 0.25 * (style % 2)], -1)
    paint(ped & (up < 0.5), trousers)
    paint(ped & (up > 0.87), np.array([0.82, 0.62, 0.48]))
    cycle = (name == 'bicycle') | (name == 'motorcycle')
    rider = cycle & (style % 3 != 0) & (up > 0.55)  # style picks whether a rider is drawn
    paint(rider, np.array([0.18, 0.18, 0.22]))
    paint(rider & (up > 0.88), np.array([0.9, 0.9, 0.9]) * (style % 2)[:, None] + 0.05)

    # Wheels on the sides of wheeled classes.
    radius = np.select([car, truck | bus | trailer, cv, cycle], [0.33, 0.5, 0.6, 0.32], 0.0)
    lx = (along - 0.5) * l_m
    lz = up * h_m
    wheel_x = np.where(cycle, 0.32 * l_m, 0.5 * l_m - np.maximum(radius * 2.0, 0.15 * l_m))
    in_wheel = (np.minimum((np.abs(lx) - wheel_x) ** 2, (np.abs(lx) + wheel_x) ** 2) + (lz - radius) ** 2) < radius ** 2
    paint((radius > 0) & (face == 1) & in_wheel, dark)
    return rgb


def _shade(albedo, face, uvh, boxes):
    """Lambertian shading with a fixed sun; face normals rotated by the box yaw."""
    sign = np.where(np.take_along_axis(uvh, face[:, None], 1)[:, 0] > 0.5, 1.0, -1.0)
    cos_yaw, sin_yaw = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    normal = np.zeros((len(face), 3))
    normal[face == 0] = np.stack([cos_yaw, sin_yaw, np.zeros_like(cos_yaw)], -1)[face == 0]
    normal[face == 1] = np.stack([-sin_yaw, cos_yaw, np.zeros_like(cos_yaw)], -1)[face == 1]
    normal[face == 2, 2] = 1.0
    normal *= sign[:, None]
    light = 0.5 + 0.5 * np.clip(normal @ SUN, 0.0, 1.0)
    return albedo * light[:, None]


def render_camera(ground, cam2global, intrinsic, image_wh, boxes, labels, colors, styles, rng):
    """Renders one camera.

    Args:
      ground: GroundMap; cam2global: (4, 4); intrinsic: (3, 3); image_wh: (W, H).
      boxes: (B, 7) global boxes; labels: (B,) class indices; colors: (B, 3); styles: (B,).
    Returns:
      uint8 image (H, W, 3), per-box pixel counts ignoring occluders (B,), and visible counts (B,).
    """
    width, height = image_wh
    uu, vv = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pix = np.stack([uu, vv, np.ones_like(uu)], -1).reshape(-1, 3)
    dirs = pix @ np.linalg.inv(intrinsic).T @ cam2global[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origin = cam2global[:3, 3]
    zbuf = raycast.ground_distance(origin, dirs)
    zbuf[zbuf > GROUND_MAX_RANGE] = np.inf
    ids = np.full(len(dirs), -1)
    own = np.zeros(len(boxes), np.int64)

    global2cam = geometry.invert_transform(cam2global)
    img_from_global = geometry.view_pad(intrinsic) @ global2cam
    near = np.flatnonzero(np.linalg.norm(boxes[:, :2] - origin[:2], axis=-1) < BOX_RENDER_RANGE)
    uv_all, depth_all, _ = geometry.project_points(geometry.box_corners(boxes[near]), img_from_global)
    for box_index, uv, depth in zip(near, uv_all, depth_all):
        if (depth <= 0.05).all():
            continue
        if (depth > 0.05).all():
            c0, r0 = np.floor(uv.min(0)).astype(int)
            c1, r1 = np.ceil(uv.max(0)).astype(int) + 1
        else:
            c0, r0, c1, r1 = 0, 0, width, height
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, width), min(r1, height)
        if c0 >= c1 or r0 >= r1:
            continue
        idx = (np.arange(r0, r1)[:, None] * width + np.arange(c0, c1)[None]).reshape(-1)
        dist = raycast.ray_box_distance(origin, dirs[idx], boxes[box_index])
        own[box_index] = np.isfinite(dist).sum()
        closer = dist < zbuf[idx]
        zbuf[idx[closer]] = dist[closer]
        ids[idx[closer]] = box_index

    rgb = np.empty((len(dirs), 3))
    sky = ~np.isfinite(zbuf)
    elev = np.clip(dirs[sky, 2] * 4.0, 0.0, 1.0)[:, None]
    rgb[sky] = _SKY_HORIZON * (1 - elev) + _SKY_TOP * elev
    gnd = np.isfinite(zbuf) & (ids < 0)
    pts = origin + dirs[gnd] * zbuf[gnd, None]
    rgb[gnd] = ground.color(pts[:, :2])
    obj = ids >= 0
    if obj.any():
        bid = ids[obj]
        pts = origin + dirs[obj] * zbuf[obj, None]
        uvh, face = raycast.local_hits(pts, boxes[bid])
        albedo = _class_pattern(labels[bid], uvh, face, boxes[bid, 3:6], colors[bid], styles[bid])
        rgb[obj] = _shade(albedo, face, uvh, boxes[bid])
    fog = np.clip((np.where(np.isfinite(zbuf), zbuf, 0.0) - 50.0) / 120.0, 0.0, 0.7)[:, None]
    rgb = np.where(sky[:, None], rgb, rgb * (1 - fog) + _HAZE * fog)
    img = rgb.reshape(height, width, 3) * 255.0 + rng.normal(0.0, 2.0, (height, width, 3))
    visible = np.bincount(ids[obj], minlength=len(boxes))
    return np.clip(img, 0, 255).astype(np.uint8), own, visible


def lidar_sweep(lidar2global, boxes, labels, rng):
    """Simulates LIDAR_TOP; each box is only tested against the rays of its azimuth/elevation
    window.

    Returns:
      (P, 5) float32 points in the LiDAR frame (x, y, z, intensity, ring) and (B,) points per box.
    """
    elev = np.radians(rig.LIDAR_ELEVATIONS_DEG)
    n_az = rig.LIDAR_AZIMUTH_STEPS
    azim = np.arange(n_az) * (2 * np.pi / n_az) - np.pi
    ring, az = np.meshgrid(np.arange(len(elev)), azim, indexing='ij')  # (rings, n_az)
    el = elev[ring]
    dirs_l = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
    dirs = dirs_l @ lidar2global[:3, :3].T
    origin = lidar2global[:3, 3]
    dist = raycast.ground_distance(origin, dirs)
    ids = np.full(len(dirs), -1)
    global2lidar = geometry.invert_transform(lidar2global)
    near = np.linalg.norm(boxes[:, :2] - origin[:2], axis=-1) < rig.LIDAR_MAX_RANGE + 10
    for box_index in np.flatnonzero(near):
        corners = geometry.transform_points(global2lidar, geometry.box_corners(boxes[box_index:box_index + 1])[0])
        # nearest footprint point (exact for a rectangle) and farthest corner bound the elevations
        cos_yaw, sin_yaw = np.cos(boxes[box_index, 6]), np.sin(boxes[box_index, 6])
        rel = origin[:2] - boxes[box_index, :2]
        local = np.abs([cos_yaw * rel[0] + sin_yaw * rel[1],
                        -sin_yaw * rel[0] + cos_yaw * rel[1]]) - boxes[box_index, [4, 3]] / 2
        r_near = np.linalg.norm(np.maximum(local, 0.0))
        if r_near < 0.5:
            continue
        r_far = np.linalg.norm(corners[:, :2], axis=-1).max()
        z_lo, z_hi = corners[:, 2].min(), corners[:, 2].max()
        el_lo = min(np.arctan2(z_lo, r_near), np.arctan2(z_lo, r_far)) - 0.01
        el_hi = max(np.arctan2(z_hi, r_near), np.arctan2(z_hi, r_far)) + 0.01
        rings = np.flatnonzero((elev >= el_lo) & (elev <= el_hi))
        if len(rings) == 0:
            continue
        ang = np.arctan2(corners[:, 1], corners[:, 0])
        centre = np.arctan2(*geometry.transform_points(global2lidar, boxes[box_index, :3])[[1, 0]])
        rel_ang = (ang - centre + np.pi) % (2 * np.pi) - np.pi
        a0 = int(np.floor((centre + rel_ang.min() + np.pi) / (2 * np.pi) * n_az)) - 1
        a1 = int(np.ceil((centre + rel_ang.max() + np.pi) / (2 * np.pi) * n_az)) + 1
        cols = np.arange(a0, a1 + 1) % n_az
        idx = (rings[:, None] * n_az + cols[None]).reshape(-1)
        tb = raycast.ray_box_distance(origin, dirs[idx], boxes[box_index])
        closer = tb < dist[idx]
        dist[idx[closer]] = tb[closer]
        ids[idx[closer]] = box_index
    keep = dist < rig.LIDAR_MAX_RANGE
    dist = dist[keep] + rng.normal(0.0, 0.02, keep.sum())
    ids = ids[keep]
    pts = dirs_l[keep] * dist[:, None]
    intensity = np.where(ids >= 0, 30.0 + 5.0 * (labels[np.maximum(ids, 0)] % 5), 8.0)
    intensity = intensity + rng.uniform(0, 4, len(dist))
    out = np.concatenate([pts, intensity[:, None], ring.reshape(-1)[keep][:, None]], 1).astype(np.float32)
    return out, np.bincount(ids[ids >= 0], minlength=len(boxes))
