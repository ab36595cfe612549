"""Per-sample records built with nuscenes-devkit (the role of mmdet3d's info files, as JSON).

A records file holds, for every sample of one split in scene/time order: the six camera image
paths with intrinsics and camera->LiDAR transforms, LiDAR->ego and ego->global poses, BEVFormer's
18-d ``can_bus`` vector, prev/next/scene links, and the ground truth in the LiDAR frame (boxes
``(x, y, z, w, l, h, yaw)`` with gravity-centre z, velocities, names, point counts, valid flags).

``can_bus`` is what BEVFormer's converter and ``get_data_info`` give (fundamentalvision/BEVFormer,
tools/data_converter/nuscenes_converter.py ``_get_can_bus_info``,
projects/mmdet3d_plugin/datasets/nuscenes_dataset.py): the ego pose's translation and raw quaternion (the
LIDAR_TOP ego_pose row's ``rotation`` as the table has it), the accel / rotation_rate / vel of a message of the CAN
bus expansion's ``<scene>_pose.json`` (``_can_pose``), and the yaw. The expansion is found by ``resolve_can_bus``
(``data.can_bus_root``; by default ``can_bus/`` beside the dataroot, the official ``data/can_bus`` +
``data/nuscenes`` layout, else inside it); scenes without CAN data (the devkit's ``NuScenesCanBus.can_blacklist``,
no file) get zeros there, as in the original, reported in one line. ``data.can_bus_from_poses=True`` builds without
the expansion, estimating the motion from ego poses (one line says so: the values differ from what official
checkpoints saw). The records name their source (``can_bus_source``).

``get_records`` caches the records in ``data.records_dir``, by default ``<dataroot>/fd3d_records`` or, when that
cannot be written, a user cache folder (``user_cache_dir``); the cache is rebuilt when the tables, the CAN bus
source (its root, the names, sizes and times of its ``*_pose.json``) or ``FORMAT`` change. Before records are
returned every camera image of the split must exist (``check_images``).

Bad input fails with a one-line ``RecordsError``: a CAN bus expansion that is missing, found twice, or has a
``<scene>_pose.json`` that is not valid JSON, not a list of messages or has a message without utime / accel /
rotation_rate / vel (named with the file); a records folder that cannot be written (``data.records_dir``); a
missing camera image (the first one with its sample token, and how many); a non-finite number in a
calibrated_sensor or ego_pose row (named with the sample and row tokens) or in the can_bus vector, when building; a
non-finite calibration, pose or can_bus array of a sample (named with the file and sample token), when loading.
Scenes without annotations are kept (their records have no GT); scenes without samples are skipped
with a warning on stderr, and a split left without samples is an error. Invalid GT boxes are the
pipeline's to reject (``pipeline.ground_truth``). A devkit table that is missing, unreadable, not valid JSON
(a truncated file), not a list of records, or has a record without a field the devkit or this module reads
(``nuscenes_meta.TABLE_FIELDS``) is a ``RecordsError`` that starts with the table's path (``load_tables``).

    python -m fd3d_jax.data.records --dataroot D --version V --split S [--out F.json] [--can-bus-root R]
        [--can-bus-from-poses]

nuscenes-devkit is imported inside the functions that read its tables: it is installed apart (without its
``numpy<2`` pin) and takes seconds to import, which cached records never need.
"""
import argparse
import hashlib
import json
import os
import re
import sys

import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data.nuscenes_meta import CAMERA_NAMES, LIDAR_NAME, TABLE_FIELDS
from fd3d_jax.errors import RecordsError

FORMAT = 'fd3d_jax.records/2'   # /2: can_bus[3:7] is the ego_pose row's raw quaternion; can_bus_source

CAN_POSE_KEYS = ('utime', 'accel', 'rotation_rate', 'vel')   # what the records read of a CAN bus pose message
CAN_SCENE_NAME = re.compile(r'scene-\d{4}')   # NuScenesCanBus.get_messages asserts this form (else: no CAN data)


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


def _lidar_ego_pose(nusc, sample):
    """The ego_pose row of a sample's LIDAR_TOP key frame (checked finite): its ``ego2global``."""
    lidar_sd = nusc.get('sample_data', sample['data'][LIDAR_NAME])
    return _checked_row(nusc, sample['token'], 'ego_pose', lidar_sd['ego_pose_token'])


def _lidar_ego2global(nusc, sample):
    return _transform(_lidar_ego_pose(nusc, sample))


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


def resolve_can_bus(dataroot, can_bus_root='', from_poses=False):
    """The CAN bus source of ``dataroot``'s records: ``{'kind': 'ego_poses'}`` with ``from_poses``
    (``data.can_bus_from_poses``), else ``{'kind': 'can_bus_expansion', 'root': R}``, R the absolute folder holding
    ``can_bus/`` (what ``NuScenesCanBus(dataroot=R)`` takes): ``can_bus_root`` (``data.can_bus_root``) when given,
    else the dataroot's parent (BEVFormer's layout: ``data/can_bus`` beside ``data/nuscenes``) or the dataroot
    itself, whichever holds ``can_bus/``. A one-line RecordsError when the given root holds no ``can_bus/``, when
    both default places hold one (which one the records use must be chosen: ``data.can_bus_root``), when neither
    does, and when ``from_poses`` comes with a ``can_bus_root``."""
    if from_poses:
        if can_bus_root:
            raise RecordsError(f'config data.can_bus_root={can_bus_root} and data.can_bus_from_poses=True exclude each '
                               f'other: clear one of them')
        return dict(kind='ego_poses')
    if can_bus_root:
        root = os.path.abspath(can_bus_root)
        if not os.path.isdir(os.path.join(root, 'can_bus')):
            hint = (' (give the folder that holds can_bus/, not can_bus/ itself)'
                    if os.path.basename(root) == 'can_bus' and os.path.isdir(root) else '')
            raise RecordsError(f'config data.can_bus_root={can_bus_root}: no CAN bus expansion folder '
                               f'{os.path.join(root, "can_bus")}{hint}')
        return dict(kind='can_bus_expansion', root=root)
    inside = os.path.abspath(dataroot)
    beside = os.path.dirname(inside)
    found = [root for root in (beside, inside) if os.path.isdir(os.path.join(root, 'can_bus'))]
    if len(found) == 2 and os.path.samefile(os.path.join(beside, 'can_bus'), os.path.join(inside, 'can_bus')):
        found = found[1:]
    if len(found) == 2:
        raise RecordsError(f'two CAN bus expansions for dataroot {dataroot}: {os.path.join(beside, "can_bus")} '
                           f'(beside it, the official layout) and {os.path.join(inside, "can_bus")} (inside it); '
                           f'set config data.can_bus_root to the folder holding the one to use')
    if not found:
        raise RecordsError(f'no CAN bus expansion for dataroot {dataroot}: neither '
                           f'{os.path.join(beside, "can_bus")} (beside it, the official layout) nor '
                           f'{os.path.join(inside, "can_bus")} exists; set config data.can_bus_root to the folder '
                           f'holding can_bus/ (nuScenes CAN bus expansion), or data.can_bus_from_poses=True to build '
                           f'the records without it (motion estimated from ego poses, unlike the official models)')
    return dict(kind='can_bus_expansion', root=found[0])


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pose_messages_problem(messages):
    """Why ``messages`` (a parsed ``<scene>_pose.json``) is not a list of CAN bus pose messages with the
    ``CAN_POSE_KEYS`` the records read (an integer utime, three numbers each for the others), or None."""
    if not isinstance(messages, list):
        return f'a JSON {type(messages).__name__}, not a list of CAN bus pose messages'
    if not messages:
        return 'no messages (an empty list)'
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f'message {index} is a {type(message).__name__}, not an object'
        missing = [key for key in CAN_POSE_KEYS if key not in message]
        if missing:
            return f"message {index} has no {', '.join(repr(key) for key in missing)}"
        if not isinstance(message['utime'], int) or isinstance(message['utime'], bool):
            return f"message {index}: utime {message['utime']!r} is not an integer"
        for key in CAN_POSE_KEYS[1:]:
            value = message[key]
            if not (isinstance(value, list) and len(value) == 3 and all(_is_number(item) for item in value)):
                return f'message {index} (utime {message["utime"]}): {key} {value!r} is not three numbers'
    return None


def _scene_pose_messages(root, scene_name, blacklist):
    """The CAN bus ``pose`` messages of a scene, read from ``<root>/can_bus/<scene>_pose.json`` as
    ``NuScenesCanBus.get_messages`` reads them, and checked (``_pose_messages_problem``); None when the scene has
    no CAN data: a name the devkit does not take (``scene-NNNN``), a scene of its ``can_blacklist``, no file (the
    test scenes), where BEVFormer's converter catches the devkit's exception and uses zeros. A file that cannot
    be read, is not valid JSON or not such a list is a RecordsError starting with its path."""
    if not CAN_SCENE_NAME.fullmatch(scene_name) or int(scene_name[-4:]) in blacklist:
        return None
    path = os.path.join(root, 'can_bus', f'{scene_name}_pose.json')
    try:
        with open(path) as pose_file:
            messages = json.load(pose_file)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise RecordsError(f'{path}: not valid JSON, the file is truncated or corrupt ({error})') from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecordsError(f'{path}: cannot be read ({_one_line(getattr(error, "strerror", None) or error)})') \
            from None
    problem = _pose_messages_problem(messages)
    if problem:
        raise RecordsError(f'{path}: {problem}')
    return messages


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
    (finite differences; ``data.can_bus_from_poses=True``)."""
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
    ego_pose = _lidar_ego_pose(nusc, sample)
    ego2global = _transform(ego_pose)
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
    # get_data_info: can_bus[3:7] = Quaternion(ego2global_rotation), the row's numbers as they are
    can_bus = geometry.can_bus_vector(ego2global, can_pose, orientation=ego_pose['rotation'])
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


def _scene_records(nusc, scene, chain, messages, from_poses):
    """Records of a scene's samples ``chain``; their CAN motion from ``messages`` (the scene's pose messages,
    None: zeros) or, ``from_poses``, from the ego poses."""
    ego2globals = [_lidar_ego2global(nusc, s) for s in chain]
    timestamps = [s['timestamp'] for s in chain]
    for earlier, later in zip(chain, chain[1:]):
        if later['timestamp'] <= earlier['timestamp']:
            raise RecordsError(f"scene {scene['name']}: sample {later['token']} (timestamp {later['timestamp']}) "
                               f"does not come after the sample before it, {earlier['token']} "
                               f"(timestamp {earlier['timestamp']})")
    out = []
    for frame_idx, sample in enumerate(chain):
        can_pose = (_pose_motion(ego2globals, timestamps, frame_idx) if from_poses
                    else _can_pose(messages, sample['timestamp']))
        out.append(_sample_record(nusc, sample, frame_idx, scene, can_pose))
    return out


NO_CAN_NAMES_SHOWN = 5   # scenes without CAN data named in the build's line


def build_records(nusc, split, can_bus_root='', can_bus_from_poses=False):
    """Records of every sample of ``split`` (scenes in table order, samples in time order), with the CAN bus
    source of ``resolve_can_bus(nusc.dataroot, can_bus_root, can_bus_from_poses)``. Scenes
    without samples are skipped with a warning on stderr; a split without samples is an error. One line on stderr
    says when the motion comes from ego poses, one names the scenes without CAN data (zeros)."""
    names = set(split_scene_names(nusc, split))
    source = resolve_can_bus(nusc.dataroot, can_bus_root, can_bus_from_poses)
    from_poses = source['kind'] == 'ego_poses'
    if from_poses:
        print(f"note: data.can_bus_from_poses=True: the can_bus acceleration, rotation rate and velocity of split "
              f"'{split}' are estimated from ego poses, not read from the CAN bus expansion; they differ from what "
              f'the official checkpoints were trained and evaluated with', file=sys.stderr)
        blacklist = ()
    else:
        from nuscenes.can_bus.can_bus_api import NuScenesCanBus
        blacklist = set(NuScenesCanBus(dataroot=source['root']).can_blacklist)
    samples, empty, no_can = [], [], []
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
        messages = None if from_poses else _scene_pose_messages(source['root'], scene['name'], blacklist)
        if messages is None and not from_poses:
            no_can.append(scene['name'])
        samples.extend(_scene_records(nusc, scene, chain, messages, from_poses))
    if not samples:
        if empty:
            raise RecordsError(f"split '{split}' has no samples in {nusc.dataroot} ({nusc.version}): "
                               f"its scenes {', '.join(empty)} have none")
        raise RecordsError(f"split '{split}' has no scenes in {nusc.dataroot} ({nusc.version})")
    if no_can:
        shown = ', '.join(no_can[:NO_CAN_NAMES_SHOWN]) + (', ...' if len(no_can) > NO_CAN_NAMES_SHOWN else '')
        print(f"note: {len(no_can)} scene(s) of split '{split}' have no CAN bus data in "
              f"{os.path.join(source['root'], 'can_bus')} (NuScenesCanBus.can_blacklist, or no <scene>_pose.json): "
              f'{shown}; their can_bus acceleration, rotation rate and velocity are zeros, as in BEVFormer',
              file=sys.stderr)
    return dict(format=FORMAT, version=nusc.version, split=split, dataroot=os.path.abspath(nusc.dataroot),
                can_bus_source=source, fingerprint=records_fingerprint(nusc.dataroot, nusc.version, source),
                samples=samples)


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


def can_bus_fingerprint(source):
    """Identity of a CAN bus source (``resolve_can_bus``): its kind, and for the expansion its root and the names,
    sizes and mtimes of its ``can_bus/*_pose.json`` (the only files the records read)."""
    if source['kind'] == 'ego_poses':
        return 'ego_poses'
    hasher = hashlib.sha1(f"can_bus_expansion:{source['root']}".encode())
    folder = os.path.join(source['root'], 'can_bus')
    with os.scandir(folder) as entries:
        poses = sorted((entry.name, entry.stat()) for entry in entries if entry.name.endswith('_pose.json'))
    for name, stat in poses:
        hasher.update(f'{name}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
    return hasher.hexdigest()


def records_fingerprint(dataroot, version, source):
    """What makes cached records stale: the tables (``tables_fingerprint``) and the CAN bus source
    (``can_bus_fingerprint``)."""
    both = f'{tables_fingerprint(dataroot, version)}|{can_bus_fingerprint(source)}'
    return hashlib.sha1(both.encode()).hexdigest()


def save_records(records, path):
    """Writes ``records`` to ``path`` atomically (a temporary file, then a rename); a RecordsError naming the file when
    it cannot be written."""
    tmp = f'{path}.{os.getpid()}.tmp'   # processes of one multi-host job may build the same cache at once
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, 'w') as out_file:
            json.dump(records, out_file)
        os.replace(tmp, path)
    except OSError as error:
        raise RecordsError(f'{path}: cannot write the records ({_one_line(error.strerror or error)})') from None


def _read_records_file(path):
    try:
        with open(path) as records_file:
            return json.load(records_file)
    except FileNotFoundError:
        raise RecordsError(f'records file not found: {path}') from None
    except json.JSONDecodeError as error:
        raise RecordsError(f'records file {path} is not valid JSON ({error})') from None


def load_records(path, version=None, split=None):
    """Loads a records file and checks its format, version, split and that its calibration, pose
    and can_bus arrays are finite (JSON as Python writes it allows NaN and Infinity)."""
    return _check_records(_read_records_file(path), path, version, split)


def _check_records(records, path, version, split):
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
    """``<records_dir>/<version>_<split>.json``; ``records_dir`` '' means ``<dataroot>/fd3d_records`` (the first
    place ``get_records`` looks)."""
    return os.path.join(records_dir or os.path.join(dataroot, 'fd3d_records'), f'{version}_{split}.json')


def user_cache_dir(dataroot):
    """Where the records of a dataroot that cannot be written go: ``${XDG_CACHE_HOME:-~/.cache}/fd3d_jax/records/
    <basename>-<hash>``, the hash of the dataroot's absolute path telling apart sets of the same name."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    data = os.path.abspath(dataroot)
    digest = hashlib.sha1(data.encode()).hexdigest()[:12]
    return os.path.join(base, 'fd3d_jax', 'records', f"{os.path.basename(data) or 'root'}-{digest}")


def writable(folder):
    """Whether a file can be created in ``folder``, or, when it does not exist yet, in the nearest existing folder
    above it (where ``save_records`` would create it): ``os.access`` (a read-only mount or missing permission)."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _fresh_records(path, version, split, fingerprint):
    """The records cached at ``path`` when they are of this ``FORMAT`` and ``fingerprint``; None when there are none
    or they are stale (another format, tables or CAN bus source)."""
    if not os.path.exists(path):
        return None
    records = _read_records_file(path)
    if not isinstance(records, dict) or records.get('format') != FORMAT or records.get('fingerprint') != fingerprint:
        return None
    return _check_records(records, path, version, split)


def default_records_folder(dataroot):
    """``<dataroot>/fd3d_records`` when it can be written, else ``user_cache_dir(dataroot)`` (saying so in one line
    on stderr)."""
    folder = os.path.join(dataroot, 'fd3d_records')
    if writable(folder):
        return folder
    cache = user_cache_dir(dataroot)
    print(f'note: {folder} cannot be written (a read-only dataroot): records cached in {cache} instead '
          f'(config data.records_dir chooses the folder)', file=sys.stderr)
    return cache


def check_images(records, dataroot):
    """A one-line RecordsError when a camera image of ``records`` is missing under ``dataroot``: the first one, its
    sample token and how many are missing (before training or evaluation reads a batch)."""
    missing, total = [], 0
    for rec in records['samples']:
        for cam in rec['cams']:
            total += 1
            path = os.path.join(dataroot, cam['path'])
            if not os.path.exists(path):
                missing.append((path, rec['token']))
    if missing:
        path, token = missing[0]
        raise RecordsError(f"image not found: {path} (sample {token}); {len(missing)} of the {total} camera images "
                           f"of split '{records.get('split')}' are missing under {dataroot}")


def get_records(dataroot, version, split, records_dir='', can_bus_root='', can_bus_from_poses=False, verbose=False):
    """Records of (dataroot, version, split), cached: loaded when fresh (``_fresh_records``: same ``FORMAT``, tables
    and CAN bus source), else built with the devkit (``build_records``) and saved. ``records_dir`` ''
    (``data.records_dir``): ``<dataroot>/fd3d_records`` when fresh records are there or it can be written, else
    ``user_cache_dir`` (one line on stderr); a ``records_dir`` that cannot be written is a RecordsError before the
    build. ``can_bus_root`` / ``can_bus_from_poses``: ``resolve_can_bus``. A missing or broken table is a
    RecordsError starting with its path (``load_tables``); a missing camera image one naming it (``check_images``),
    also for cached records."""
    if not os.path.isdir(os.path.join(dataroot, version)):
        raise RecordsError(f"no nuScenes tables for version '{version}' in {dataroot}")
    source = resolve_can_bus(dataroot, can_bus_root, can_bus_from_poses)
    fingerprint = records_fingerprint(dataroot, version, source)
    path = default_records_path(dataroot, version, split, records_dir)
    records = _fresh_records(path, version, split, fingerprint)
    if records is None and records_dir and not writable(records_dir):
        raise RecordsError(f'config data.records_dir={records_dir}: cannot be written (no permission or a read-only '
                           f"file system) and holds no fresh records of split '{split}'; choose a writable folder")
    if records is None and not records_dir:
        folder = default_records_folder(dataroot)
        if folder != os.path.dirname(path):
            path = os.path.join(folder, os.path.basename(path))
            records = _fresh_records(path, version, split, fingerprint)
            if records is None and not writable(folder):
                raise RecordsError(f'neither {os.path.join(dataroot, "fd3d_records")} nor the user cache {folder} '
                                   f'can be written; set config data.records_dir to a writable folder')
    if records is None:
        records = build_records(load_tables(dataroot, version, verbose), split, can_bus_root, can_bus_from_poses)
        save_records(records, path)
    check_images(records, dataroot)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m fd3d_jax.data.records', description=__doc__.split('\n')[0])
    parser.add_argument('--dataroot', required=True)
    parser.add_argument('--version', required=True)
    parser.add_argument('--split', required=True)
    parser.add_argument('--out', default='', help='records file (default: <dataroot>/fd3d_records/'
                        '<version>_<split>.json, or the user cache folder when the dataroot cannot be written)')
    parser.add_argument('--can-bus-root', default='', help='folder holding can_bus/, the CAN bus expansion '
                        '(data.can_bus_root; default: beside the dataroot, else inside it)')
    parser.add_argument('--can-bus-from-poses', action='store_true', help='no CAN bus expansion: estimate the motion '
                        'of can_bus from ego poses (data.can_bus_from_poses; differs from what official models saw)')
    args = parser.parse_args(argv)
    try:
        if args.out and not writable(os.path.dirname(os.path.abspath(args.out))):
            raise RecordsError(f'--out {args.out}: its folder cannot be written')
        out = args.out or os.path.join(default_records_folder(args.dataroot),
                                       os.path.basename(default_records_path(args.dataroot, args.version, args.split)))
        records = build_records(load_tables(args.dataroot, args.version), args.split, args.can_bus_root,
                                args.can_bus_from_poses)
        save_records(records, out)
    except (RecordsError, AssertionError) as error:
        sys.exit(f'error: {error}')
    print(f'wrote {len(records["samples"])} records to {out}')


if __name__ == '__main__':
    main()
