"""Host-side geometry (numpy, float64): rigid transforms, quaternions, camera projection, boxes.

Conventions: quaternions are nuScenes ``(w, x, y, z)``; a transform ``T_a2b`` is a 4x4 matrix taking
homogeneous points of frame ``a`` to frame ``b``; boxes follow ``nuscenes_meta`` (gravity centre,
``wlh``, nuScenes yaw).
"""
import numpy as np

EPS_DEPTH = 1e-5  # BEVFormer/DETR3D point_sampling eps for the homogeneous depth


def quat_to_matrix(quat):
    """(4,) quaternion (w, x, y, z) -> (3, 3) rotation matrix."""
    qw, qx, qy, qz = np.asarray(quat, dtype=np.float64) / np.linalg.norm(quat)
    return np.array([
        [1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qz * qw), 2 * (qx * qz + qy * qw)],
        [2 * (qx * qy + qz * qw), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qx * qw)],
        [2 * (qx * qz - qy * qw), 2 * (qy * qz + qx * qw), 1 - 2 * (qx * qx + qy * qy)],
    ])


def matrix_to_quat(rot):
    """(3, 3) rotation matrix -> (4,) quaternion (w, x, y, z) with w >= 0."""
    mat = np.asarray(rot, dtype=np.float64)
    tr = np.trace(mat)
    if tr > 0:
        scale = 2.0 * np.sqrt(1.0 + tr)
        quat = [0.25 * scale, (mat[2, 1] - mat[1, 2]) / scale, (mat[0, 2] - mat[2, 0]) / scale,
                (mat[1, 0] - mat[0, 1]) / scale]
    else:
        axis_i = int(np.argmax(np.diag(mat)))
        axis_j, axis_k = (axis_i + 1) % 3, (axis_i + 2) % 3
        scale = 2.0 * np.sqrt(1.0 + mat[axis_i, axis_i] - mat[axis_j, axis_j] - mat[axis_k, axis_k])
        quat = np.zeros(4)
        quat[0] = (mat[axis_k, axis_j] - mat[axis_j, axis_k]) / scale
        quat[1 + axis_i] = 0.25 * scale
        quat[1 + axis_j] = (mat[axis_j, axis_i] + mat[axis_i, axis_j]) / scale
        quat[1 + axis_k] = (mat[axis_k, axis_i] + mat[axis_i, axis_k]) / scale
    quat = np.asarray(quat, dtype=np.float64)
    return quat if quat[0] >= 0 else -quat


def yaw_to_quat(yaw):
    """Rotation by ``yaw`` about +z -> (w, x, y, z)."""
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


def matrix_yaw(rot):
    """Yaw of a rotation: the heading of its rotated x axis in the xy plane (nuScenes
    ``quaternion_yaw``)."""
    rot = np.asarray(rot)
    return float(np.arctan2(rot[1, 0], rot[0, 0]))


def make_transform(rotation, translation):
    """(3,3) rotation or (4,) quaternion, (3,) translation -> (4, 4) transform."""
    rotation = np.asarray(rotation, dtype=np.float64)
    if rotation.shape == (4,):
        rotation = quat_to_matrix(rotation)
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = translation
    return out


def invert_transform(transform):
    """Inverse of a rigid 4x4 transform."""
    rot, trans = transform[:3, :3], transform[:3, 3]
    out = np.eye(4)
    out[:3, :3] = rot.T
    out[:3, 3] = -rot.T @ trans
    return out


def transform_points(transform, points):
    """(4,4) transform, (..., 3) points -> (..., 3)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ transform[:3, :3].T + transform[:3, 3]


def view_pad(intrinsic):
    """(3, 3) camera intrinsic -> (4, 4) ``viewpad`` as in BEVFormer's ``get_data_info``."""
    out = np.eye(4)
    out[:3, :3] = intrinsic
    return out


def lidar2img(intrinsic, sensor2lidar, scale=1.0):
    """(3,3) intrinsic, (4,4) camera->LiDAR -> (4,4) LiDAR->image matrix.

    ``viewpad(K) @ inv(sensor2lidar)``, left-multiplied by ``diag(scale, scale, 1, 1)`` for an image
    resized by ``scale`` (``RandomScaleImageMultiViewImage``).
    """
    out = view_pad(intrinsic) @ invert_transform(sensor2lidar)
    return np.diag([scale, scale, 1.0, 1.0]) @ out


def project_points(points, lidar2img_mat, image_hw=None):
    """Projects LiDAR-frame points with BEVFormer's ``point_sampling`` rules.

    Args:
      points: (..., 3) LiDAR-frame points.
      lidar2img_mat: (4, 4).
      image_hw: optional (H, W); when given the mask also requires ``0 < u < W`` and ``0 < v < H``.
    Returns:
      uv (..., 2) pixels (u right, v down), depth (...,) the homogeneous w', and mask (...,)
      ``w' > eps`` (and inside the image when ``image_hw`` is given).
    """
    points = np.asarray(points, dtype=np.float64)
    hom = np.concatenate([points, np.ones(points.shape[:-1] + (1,))], axis=-1)
    cam = hom @ np.asarray(lidar2img_mat, dtype=np.float64).T
    depth = cam[..., 2]
    uv = cam[..., :2] / np.maximum(depth, EPS_DEPTH)[..., None]
    mask = depth > EPS_DEPTH
    if image_hw is not None:
        height, width = image_hw
        mask &= (uv[..., 0] > 0) & (uv[..., 0] < width) & (uv[..., 1] > 0) & (uv[..., 1] < height)
    return uv, depth, mask


def box_corners(boxes):
    """(n, >=7) boxes (x, y, z, w, l, h, yaw) -> (n, 8, 3) corners.

    Corner order: the four bottom corners counter-clockwise starting front-left
    (+l/2, +w/2), then the four top corners in the same order.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    boxes = boxes.reshape(-1, boxes.shape[-1])
    width, length, height, yaw = boxes[:, 3], boxes[:, 4], boxes[:, 5], boxes[:, 6]
    sx = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * 0.5
    sy = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    sz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) * 0.5
    lx, ly, lz = length[:, None] * sx, width[:, None] * sy, height[:, None] * sz
    cos_yaw, sin_yaw = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    xs = boxes[:, 0:1] + cos_yaw * lx - sin_yaw * ly
    ys = boxes[:, 1:2] + sin_yaw * lx + cos_yaw * ly
    zs = boxes[:, 2:3] + lz
    return np.stack([xs, ys, zs], axis=-1)


def transform_boxes(transform, boxes, velocity=None):
    """Moves boxes (n, 7) (and velocities (n, 2)) by a rigid transform whose rotation is about z
    (up to numerical noise): centres are transformed, yaw gains the transform's yaw, velocities are
    rotated (their z component is taken as 0)."""
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 7)
    out = boxes.copy()
    out[:, :3] = transform_points(transform, boxes[:, :3])
    out[:, 6] = wrap_angle(boxes[:, 6] + matrix_yaw(transform[:3, :3]))
    if velocity is None:
        return out
    velocity = np.asarray(velocity, dtype=np.float64).reshape(-1, 2)
    vel3 = np.concatenate([velocity, np.zeros((len(velocity), 1))], axis=1) @ transform[:3, :3].T
    return out, vel3[:, :2]


def wrap_angle(angle):
    """Wraps angles to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2.0 * np.pi) - np.pi


def can_bus_vector(ego2global, can_pose=None, orientation=None):
    """The 18-d ``can_bus`` vector of BEVFormer's ``get_data_info`` (before temporal deltas).

    Layout: ``pos(3) | orientation(4) | accel(3) | rotation_rate(3) | vel(3) | yaw_rad | yaw_deg``.
    ``pos`` is the ego->global translation; ``orientation`` the ego->global quaternion (w, x, y, z) as given
    (the records pass the ego_pose row's ``rotation`` untouched, as ``get_data_info`` copies it: not renormalised,
    its sign kept), or when None the quaternion of ``ego2global``'s rotation with w >= 0. Yaw (from the matrix,
    so the same for q and -q) is mapped to [0, 360) degrees and stored in radians and degrees. ``can_pose`` is
    the CAN-bus ``pose`` message (dict with accel, rotation_rate, vel; from the CAN-bus expansion, or derived
    from ego poses); zeros when None.
    """
    out = np.zeros(18)
    out[0:3] = ego2global[:3, 3]
    out[3:7] = matrix_to_quat(ego2global[:3, :3]) if orientation is None else np.asarray(orientation, np.float64)
    if can_pose is not None:
        out[7:10] = can_pose['accel']
        out[10:13] = can_pose['rotation_rate']
        out[13:16] = can_pose['vel']
    yaw_deg = np.degrees(matrix_yaw(ego2global[:3, :3]))
    yaw_deg = yaw_deg + 360.0 if yaw_deg < 0 else yaw_deg
    out[16] = np.radians(yaw_deg)
    out[17] = yaw_deg
    return out


def can_bus_delta(can_bus, prev_can_bus):
    """Temporal delta of BEVFormer's ``union2one``/``forward_test``: position and yaw (deg) relative
    to the previous frame of the same scene; ``prev_can_bus=None`` (first frame) zeroes them."""
    out = np.array(can_bus, dtype=np.float64)
    if prev_can_bus is None:
        out[0:3] = 0.0
        out[-1] = 0.0
    else:
        out[0:3] -= prev_can_bus[0:3]
        out[-1] -= prev_can_bus[-1]
    return out


def bev_shift(can_bus, bev_hw, real_hw=(102.4, 102.4)):
    """BEVFormer's ego-motion shift of the previous BEV, in normalised BEV units (x, y).

    From ``PerceptionTransformer.get_bev_features``: with the can_bus delta ``(dx, dy)`` (global
    frame) and absolute ego yaw ``can_bus[-2]``, ``bev_angle = yaw - atan2(dy, dx)`` and
    ``shift = |d| * (sin, cos)(bev_angle) / (grid_length * bev_size)`` = ``|d| * (sin, cos) / real``.
    can_bus: (..., 18) -> (..., 2).
    """
    can_bus = np.asarray(can_bus, np.float64)
    dx, dy = can_bus[..., 0], can_bus[..., 1]
    length = np.sqrt(dx ** 2 + dy ** 2)
    bev_angle = np.degrees(can_bus[..., -2]) - np.degrees(np.arctan2(dy, dx))
    grid_y, grid_x = real_hw[0] / bev_hw[0], real_hw[1] / bev_hw[1]
    shift_y = length * np.cos(np.radians(bev_angle)) / grid_y / bev_hw[0]
    shift_x = length * np.sin(np.radians(bev_angle)) / grid_x / bev_hw[1]
    return np.stack([shift_x, shift_y], -1)


def bev_rotation_index(angle_deg, bev_hw, center):
    """torchvision 0.10 ``rotate(img, angle, center, NEAREST, fill=0)`` of a (C, H, W) BEV map as a
    gather: ``out[q] = valid[q] * prev[index[q]]`` over flattened ``q = row * W + col``.

    Output pixel centre ``p = (col + .5 - W/2, row + .5 - H/2)`` reads the input at
    ``R(angle) (p - c) + c`` with ``c = center - (W/2, H/2)`` (``_get_inverse_affine_matrix`` with
    ``-angle``, then ``_gen_affine_grid``), rounded half-to-even like ``grid_sample`` 'nearest'
    (``align_corners=False``); sources outside the map give 0. Computed in float64 (torch uses
    float32: a cell within ~1e-6 of a rounding tie may pick the other neighbour).
    center: (cx, cy) in pixels, x = column. Returns index (H*W,) int32 and valid (H*W,) bool.
    """
    height, width = bev_hw
    angle_rad = np.radians(angle_deg)
    col, row = np.meshgrid(np.arange(width), np.arange(height))
    px, py = col + 0.5 - width / 2, row + 0.5 - height / 2
    cx, cy = center[0] - width / 2, center[1] - height / 2
    xs = np.cos(angle_rad) * (px - cx) - np.sin(angle_rad) * (py - cy) + cx
    ys = np.sin(angle_rad) * (px - cx) + np.cos(angle_rad) * (py - cy) + cy
    src_col = np.rint(xs + width / 2 - 0.5).astype(np.int64)
    src_row = np.rint(ys + height / 2 - 0.5).astype(np.int64)
    valid = (src_col >= 0) & (src_col < width) & (src_row >= 0) & (src_row < height)
    index = np.clip(src_row, 0, height - 1) * width + np.clip(src_col, 0, width - 1)
    return index.reshape(-1).astype(np.int32), valid.reshape(-1)
