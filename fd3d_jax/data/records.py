"""Per-sample records built with nuscenes-devkit (the role of mmdet3d's info files, as JSON).

A records file holds, for every sample of one split in scene/time order: the six camera image
paths with intrinsics and camera->LiDAR transforms, LiDAR->ego and ego->global poses, BEVFormer's
18-d ``can_bus`` vector (from the CAN-bus expansion when ``<dataroot>/can_bus`` exists, else derived
from ego poses), prev/next/scene links, and the ground truth in the LiDAR frame (boxes
``(x, y, z, w, l, h, yaw)`` with gravity-centre z, velocities, names, point counts, valid flags).

Bad input fails with a ``RecordsError``: a non-finite number in a calibrated_sensor or ego_pose row
(named with the sample and row tokens) or in the can_bus vector, when building; a non-finite
calibration, pose or can_bus array of a sample (named with the file and sample token), when loading.
Scenes without annotations are kept (their records have no GT); scenes without samples are skipped
with a warning on stderr, and a split left without samples is an error. Invalid GT boxes are the
pipeline's to reject (``pipeline.ground_truth``). A devkit table that is missing, unreadable, not valid JSON
(a truncated file), not a list of records, or has a record without a field the devkit or this module reads
(``nuscenes_meta.TABLE_FIELDS``) is a ``RecordsError`` that starts with the table's path (``load_tables``).

    python -m fd3d_jax.data.records --dataroot D --version V --split S [--out F.json]

nuscenes-devkit is imported inside the functions that read its tables: it is installed apart (without its
``numpy<2`` pin) and takes seconds to import, which cached records never need.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data.nuscenes_meta import CAMERA_NAMES, LIDAR_NAME, TABLE_FIELDS
from fd3d_jax.errors import RecordsError

FORMAT = 'fd3d_jax.records/1'


def split_scene_names(nusc, split):
    """Scene names of ``split``: a devkit split (checked against the version like DetectionEval
    does), a key of ``<dataroot>/<version>/splits.json``, or a union ``A+B`` of those (``train+val``: the final
    models' schedule on every annotated scene)."""
    from nuscenes.utils.splits import create_splits_scenes
    if '+' in split:
        return [name for part in split.split('+') for name in split_scene_names(nusc, part)]
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
        try:
            with open(custom) as splits_file:
                splits = json.load(splits_file)
        except (OSError, ValueError) as error:   # ValueError: not JSON (JSONDecodeError), not UTF-8
            raise RecordsError(f'{custom}: cannot be read as JSON ({_one_line(error)})') from None
        if not isinstance(splits, dict):
            raise RecordsError(f'{custom}: a {type(splits).__name__}, not an object of split names to scene names')
        if split in splits:
            return splits[split]
        available += sorted(splits)
    raise RecordsError(f"unknown split '{split}' for {nusc.dataroot} ({version}); "
                       f"available: {', '.join(available)}")


def _one_line(error):
    """An exception's message on one line (the devkit's assertions and JSON errors may span several)."""
    return ' '.join(str(error).split())


def table_path(dataroot, version, table):
    """``<dataroot>/<version>/<table>.json``."""
    return os.path.join(dataroot, version, f'{table}.json')


def _missing_table(path, version):
    return RecordsError(f'{path}: no such file (a table of nuScenes {version}: the dataroot is incomplete)')


def _field_problem(path, rows, fields):
    """``'<path>: ...'`` naming the first record of ``rows`` (a table's list) that is not an object or lacks one
    of ``fields``, or None."""
    wanted = set(fields)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            return f'{path}: record {index} is a {type(row).__name__}, not an object'
        if not wanted <= row.keys():
            missing = ', '.join(repr(name) for name in fields if name not in row)
            return f"{path}: record {index} (token {row.get('token')!r}) has no field {missing}"
    return None


def check_table(dataroot, version, table):
    """The rows of ``<dataroot>/<version>/<table>.json``; a RecordsError starting with its path when the file is
    missing, unreadable, not valid JSON (a truncated or overwritten file), not a list of records, or has a record
    without one of the fields ``TABLE_FIELDS[table]``."""
    path = table_path(dataroot, version, table)
    try:
        with open(path) as table_file:
            rows = json.load(table_file)
    except FileNotFoundError:
        raise _missing_table(path, version) from None
    except json.JSONDecodeError as error:
        raise RecordsError(f'{path}: not valid JSON, the file is truncated or corrupt ({error})') from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecordsError(f'{path}: cannot be read ({_one_line(getattr(error, "strerror", None) or error)})') \
            from None
    if not isinstance(rows, list):
        raise RecordsError(f'{path}: a JSON {type(rows).__name__}, not a list of records')
    problem = _field_problem(path, rows, TABLE_FIELDS.get(table, ('token',)))
    if problem:
        raise RecordsError(problem)
    return rows


def load_tables(dataroot, version, verbose=False):
    """The devkit's ``NuScenes`` of ``dataroot`` / ``version``. When the devkit cannot load it, every table is
    checked on its own (``check_table``) and the first bad one is a RecordsError starting with its path; a
    failure no single table explains (a token that no row of the table it points into has) is a RecordsError
    naming the version folder and the devkit's error. The loaded tables are checked for the fields of
    ``TABLE_FIELDS`` too: the devkit reads only some of them while loading."""
    from nuscenes import NuScenes
    try:
        nusc = NuScenes(version=version, dataroot=dataroot, verbose=verbose)
    except MemoryError:
        raise
    except Exception as error:   # the devkit's FileNotFoundError, JSONDecodeError, KeyError, AssertionError, ...
        cause = f'{type(error).__name__}: {_one_line(error)}'
    else:
        for table, fields in TABLE_FIELDS.items():
            problem = _field_problem(table_path(dataroot, version, table), getattr(nusc, table), fields)
            if problem:
                raise RecordsError(problem)
        return nusc
    for table in TABLE_FIELDS:
        check_table(dataroot, version, table)
    raise RecordsError(f'{os.path.join(dataroot, version)}: the nuScenes devkit cannot load these tables ({cause})')


def _transform(record):
    return geometry.make_transform(record['rotation'], record['translation'])


def _checked_row(nusc, sample_token, table, token, keys=('rotation', 'translation')):
    """Row ``token`` of ``table``; a RecordsError naming the sample, table and row when one of its
    ``keys`` holds a non-finite number."""
    row = nusc.get(table, token)
    for key in keys:
        if not np.isfinite(np.asarray(row[key], np.float64)).all():
            raise RecordsError(f"sample {sample_token}: non-finite {key} in {table} {token}: {row[key]}")
    return row


def _lidar_ego2global(nusc, sample):
    lidar_sd = nusc.get('sample_data', sample['data'][LIDAR_NAME])
    return _transform(_checked_row(nusc, sample['token'], 'ego_pose', lidar_sd['ego_pose_token']))


def _array_fields(rec):
    """(name, value) of a record's calibration, pose and can_bus arrays."""
    fields = [('lidar2ego', rec['lidar2ego']), ('ego2global', rec['ego2global']), ('can_bus', rec['can_bus'])]
    return fields + [(f"{cam['channel']} {key}", cam[key])
                     for cam in rec['cams'] for key in ('intrinsic', 'sensor2lidar')]


def non_finite_field(rec):
    """Name of the first calibration/pose/can_bus array of a record with a non-finite number (one
    vectorised check when all are finite), or None."""
    fields = _array_fields(rec)
    if np.isfinite(np.concatenate([np.ravel(np.asarray(v, np.float64)) for _, v in fields])).all():
        return None
    return next(name for name, v in fields if not np.isfinite(np.asarray(v, np.float64)).all())


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


def _pose_motion(ego2globals, timestamps, frame_idx):
    """Ego-frame velocity, acceleration and yaw rate at frame ``frame_idx`` of a scene from its ego poses
    (finite differences; used when there is no CAN bus)."""
    def vel(index):
        j0, j1 = max(index - 1, 0), min(index + 1, len(timestamps) - 1)
        if j0 == j1:
            return np.zeros(3), 0.0
        dt = (timestamps[j1] - timestamps[j0]) * 1e-6
        v_global = (ego2globals[j1][:3, 3] - ego2globals[j0][:3, 3]) / dt
        dyaw = geometry.wrap_angle(geometry.matrix_yaw(ego2globals[j1][:3, :3])
                                   - geometry.matrix_yaw(ego2globals[j0][:3, :3]))
        return ego2globals[index][:3, :3].T @ v_global, float(dyaw) / dt

    velocity, yaw_rate = vel(frame_idx)
    j0, j1 = max(frame_idx - 1, 0), min(frame_idx + 1, len(timestamps) - 1)
    accel = np.zeros(3)
    if j1 > j0:
        accel = (vel(j1)[0] - vel(j0)[0]) / ((timestamps[j1] - timestamps[j0]) * 1e-6)
    accel[2] += 9.81
    return dict(accel=accel, rotation_rate=np.array([0.0, 0.0, yaw_rate]), vel=velocity)


def _sample_record(nusc, sample, frame_idx, scene, can_pose):
    from nuscenes.eval.detection.utils import category_to_detection_name
    token = sample['token']
    lidar_sd = nusc.get('sample_data', sample['data'][LIDAR_NAME])
    lidar2ego = _transform(_checked_row(nusc, token, 'calibrated_sensor', lidar_sd['calibrated_sensor_token']))
    ego2global = _lidar_ego2global(nusc, sample)
    lidar2global = ego2global @ lidar2ego
    global2lidar = geometry.invert_transform(lidar2global)
    cams = []
    for channel in CAMERA_NAMES:
        if channel not in sample['data']:
            raise RecordsError(f"sample {sample['token']} has no {channel} key frame")
        sd = nusc.get('sample_data', sample['data'][channel])
        cs = _checked_row(nusc, token, 'calibrated_sensor', sd['calibrated_sensor_token'],
                          ('rotation', 'translation', 'camera_intrinsic'))
        cam2global = _transform(_checked_row(nusc, token, 'ego_pose', sd['ego_pose_token'])) @ _transform(cs)
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
    can_bus = geometry.can_bus_vector(ego2global, can_pose)
    if not np.isfinite(can_bus).all():
        source = (f"message utime {can_pose['utime']} of {scene['name']}_pose.json of the CAN-bus expansion"
                  if can_pose is not None and 'utime' in can_pose else f"ego poses of {scene['name']}")
        raise RecordsError(f'sample {token}: non-finite can_bus vector from the {source}: {can_bus.tolist()}')
    rec = dict(
        token=token, scene_token=scene['token'], scene_name=scene['name'],
        frame_idx=frame_idx, timestamp=sample['timestamp'], prev=sample['prev'], next=sample['next'],
        lidar_path=lidar_sd['filename'], lidar2ego=lidar2ego.tolist(), ego2global=ego2global.tolist(),
        cams=cams, can_bus=can_bus.tolist(),
        gt_boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 7).tolist(),
        # NaN velocities (single-annotation instances) are stored as 0 with valid_velocity False.
        gt_velocity=np.nan_to_num(velocity).tolist(),
        valid_velocity=(~np.isnan(velocity).any(axis=1)).tolist(),
        gt_names=names, gt_attributes=attrs, num_lidar_pts=npts, num_radar_pts=nradar,
        valid_flag=[a + b > 0 for a, b in zip(npts, nradar)], instance_tokens=instances)
    bad = non_finite_field(rec)  # finite rows can still give NaN (a zero quaternion)
    if bad:
        raise RecordsError(f'sample {token}: non-finite {bad} computed from its calibrated_sensor and ego_pose rows')
    return rec


def _scene_chain(nusc, scene):
    """The samples of a scene in time order ([] when it has no first sample)."""
    chain, token = [], scene['first_sample_token']
    while token:
        try:
            chain.append(nusc.get('sample', token))
        except KeyError:
            raise RecordsError(f"scene {scene['name']} links to sample {token}, which is not in the sample "
                               f'table') from None
        token = chain[-1]['next']
    return chain


def _scene_records(nusc, scene, chain):
    messages = _can_bus_messages(nusc.dataroot, scene['name'])
    ego2globals = [_lidar_ego2global(nusc, s) for s in chain]
    timestamps = [s['timestamp'] for s in chain]
    for earlier, later in zip(chain, chain[1:]):
        if later['timestamp'] <= earlier['timestamp']:
            raise RecordsError(f"scene {scene['name']}: sample {later['token']} (timestamp {later['timestamp']}) "
                               f"does not come after the sample before it, {earlier['token']} "
                               f"(timestamp {earlier['timestamp']})")
    out = []
    for frame_idx, sample in enumerate(chain):
        can_pose = (_can_pose(messages, sample['timestamp']) if messages is not None
                    else _pose_motion(ego2globals, timestamps, frame_idx))
        out.append(_sample_record(nusc, sample, frame_idx, scene, can_pose))
    return out


def build_records(nusc, split):
    """Records of every sample of ``split`` (scenes in table order, samples in time order). Scenes
    without samples are skipped with a warning on stderr; a split without samples is an error."""
    names = set(split_scene_names(nusc, split))
    samples, empty = [], []
    for scene in nusc.scene:
        if scene['name'] not in names:
            continue
        chain = _scene_chain(nusc, scene)
        if not chain:
            print(f"warning: scene {scene['name']} ({scene['token']}) of split '{split}' has no samples "
                  f"(nbr_samples {scene.get('nbr_samples')}, first_sample_token "
                  f"{scene['first_sample_token']!r}); skipped", file=sys.stderr)
            empty.append(scene['name'])
            continue
        samples.extend(_scene_records(nusc, scene, chain))
    if not samples:
        if empty:
            raise RecordsError(f"split '{split}' has no samples in {nusc.dataroot} ({nusc.version}): "
                               f"its scenes {', '.join(empty)} have none")
        raise RecordsError(f"split '{split}' has no scenes in {nusc.dataroot} ({nusc.version})")
    return dict(format=FORMAT, version=nusc.version, split=split, dataroot=os.path.abspath(nusc.dataroot),
                fingerprint=tables_fingerprint(nusc.dataroot, nusc.version), samples=samples)


def tables_fingerprint(dataroot, version):
    """Cheap identity of a dataroot's tables (sizes and mtimes), to detect stale records."""
    hasher = hashlib.sha1()
    for table in ('scene', 'sample', 'sample_data', 'sample_annotation', 'ego_pose', 'calibrated_sensor'):
        path = table_path(dataroot, version, table)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise _missing_table(path, version) from None
        hasher.update(f'{table}:{st.st_size}:{st.st_mtime_ns}'.encode())
    return hasher.hexdigest()


def save_records(records, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'   # processes of one multi-host job may build the same cache at once
    with open(tmp, 'w') as out_file:
        json.dump(records, out_file)
    os.replace(tmp, path)


def load_records(path, version=None, split=None):
    """Loads a records file and checks its format, version, split and that its calibration, pose
    and can_bus arrays are finite (JSON as Python writes it allows NaN and Infinity)."""
    try:
        with open(path) as records_file:
            records = json.load(records_file)
    except FileNotFoundError:
        raise RecordsError(f'records file not found: {path}') from None
    except json.JSONDecodeError as error:
        raise RecordsError(f'records file {path} is not valid JSON ({error})') from None
    if not isinstance(records, dict) or records.get('format') != FORMAT:
        found = records.get('format') if isinstance(records, dict) else type(records).__name__
        raise RecordsError(f'{path} is not a {FORMAT} records file (format: {found!r}); rebuild it with '
                           f'python -m fd3d_jax.data.records')
    for key, want in (('version', version), ('split', split)):
        if want is not None and records.get(key) != want:
            raise RecordsError(f"records file {path} is for {key} '{records.get(key)}', expected '{want}'")
    for index, rec in enumerate(records.get('samples', [])):
        try:
            bad = non_finite_field(rec)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            token = rec.get('token') if isinstance(rec, dict) else None
            raise RecordsError(f'records file {path}: sample {index} ({token}) has malformed calibration, pose or '
                               f'can_bus arrays ({type(error).__name__}: {error}); rebuild it') from None
        if bad:
            raise RecordsError(f"records file {path}: sample {rec['token']} has a non-finite {bad}; check the "
                               f'tables and rebuild it with python -m fd3d_jax.data.records')
    return records


def default_records_path(dataroot, version, split, records_dir=''):
    return os.path.join(records_dir or os.path.join(dataroot, 'fd3d_records'), f'{version}_{split}.json')


def get_records(dataroot, version, split, records_dir='', verbose=False):
    """Loads cached records for (dataroot, version, split), (re)building them with the devkit when
    missing or stale (a table that changed size or time since). A missing or broken table is a RecordsError
    starting with its path (``load_tables``)."""
    path = default_records_path(dataroot, version, split, records_dir)
    if not os.path.isdir(os.path.join(dataroot, version)):
        raise RecordsError(f"no nuScenes tables for version '{version}' in {dataroot}")
    if os.path.exists(path):
        records = load_records(path, version, split)
        if records.get('fingerprint') == tables_fingerprint(dataroot, version):
            return records
    records = build_records(load_tables(dataroot, version, verbose), split)
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
        records = build_records(load_tables(args.dataroot, args.version), args.split)
    except (RecordsError, AssertionError) as error:
        sys.exit(f'error: {error}')
    out = args.out or default_records_path(args.dataroot, args.version, args.split)
    save_records(records, out)
    print(f'wrote {len(records["samples"])} records to {out}')


if __name__ == '__main__':
    main()
