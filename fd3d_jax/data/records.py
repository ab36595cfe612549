"""Per-sample records built with nuscenes-devkit (the role of mmdet3d's info files, as JSON).

A records file holds, for every sample of one split in scene/time order: the six camera image
paths with intrinsics and camera->LiDAR transforms, LiDAR->ego and ego->global poses, BEVFormer's
18-d ``can_bus`` vector (from the CAN-bus expansion when ``<dataroot>/can_bus`` exists, else derived
from ego poses), prev/next/scene links, and the ground truth in the LiDAR frame (boxes
``(x, y, z, w, l, h, yaw)`` with gravity-centre z, velocities, names, point counts, valid flags).

    python -m fd3d_jax.data.records --dataroot D --version V --split S [--out F.json]
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data.nuscenes_meta import CAMERA_NAMES, LIDAR_NAME

FORMAT = 'fd3d_jax.records/1'


class RecordsError(ValueError):
    """A records file or split that cannot be used; the message names the file, split or token."""


def split_scene_names(nusc, split):
    """Scene names of ``split``: a devkit split (checked against the version like DetectionEval
    does) or a key of ``<dataroot>/<version>/splits.json``."""
    from nuscenes.utils.splits import create_splits_scenes
    official = create_splits_scenes()
    version = nusc.version
    if split in official:
        need = {'train': 'trainval', 'val': 'trainval', 'train_detect': 'trainval',
                'train_track': 'trainval', 'test': 'test', 'mini_train': 'mini', 'mini_val': 'mini'}[split]
        if not version.endswith(need):
            raise RecordsError(f"split '{split}' needs a version ending in '{need}', got '{version}'")
        return official[split]
    custom = os.path.join(nusc.dataroot, version, 'splits.json')
    available = sorted(official)
    if os.path.exists(custom):
        with open(custom) as f:
            splits = json.load(f)
        if split in splits:
            return splits[split]
        available += sorted(splits)
    raise RecordsError(f"unknown split '{split}' for {nusc.dataroot} ({version}); "
                       f"available: {', '.join(available)}")


def _transform(record):
    return geometry.make_transform(record['rotation'], record['translation'])


def _can_bus_messages(dataroot, scene_name):
    """CAN-bus `pose` messages of a scene, or None when the expansion (or this scene) is absent."""
    if not os.path.isdir(os.path.join(dataroot, 'can_bus')):
        return None
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus
    try:
        return NuScenesCanBus(dataroot=dataroot).get_messages(scene_name, 'pose', print_warnings=False)
    except Exception:  # scenes without CAN data (the devkit's blacklist, test scenes): zeros as in BEVFormer
        return []


def _can_pose(messages, timestamp):
    """BEVFormer's ``_get_can_bus_info``: accel/rotation_rate/vel are read from the message that
    ends its search loop (the first one after ``timestamp``, or the last message) — a quirk of the
    original kept for parity; pos/orientation are overwritten from the ego pose anyway."""
    if not messages:
        return None
    chosen = messages[-1]
    for msg in messages:
        if msg['utime'] > timestamp:
            chosen = msg
            break
    return chosen


def _pose_motion(ego2globals, timestamps, k):
    """Ego-frame velocity, acceleration and yaw rate at frame k of a scene from its ego poses
    (finite differences; used when there is no CAN bus)."""
    def vel(i):
        j0, j1 = max(i - 1, 0), min(i + 1, len(timestamps) - 1)
        if j0 == j1:
            return np.zeros(3), 0.0
        dt = (timestamps[j1] - timestamps[j0]) * 1e-6
        v_global = (ego2globals[j1][:3, 3] - ego2globals[j0][:3, 3]) / dt
        dyaw = geometry.wrap_angle(geometry.matrix_yaw(ego2globals[j1][:3, :3])
                                   - geometry.matrix_yaw(ego2globals[j0][:3, :3]))
        return ego2globals[i][:3, :3].T @ v_global, float(dyaw) / dt

    v, yaw_rate = vel(k)
    j0, j1 = max(k - 1, 0), min(k + 1, len(timestamps) - 1)
    accel = np.zeros(3)
    if j1 > j0:
        accel = (vel(j1)[0] - vel(j0)[0]) / ((timestamps[j1] - timestamps[j0]) * 1e-6)
    accel[2] += 9.81
    return dict(accel=accel, rotation_rate=np.array([0.0, 0.0, yaw_rate]), vel=v)


def _sample_record(nusc, sample, frame_idx, scene, can_pose):
    from nuscenes.eval.detection.utils import category_to_detection_name
    lidar_sd = nusc.get('sample_data', sample['data'][LIDAR_NAME])
    lidar2ego = _transform(nusc.get('calibrated_sensor', lidar_sd['calibrated_sensor_token']))
    ego2global = _transform(nusc.get('ego_pose', lidar_sd['ego_pose_token']))
    lidar2global = ego2global @ lidar2ego
    global2lidar = geometry.invert_transform(lidar2global)
    cams = []
    for channel in CAMERA_NAMES:
        if channel not in sample['data']:
            raise RecordsError(f"sample {sample['token']} has no {channel} key frame")
        sd = nusc.get('sample_data', sample['data'][channel])
        cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
        cam2global = _transform(nusc.get('ego_pose', sd['ego_pose_token'])) @ _transform(cs)
        cams.append(dict(channel=channel, path=sd['filename'], timestamp=sd['timestamp'],
                         width=sd['width'], height=sd['height'],
                         intrinsic=np.asarray(cs['camera_intrinsic']).tolist(),
                         sensor2lidar=(global2lidar @ cam2global).tolist()))

    boxes, velocity, names, attrs, npts, nradar, instances = [], [], [], [], [], [], []
    for ann_token in sample['anns']:
        ann = nusc.get('sample_annotation', ann_token)
        box = nusc.get_box(ann_token)
        yaw = geometry.matrix_yaw(global2lidar[:3, :3] @ box.rotation_matrix)
        centre = geometry.transform_points(global2lidar, box.center)
        boxes.append([*centre, *box.wlh, yaw])
        vel = nusc.box_velocity(ann_token)
        vel = np.array([vel[0], vel[1], 0.0]) @ global2lidar[:3, :3].T  # NaN stays NaN
        velocity.append(vel[:2].tolist())
        names.append(category_to_detection_name(ann['category_name']) or ann['category_name'])
        attrs.append(nusc.get('attribute', ann['attribute_tokens'][0])['name'] if ann['attribute_tokens'] else '')
        npts.append(ann['num_lidar_pts'])
        nradar.append(ann['num_radar_pts'])
        instances.append(ann['instance_token'])
    velocity = np.asarray(velocity, dtype=np.float64).reshape(-1, 2)
    return dict(
        token=sample['token'], scene_token=scene['token'], scene_name=scene['name'],
        frame_idx=frame_idx, timestamp=sample['timestamp'], prev=sample['prev'], next=sample['next'],
        lidar_path=lidar_sd['filename'], lidar2ego=lidar2ego.tolist(), ego2global=ego2global.tolist(),
        cams=cams, can_bus=geometry.can_bus_vector(ego2global, can_pose).tolist(),
        gt_boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 7).tolist(),
        # NaN velocities (single-annotation instances) are stored as 0 with valid_velocity False.
        gt_velocity=np.nan_to_num(velocity).tolist(),
        valid_velocity=(~np.isnan(velocity).any(axis=1)).tolist(),
        gt_names=names, gt_attributes=attrs, num_lidar_pts=npts, num_radar_pts=nradar,
        valid_flag=[a + b > 0 for a, b in zip(npts, nradar)], instance_tokens=instances)


def build_records(nusc, split):
    """Records of every sample of ``split`` (scenes in table order, samples in time order)."""
    names = set(split_scene_names(nusc, split))
    samples = []
    for scene in nusc.scene:
        if scene['name'] not in names:
            continue
        chain, token = [], scene['first_sample_token']
        while token:
            chain.append(nusc.get('sample', token))
            token = chain[-1]['next']
        messages = _can_bus_messages(nusc.dataroot, scene['name'])
        ego2globals = [_transform(nusc.get('ego_pose', nusc.get('sample_data', s['data'][LIDAR_NAME])['ego_pose_token']))
                       for s in chain]
        timestamps = [s['timestamp'] for s in chain]
        for k, sample in enumerate(chain):
            can_pose = (_can_pose(messages, sample['timestamp']) if messages is not None
                        else _pose_motion(ego2globals, timestamps, k))
            samples.append(_sample_record(nusc, sample, k, scene, can_pose))
    if not samples:
        raise RecordsError(f"split '{split}' has no scenes in {nusc.dataroot} ({nusc.version})")
    return dict(format=FORMAT, version=nusc.version, split=split, dataroot=os.path.abspath(nusc.dataroot),
                fingerprint=tables_fingerprint(nusc.dataroot, nusc.version), samples=samples)


def tables_fingerprint(dataroot, version):
    """Cheap identity of a dataroot's tables (sizes and mtimes), to detect stale records."""
    h = hashlib.sha1()
    for table in ('scene', 'sample', 'sample_data', 'sample_annotation', 'ego_pose', 'calibrated_sensor'):
        path = os.path.join(dataroot, version, f'{table}.json')
        st = os.stat(path)
        h.update(f'{table}:{st.st_size}:{st.st_mtime_ns}'.encode())
    return h.hexdigest()


def save_records(records, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(records, f)
    os.replace(tmp, path)


def load_records(path, version=None, split=None):
    """Loads a records file and checks its format, version and split."""
    try:
        with open(path) as f:
            records = json.load(f)
    except FileNotFoundError:
        raise RecordsError(f'records file not found: {path}') from None
    except json.JSONDecodeError as e:
        raise RecordsError(f'records file {path} is not valid JSON ({e})') from None
    if not isinstance(records, dict) or records.get('format') != FORMAT:
        found = records.get('format') if isinstance(records, dict) else type(records).__name__
        raise RecordsError(f'{path} is not a {FORMAT} records file (format: {found!r}); rebuild it with '
                           f'python -m fd3d_jax.data.records')
    for key, want in (('version', version), ('split', split)):
        if want is not None and records.get(key) != want:
            raise RecordsError(f"records file {path} is for {key} '{records.get(key)}', expected '{want}'")
    return records


def default_records_path(dataroot, version, split, records_dir=''):
    return os.path.join(records_dir or os.path.join(dataroot, 'fd3d_records'), f'{version}_{split}.json')


def get_records(dataroot, version, split, records_dir='', verbose=False):
    """Loads cached records for (dataroot, version, split), (re)building them with the devkit when
    missing or stale."""
    path = default_records_path(dataroot, version, split, records_dir)
    if not os.path.isdir(os.path.join(dataroot, version)):
        raise RecordsError(f"no nuScenes tables for version '{version}' in {dataroot}")
    if os.path.exists(path):
        records = load_records(path, version, split)
        if records.get('fingerprint') == tables_fingerprint(dataroot, version):
            return records
    from nuscenes import NuScenes
    nusc = NuScenes(version=version, dataroot=dataroot, verbose=verbose)
    records = build_records(nusc, split)
    save_records(records, path)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m fd3d_jax.data.records', description=__doc__.split('\n')[0])
    parser.add_argument('--dataroot', required=True)
    parser.add_argument('--version', required=True)
    parser.add_argument('--split', required=True)
    parser.add_argument('--out', default='', help='records file (default: <dataroot>/fd3d_records/<version>_<split>.json)')
    args = parser.parse_args(argv)
    try:
        from nuscenes import NuScenes
        nusc = NuScenes(version=args.version, dataroot=args.dataroot, verbose=False)
        records = build_records(nusc, args.split)
    except (RecordsError, AssertionError) as e:
        sys.exit(f'error: {e}')
    out = args.out or default_records_path(args.dataroot, args.version, args.split)
    save_records(records, out)
    print(f'wrote {len(records["samples"])} records to {out}')


if __name__ == '__main__':
    main()
