"""Ray casting against the ground plane (z = 0) and yaw-rotated boxes (numpy)."""
import numpy as np


def box_half_extents(boxes):
    """(B, 7) boxes -> (B, 3) half extents along the local (length, width, height) axes."""
    return boxes[:, [4, 3, 5]] / 2.0


def ray_box_distance(origin, dirs, box):
    """Entry distance of rays into one box (slab test).

    Args:
      origin: (3,) common ray origin; dirs: (R, 3) directions (t is in units of their length);
      box: (7,) (x, y, z_centre, w, l, h, yaw).
    Returns:
      (R,) distance ``t > 0`` of the first intersection, ``inf`` on a miss (an origin inside the
      box misses it).
    """
    cos_yaw, sin_yaw = np.cos(box[6]), np.sin(box[6])
    rel = np.asarray(origin, np.float64) - box[:3]
    origin_local = (cos_yaw * rel[0] + sin_yaw * rel[1], -sin_yaw * rel[0] + cos_yaw * rel[1], rel[2])
    dirs_local = (cos_yaw * dirs[:, 0] + sin_yaw * dirs[:, 1], -sin_yaw * dirs[:, 0] + cos_yaw * dirs[:, 1], dirs[:, 2])
    half = (box[4] / 2, box[3] / 2, box[5] / 2)
    t_near = np.full(len(dirs), -np.inf)
    t_far = np.full(len(dirs), np.inf)
    with np.errstate(divide='ignore', invalid='ignore'):
        for axis in range(3):
            inv = 1.0 / dirs_local[axis]
            t1 = (-half[axis] - origin_local[axis]) * inv
            t2 = (half[axis] - origin_local[axis]) * inv
            t_near = np.fmax(t_near, np.fmin(t1, t2))
            t_far = np.fmin(t_far, np.fmax(t1, t2))
    return np.where((t_far >= t_near) & (t_near > 0), t_near, np.inf)


def ground_distance(origin, dirs):
    """Distance along rays from ``origin`` (3,) to the z = 0 plane (inf for rays not going down)."""
    dz = dirs[..., 2]
    with np.errstate(divide='ignore', invalid='ignore'):
        dist = -origin[2] / dz
    return np.where((dz < -1e-9) & (dist > 0), dist, np.inf)


def local_hits(points, boxes):
    """Hit points (R, 3) on their boxes (R, 7) -> local coordinates normalised to [0, 1] per axis
    (R, 3) (length, width, height; 1 = front/left/top) and the face axis (R,) (0 front/back,
    1 sides, 2 top/bottom)."""
    cos_yaw, sin_yaw = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    rel = points - boxes[:, :3]
    local = np.stack([cos_yaw * rel[:, 0] + sin_yaw * rel[:, 1], -sin_yaw * rel[:, 0] + cos_yaw * rel[:, 1],
                      rel[:, 2]], -1)
    rel_n = local / box_half_extents(boxes)
    face = np.argmax(np.abs(rel_n), axis=-1)
    return np.clip(rel_n * 0.5 + 0.5, 0.0, 1.0), face
