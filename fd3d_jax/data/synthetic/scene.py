"""Simulates one synthetic scene: writes its images, lidar sweeps, map and CAN-bus poses, and
returns its rows of the nuScenes tables."""
import hashlib
import json
import os

import cv2
import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data.nuscenes_meta import CATEGORY_OF_CLASS, CLASS_NAMES, LIDAR_NAME, VISIBILITY_LEVELS
from fd3d_jax.data import rig
from fd3d_jax.data.synthetic import render, world

ANNOTATION_RANGE = 60.0  # m from the ego; farther actors are not annotated
MAP_MARGIN = 170.0       # m of ground map around the ego route
CAN_BUS_RATE = 50.0      # Hz, the nuScenes CAN-bus `pose` message rate
TIMESTAMP0 = 1533150000000000  # µs


def make_token(*parts):
    """Deterministic 32-hex token (nuScenes style) of its parts."""
    return hashlib.md5('/'.join(str(p) for p in parts).encode()).hexdigest()


def _link(rows):
    for prev_row, next_row in zip(rows[:-1], rows[1:]):
        prev_row['next'], next_row['prev'] = next_row['token'], prev_row['token']
    return rows


def _ego_motion(t_grid, s_grid, road):
    """Ego pose along the route at dense times: (T, 2) xy, (T,) yaw."""
    return road.pose(s_grid, np.full_like(s_grid, world.EGO_D))


def simulate_scene(out_dir, seed, scene_idx, name, image_wh, static_tokens):
    """Writes scene ``name`` under ``out_dir`` and returns ``{table: [rows]}``."""
    rng = np.random.default_rng([seed, scene_idx])
    tok = lambda *parts: make_token(seed, name, *parts)  # noqa: E731
    num_samples = int(rng.integers(20, 41))
    duration = (num_samples - 1) * world.SAMPLE_PERIOD
    t_grid, v_grid, s_grid = world.ego_speed_profile(rng, duration)
    s_grid = s_grid - np.interp(0.0, t_grid, s_grid)  # ego at s=0 at the first sample
    s_end = float(np.interp(duration, t_grid, s_grid))

    road = world.make_road(rng, -500.0, s_end + 500.0, (0.0, 0.0), rng.uniform(-np.pi, np.pi))
    ego_xy, ego_yaw = _ego_motion(t_grid, s_grid, road)
    shift = MAP_MARGIN - ego_xy.min(0)  # global coordinates start at 0 at the map's corner
    road.xy = road.xy + shift
    ego_xy = ego_xy + shift
    map_shape = tuple(np.ceil((ego_xy.max(0) + MAP_MARGIN) / render.MAP_RESOLUTION).astype(int)[::-1])
    ground = render.GroundMap(road, (-500.0, s_end + 500.0), map_shape)
    actors = world.spawn_actors(rng, 0.0, duration, s_end)
    labels = np.array([CLASS_NAMES.index(n) for n in actors.name])

    def ego_s_at(time_s):
        return float(np.interp(time_s, t_grid, s_grid)), float(np.interp(time_s, t_grid, v_grid))

    log_name = f'synthetic-s{seed}-{name}'
    log_token, map_token, scene_token = tok('log'), tok('map'), tok('scene')
    tables = {k: [] for k in ('log', 'map', 'scene', 'sample', 'sample_data', 'ego_pose',
                              'calibrated_sensor', 'sample_annotation', 'instance')}
    os.makedirs(os.path.join(out_dir, 'maps'), exist_ok=True)
    map_file = f'maps/{map_token}.png'
    cv2.imwrite(os.path.join(out_dir, map_file), ground.drivable_png())
    tables['log'].append(dict(token=log_token, logfile=log_name, vehicle='synthetic-ego',
                              date_captured='2018-08-01', location='synthetic-city'))
    tables['map'].append(dict(token=map_token, log_tokens=[log_token], category='semantic_prior',
                              filename=map_file))

    sensors = {**rig.camera_rig(*image_wh), **rig.lidar_calibration()}
    cs_token, sensor2ego = {}, {}
    for channel, calib in sensors.items():
        cs_token[channel] = tok('calibrated_sensor', channel)
        sensor2ego[channel] = geometry.make_transform(calib['rotation'], calib['translation'])
        tables['calibrated_sensor'].append(dict(
            token=cs_token[channel], sensor_token=static_tokens['sensor'][channel],
            translation=calib['translation'].tolist(), rotation=calib['rotation'].tolist(),
            camera_intrinsic=[] if calib['intrinsic'] is None else calib['intrinsic'].tolist()))

    sd_rows = {c: [] for c in sensors}
    ann_rows = {}  # actor index -> rows
    samples = []
    for sample_idx in range(num_samples):
        sample_time = sample_idx * world.SAMPLE_PERIOD
        timestamp = TIMESTAMP0 + scene_idx * 100_000_000 + int(round(sample_time * 1e6))
        s_ego, _ = ego_s_at(sample_time)
        xy, yaw = road.pose(s_ego, world.EGO_D)
        ego2global = geometry.make_transform(geometry.yaw_to_quat(float(yaw)), [xy[0], xy[1], 0.0])
        sample_token = tok('sample', sample_idx)
        samples.append(dict(token=sample_token, timestamp=timestamp, prev='', next='', scene_token=scene_token))

        boxes, speeds = world.actor_states(actors, road, sample_time, ego_s_at)
        dist = np.linalg.norm(boxes[:, :2] - xy, axis=-1)
        own = np.zeros(len(boxes), np.int64)
        visible = np.zeros(len(boxes), np.int64)
        for channel in sensors:
            sensor2global = ego2global @ sensor2ego[channel]
            sd_token = tok('sample_data', channel, sample_idx)
            if channel == LIDAR_NAME:
                points, num_pts = render.lidar_sweep(sensor2global, boxes, labels, rng)
                filename = f'samples/{channel}/{log_name}__{channel}__{timestamp}.pcd.bin'
                os.makedirs(os.path.dirname(os.path.join(out_dir, filename)), exist_ok=True)
                points.tofile(os.path.join(out_dir, filename))
                fmt, width, height = 'pcd', 0, 0
            else:
                img, own_c, vis_c = render.render_camera(
                    ground, sensor2global, sensors[channel]['intrinsic'], image_wh, boxes, labels,
                    actors.color, actors.style, rng)
                own += own_c
                visible += vis_c
                filename = f'samples/{channel}/{log_name}__{channel}__{timestamp}.jpg'
                os.makedirs(os.path.dirname(os.path.join(out_dir, filename)), exist_ok=True)
                cv2.imwrite(os.path.join(out_dir, filename), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
                fmt, (width, height) = 'jpg', image_wh
            ego_token = tok('ego_pose', channel, sample_idx)
            tables['ego_pose'].append(dict(
                token=ego_token, timestamp=timestamp, translation=ego2global[:3, 3].tolist(),
                rotation=geometry.matrix_to_quat(ego2global[:3, :3]).tolist()))
            sd_rows[channel].append(dict(
                token=sd_token, sample_token=sample_token, ego_pose_token=ego_token,
                calibrated_sensor_token=cs_token[channel], timestamp=timestamp, fileformat=fmt,
                is_key_frame=True, height=height, width=width, filename=filename, prev='', next=''))

        fraction = np.where(own > 0, visible / np.maximum(own, 1), 0.0)
        for actor_idx in np.flatnonzero(dist < ANNOTATION_RANGE):
            vis_token = [tok_ for tok_, _, lo in VISIBILITY_LEVELS if fraction[actor_idx] >= lo][-1]
            attr = world.attribute_of(actors.name[actor_idx], speeds[actor_idx], actors.parked[actor_idx])
            ann_rows.setdefault(actor_idx, []).append(dict(
                token=tok('ann', actor_idx, sample_idx), sample_token=sample_token,
                instance_token=tok('instance', actor_idx),
                visibility_token=vis_token,
                attribute_tokens=[static_tokens['attribute'][attr]] if attr else [],
                translation=boxes[actor_idx, :3].tolist(), size=boxes[actor_idx, 3:6].tolist(),
                rotation=geometry.yaw_to_quat(boxes[actor_idx, 6]).tolist(), prev='', next='',
                num_lidar_pts=int(num_pts[actor_idx]), num_radar_pts=0))

    tables['sample'] = _link(samples)
    for channel in sensors:
        tables['sample_data'] += _link(sd_rows[channel])
    for actor_idx, rows in ann_rows.items():
        tables['sample_annotation'] += _link(rows)
        tables['instance'].append(dict(
            token=tok('instance', actor_idx),
            category_token=static_tokens['category'][CATEGORY_OF_CLASS[actors.name[actor_idx]]],
            nbr_annotations=len(rows), first_annotation_token=rows[0]['token'],
            last_annotation_token=rows[-1]['token']))
    tables['scene'].append(dict(token=scene_token, log_token=log_token, nbr_samples=num_samples,
                                first_sample_token=samples[0]['token'],
                                last_sample_token=samples[-1]['token'], name=name,
                                description=f'synthetic street scene, seed {seed}'))
    _write_can_bus(out_dir, name, TIMESTAMP0 + scene_idx * 100_000_000, t_grid, v_grid, ego_xy, ego_yaw)
    return tables


def _write_can_bus(out_dir, name, t0, t_grid, v_grid, ego_xy, ego_yaw):
    """CAN-bus expansion `pose` messages (50 Hz): ego-frame velocity, acceleration (with gravity)
    and rotation rate, global position and orientation."""
    step = max(1, int(round(1.0 / CAN_BUS_RATE / (t_grid[1] - t_grid[0]))))
    yaw = np.unwrap(ego_yaw)
    yaw_rate = np.gradient(yaw, t_grid)
    accel = np.gradient(v_grid, t_grid)
    msgs = []
    for grid_idx in range(0, len(t_grid), step):
        msgs.append(dict(
            utime=int(t0 + round(t_grid[grid_idx] * 1e6)),
            pos=[float(ego_xy[grid_idx, 0]), float(ego_xy[grid_idx, 1]), 0.0],
            orientation=geometry.yaw_to_quat(float(yaw[grid_idx])).tolist(),
            vel=[float(v_grid[grid_idx]), 0.0, 0.0],
            accel=[float(accel[grid_idx]), float(v_grid[grid_idx] * yaw_rate[grid_idx]), 9.81],
            rotation_rate=[0.0, 0.0, float(yaw_rate[grid_idx])]))
    os.makedirs(os.path.join(out_dir, 'can_bus'), exist_ok=True)
    with open(os.path.join(out_dir, 'can_bus', f'{name}_pose.json'), 'w') as can_file:
        json.dump(msgs, can_file)
