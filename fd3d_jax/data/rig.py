"""The synthetic ego vehicle's sensors: six nuScenes-like cameras and a LIDAR_TOP.

Extrinsics and intrinsics follow the nuScenes calibration of the Renault Zoe (scene-0061's
``calibrated_sensor`` records, rounded; cameras level, yaw 0/±55/180/±110 degrees), with the
1600x900 intrinsics scaled to the rendered image size.
"""
import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data.nuscenes_meta import CAMERA_NAMES, LIDAR_NAME

NUSCENES_IMAGE_WH = (1600, 900)

# channel: (translation in ego frame [m], yaw [deg], fx, cx, cy) at 1600x900.
_CAMERAS = {
    'CAM_FRONT': ((1.70, 0.016, 1.51), 0.0, 1266.4, 816.3, 491.5),
    'CAM_FRONT_RIGHT': ((1.55, -0.493, 1.50), -55.0, 1260.8, 808.0, 495.3),
    'CAM_FRONT_LEFT': ((1.52, 0.495, 1.51), 55.0, 1272.6, 826.6, 479.8),
    'CAM_BACK': ((0.028, 0.003, 1.58), 180.0, 809.2, 829.2, 481.8),
    'CAM_BACK_LEFT': ((1.036, 0.485, 1.59), 110.0, 1256.7, 817.8, 451.9),
    'CAM_BACK_RIGHT': ((1.015, -0.481, 1.56), -110.0, 1259.5, 807.3, 501.2),
}
# LIDAR_TOP: x right, y forward, z up (yaw -90 degrees in the ego frame).
LIDAR_TRANSLATION = (0.943, 0.0, 1.840)
LIDAR_YAW = -np.pi / 2
# Velodyne HDL-32E-like beam layout.
LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
LIDAR_AZIMUTH_STEPS = 1024
LIDAR_MAX_RANGE = 70.0


def camera_rotation(yaw):
    """Camera->ego rotation for a level camera looking along ``yaw`` (camera x right, y down,
    z forward)."""
    cos_yaw, sin_yaw = np.cos(yaw), np.sin(yaw)
    return np.array([[sin_yaw, 0.0, cos_yaw], [-cos_yaw, 0.0, sin_yaw], [0.0, -1.0, 0.0]])


def camera_rig(width, height):
    """Returns ``{channel: dict(translation, rotation (w,x,y,z), intrinsic (3,3))}`` in camera order."""
    sx, sy = width / NUSCENES_IMAGE_WH[0], height / NUSCENES_IMAGE_WH[1]
    rig = {}
    for name in CAMERA_NAMES:
        trans, yaw_deg, focal, cx, cy = _CAMERAS[name]
        rig[name] = dict(
            translation=np.array(trans),
            rotation=geometry.matrix_to_quat(camera_rotation(np.radians(yaw_deg))),
            intrinsic=np.array([[focal * sx, 0.0, cx * sx], [0.0, focal * sy, cy * sy], [0.0, 0.0, 1.0]]),
        )
    return rig


def lidar_calibration():
    return {LIDAR_NAME: dict(translation=np.array(LIDAR_TRANSLATION),
                             rotation=geometry.yaw_to_quat(LIDAR_YAW), intrinsic=None)}
