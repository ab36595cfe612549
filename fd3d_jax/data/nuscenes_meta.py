"""nuScenes names and conventions shared by the data pipeline, the models and the evaluation.

Box convention used everywhere in fd3d_jax (records, pipeline, models, evaluation):
  a box in the LiDAR (LIDAR_TOP) frame is ``(x, y, z, w, l, h, yaw)`` with ``(x, y, z)`` the
  *gravity* centre, ``(w, l, h)`` the nuScenes ``wlh`` size (``l`` along the heading) and ``yaw``
  the nuScenes heading (counter-clockwise from the frame's +x axis). This is the nuScenes /
  mmdet3d-1.x yaw; the released BEVFormer/DETR3D checkpoints use mmdet3d-0.x's
  ``yaw_0x = -yaw - pi/2`` with the same ``w, l`` order, i.e. their ``(sin, cos)`` outputs map to ours
  by ``(sin yaw, cos yaw) = (-cos yaw_0x, -sin yaw_0x)``.
"""

# The ten detection classes, in the order of the BEVFormer/DETR3D configs (label = index).
CLASS_NAMES = (
    'car', 'truck', 'construction_vehicle', 'bus', 'trailer',
    'barrier', 'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone',
)

# Camera order of the mmdet3d/BEVFormer info files (tools/data_converter/nuscenes_converter.py).
CAMERA_NAMES = (
    'CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT',
    'CAM_BACK', 'CAM_BACK_LEFT', 'CAM_BACK_RIGHT',
)
LIDAR_NAME = 'LIDAR_TOP'

# One nuScenes category per detection class (the synthetic set uses these; the devkit maps them
# back with nuscenes.eval.detection.utils.category_to_detection_name).
CATEGORY_OF_CLASS = {
    'car': 'vehicle.car',
    'truck': 'vehicle.truck',
    'construction_vehicle': 'vehicle.construction',
    'bus': 'vehicle.bus.rigid',
    'trailer': 'vehicle.trailer',
    'barrier': 'movable_object.barrier',
    'motorcycle': 'vehicle.motorcycle',
    'bicycle': 'vehicle.bicycle',
    'pedestrian': 'human.pedestrian.adult',
    'traffic_cone': 'movable_object.trafficcone',
}

ATTRIBUTE_NAMES = (
    'cycle.with_rider', 'cycle.without_rider',
    'pedestrian.moving', 'pedestrian.sitting_lying_down', 'pedestrian.standing',
    'vehicle.moving', 'vehicle.parked', 'vehicle.stopped',
)

# Attribute given to a predicted box, as mmdet3d's NuScenesDataset._format_bbox does: a box faster
# than MOVING_SPEED gets MOVING_ATTRIBUTE[class], a slower one STATIC_ATTRIBUTE[class].
MOVING_ATTRIBUTE = {
    'car': 'vehicle.moving', 'truck': 'vehicle.moving',
    'construction_vehicle': 'vehicle.moving', 'bus': 'vehicle.moving',
    'trailer': 'vehicle.moving', 'barrier': '', 'motorcycle': 'cycle.with_rider',
    'bicycle': 'cycle.with_rider', 'pedestrian': 'pedestrian.moving', 'traffic_cone': '',
}
STATIC_ATTRIBUTE = {
    'car': 'vehicle.parked', 'truck': 'vehicle.parked',
    'construction_vehicle': 'vehicle.parked', 'bus': 'vehicle.stopped',
    'trailer': 'vehicle.parked', 'barrier': '', 'motorcycle': 'cycle.without_rider',
    'bicycle': 'cycle.without_rider', 'pedestrian': 'pedestrian.standing', 'traffic_cone': '',
}
MOVING_SPEED = 0.2  # m/s; mmdet3d's threshold between moving and default attributes

# nuScenes visibility tokens '1'..'4' for fractions [0, .4), [.4, .6), [.6, .8), [.8, 1].
VISIBILITY_LEVELS = (('1', 'v0-40', 0.0), ('2', 'v40-60', 0.4),
                     ('3', 'v60-80', 0.6), ('4', 'v80-100', 0.8))

# BEVFormer's point-cloud range [x_min, y_min, z_min, x_max, y_max, z_max] (metres, LiDAR frame).
POINT_CLOUD_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)

# The devkit's tables (``<dataroot>/<version>/<table>.json``, each a list of records), in the order
# ``nuscenes.NuScenes`` loads them, and the fields of every record that the devkit's reverse index,
# ``fd3d_jax.data.records`` and the devkit's detection evaluation read: a record without one of them is
# reported naming the table file (``records.load_tables``), not as a KeyError deep in the devkit.
TABLE_FIELDS = {
    'category': ('token', 'name'),
    'attribute': ('token', 'name'),
    'visibility': ('token',),
    'instance': ('token', 'category_token'),
    'sensor': ('token', 'channel', 'modality'),
    'calibrated_sensor': ('token', 'sensor_token', 'translation', 'rotation', 'camera_intrinsic'),
    'ego_pose': ('token', 'translation', 'rotation'),
    'log': ('token',),
    'scene': ('token', 'name', 'first_sample_token'),
    'sample': ('token', 'timestamp', 'scene_token', 'prev', 'next'),
    'sample_data': ('token', 'sample_token', 'ego_pose_token', 'calibrated_sensor_token', 'filename',
                    'timestamp', 'is_key_frame', 'width', 'height'),
    'sample_annotation': ('token', 'sample_token', 'instance_token', 'attribute_tokens', 'translation', 'size',
                          'rotation', 'num_lidar_pts', 'num_radar_pts', 'prev', 'next'),
    'map': ('token', 'log_tokens', 'filename'),
}


# ``meta`` of a nuScenes results file (the submission format): which inputs a method used. A camera-only method
# without external data; configs set ``config.submission`` from it (the original configs' ``input_modality``).
SUBMISSION_META = dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False, use_external=False)
