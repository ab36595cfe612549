import json
import os
import re
import shutil

import numpy as np
import pytest
from pyquaternion import Quaternion

from fd3d_jax.data import geometry, records
from fd3d_jax.data.nuscenes_meta import CAMERA_NAMES
from tests.data.tables import copy_set, drop_annotations, edit_table, set_splits


def test_records_round_trip_to_the_devkit(nusc, val_records):
    """Records GT moved back to the global frame equals the devkit's annotations; camera paths,
    intrinsics and the camera->LiDAR transforms agree with the tables."""
    assert val_records['version'] == 'v1.0-mini' and val_records['split'] == 'mini_val'
    scene = [s for s in nusc.scene if s['name'] == 'scene-0103'][0]
    assert len(val_records['samples']) == scene['nbr_samples']
    for k, rec in enumerate(val_records['samples']):
        assert rec['frame_idx'] == k and rec['scene_name'] == 'scene-0103'
        sample = nusc.get('sample', rec['token'])
        assert rec['prev'] == sample['prev'] and rec['next'] == sample['next']
        lidar2global = np.asarray(rec['ego2global']) @ np.asarray(rec['lidar2ego'])
        assert [c['channel'] for c in rec['cams']] == list(CAMERA_NAMES)
        for cam in rec['cams']:
            sd = nusc.get('sample_data', sample['data'][cam['channel']])
            assert cam['path'] == sd['filename']
            cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
            np.testing.assert_allclose(cam['intrinsic'], cs['camera_intrinsic'])
            pose = nusc.get('ego_pose', sd['ego_pose_token'])
            cam2global = geometry.make_transform(pose['rotation'], pose['translation']) @ \
                geometry.make_transform(cs['rotation'], cs['translation'])
            np.testing.assert_allclose(lidar2global @ np.asarray(cam['sensor2lidar']), cam2global, atol=1e-9)
        assert len(rec['gt_boxes']) == len(sample['anns'])
        boxes = np.asarray(rec['gt_boxes']).reshape(-1, 7)
        glob = geometry.transform_boxes(lidar2global, boxes)
        for i, ann_token in enumerate(sample['anns']):
            ann = nusc.get('sample_annotation', ann_token)
            np.testing.assert_allclose(glob[i, :3], ann['translation'], atol=1e-9)
            np.testing.assert_allclose(boxes[i, 3:6], ann['size'], atol=1e-12)
            assert abs(geometry.wrap_angle(glob[i, 6] - Quaternion(ann['rotation']).yaw_pitch_roll[0])) < 1e-9
            vel = nusc.box_velocity(ann_token)[:2]
            if np.isnan(vel).any():
                assert not rec['valid_velocity'][i] and rec['gt_velocity'][i] == [0.0, 0.0]
            else:
                gv = np.array([*rec['gt_velocity'][i], 0.0]) @ lidar2global[:3, :3].T
                np.testing.assert_allclose(gv[:2], vel, atol=1e-9)
            assert rec['valid_flag'][i] == (ann['num_lidar_pts'] + ann['num_radar_pts'] > 0)


def test_can_bus_from_the_can_bus_expansion(val_records, synthetic_root):
    """can_bus = ego pose | CAN-bus motion | yaw (rad, deg); the motion is the message after the
    sample time (BEVFormer's quirk)."""
    with open(os.path.join(synthetic_root, 'can_bus', 'scene-0103_pose.json')) as f:
        msgs = json.load(f)
    for rec in val_records['samples'][:5]:
        cb = np.asarray(rec['can_bus'])
        e2g = np.asarray(rec['ego2global'])
        np.testing.assert_allclose(cb[:3], e2g[:3, 3])
        after = [m for m in msgs if m['utime'] > rec['timestamp']][0]
        np.testing.assert_allclose(cb[7:16], after['accel'] + after['rotation_rate'] + after['vel'])
        yaw = np.degrees(geometry.matrix_yaw(e2g[:3, :3])) % 360.0
        assert cb[17] == pytest.approx(yaw) and cb[16] == pytest.approx(np.radians(yaw))


def test_can_bus_from_ego_poses_without_expansion(synthetic_root, tmp_path, val_records, capsys):
    """``can_bus_from_poses=True`` (a set without the expansion): the motion comes from ego-pose finite differences
    and matches the simulated CAN bus within the difference error; one line on stderr says so."""
    from nuscenes import NuScenes
    root = tmp_path / 'nocan'
    root.mkdir()
    for name in ('v1.0-mini', 'maps'):
        os.symlink(os.path.join(synthetic_root, name), root / name)
    nusc = NuScenes('v1.0-mini', str(root), verbose=False)
    recs = records.build_records(nusc, 'mini_val', can_bus_from_poses=True)
    assert recs['can_bus_source'] == {'kind': 'ego_poses'}
    lines = [line for line in capsys.readouterr().err.splitlines() if 'can_bus_from_poses' in line]
    assert len(lines) == 1 and 'estimated from ego poses' in lines[0] and 'official checkpoints' in lines[0], lines
    for a, b in zip(recs['samples'][1:-1], val_records['samples'][1:-1]):
        np.testing.assert_allclose(a['can_bus'][13], b['can_bus'][13], atol=0.6)  # forward speed
        np.testing.assert_allclose(a['can_bus'][:7], b['can_bus'][:7])


def test_bad_inputs_give_clear_errors(nusc, val_records, tmp_path, synthetic_root):
    with pytest.raises(records.RecordsError, match="unknown split 'nope'"):
        records.split_scene_names(nusc, 'nope')
    with pytest.raises(records.RecordsError, match="split 'val' needs a version ending in 'trainval'"):
        records.split_scene_names(nusc, 'val')
    path = tmp_path / 'r.json'
    records.save_records(val_records, str(path))
    with pytest.raises(records.RecordsError, match=f"{path}.*version 'v1.0-mini', expected 'v1.0-trainval'"):
        records.load_records(str(path), version='v1.0-trainval')
    bad = dict(val_records, format='mmdet3d-infos')
    records.save_records(bad, str(path))
    with pytest.raises(records.RecordsError, match=f'{path} is not a {records.FORMAT}'):
        records.load_records(str(path))
    path.write_text('{not json')
    with pytest.raises(records.RecordsError, match='not valid JSON'):
        records.load_records(str(path))
    with pytest.raises(records.RecordsError, match="no nuScenes tables for version 'v1.0-trainval'"):
        records.get_records(synthetic_root, 'v1.0-trainval', 'val')


def test_custom_split_from_splits_json_and_stale_cache(synthetic_root, tmp_path):
    root = tmp_path / 'custom'
    shutil.copytree(os.path.join(synthetic_root, 'v1.0-mini'), root / 'v1.0-mini')
    for name in ('maps', 'samples', 'can_bus'):
        os.symlink(os.path.join(synthetic_root, name), root / name)
    (root / 'v1.0-mini' / 'splits.json').write_text(json.dumps({'both': ['scene-0061', 'scene-0103']}))
    recs = records.get_records(str(root), 'v1.0-mini', 'both')
    assert {r['scene_name'] for r in recs['samples']} == {'scene-0061', 'scene-0103'}
    cached = records.default_records_path(str(root), 'v1.0-mini', 'both')
    assert os.path.exists(cached)
    # Changing the tables invalidates the cache: the records are rebuilt, not served stale.
    scenes = json.loads((root / 'v1.0-mini' / 'scene.json').read_text())
    (root / 'v1.0-mini' / 'scene.json').write_text(json.dumps(scenes[:1]))
    recs = records.get_records(str(root), 'v1.0-mini', 'both')
    assert {r['scene_name'] for r in recs['samples']} == {scenes[0]['name']}


def _scene_samples(nusc, name):
    scene = next(s for s in nusc.scene if s['name'] == name)
    chain, token = [], scene['first_sample_token']
    while token:
        chain.append(nusc.get('sample', token))
        token = chain[-1]['next']
    return chain


def _set_field(table, token, key, value):
    def edit(rows):
        next(r for r in rows if r['token'] == token)[key] = value
    return table, edit


@pytest.mark.parametrize('case', ['camera_intrinsic', 'lidar_rotation', 'lidar_ego_pose', 'camera_ego_pose'])
def test_non_finite_calibration_or_pose_names_sample_table_and_row(case, nusc, synthetic_root, tmp_path):
    """A NaN/inf in a calibrated_sensor or ego_pose row fails the build with the sample, table and
    row tokens."""
    from nuscenes import NuScenes
    chain = _scene_samples(nusc, 'scene-0103')
    k, channel, table, key, value = dict(
        camera_intrinsic=(0, 'CAM_FRONT', 'calibrated_sensor', 'camera_intrinsic',
                          [[float('nan'), 0, 80], [0, 120, 45], [0, 0, 1]]),
        lidar_rotation=(0, 'LIDAR_TOP', 'calibrated_sensor', 'rotation', [float('inf'), 0, 0, 0]),
        lidar_ego_pose=(3, 'LIDAR_TOP', 'ego_pose', 'translation', [float('nan'), 0.0, 0.0]),
        camera_ego_pose=(5, 'CAM_BACK', 'ego_pose', 'rotation', [1.0, 0.0, float('-inf'), 0.0]))[case]
    sd = nusc.get('sample_data', chain[k]['data'][channel])
    row = sd['calibrated_sensor_token' if table == 'calibrated_sensor' else 'ego_pose_token']
    root = copy_set(synthetic_root, tmp_path / 'bad')
    edit_table(root, *_set_field(table, row, key, value))
    with pytest.raises(records.RecordsError, match=f'sample {chain[k]["token"]}: non-finite {key} in {table} {row}'):
        records.build_records(NuScenes('v1.0-mini', root, verbose=False), 'mini_val', can_bus_root=synthetic_root)


def test_samples_out_of_time_order_name_the_scene_and_samples(nusc, synthetic_root, tmp_path):
    from nuscenes import NuScenes
    chain = _scene_samples(nusc, 'scene-0103')
    root = copy_set(synthetic_root, tmp_path / 'bad')
    edit_table(root, 'sample', lambda rows: [dict(r, timestamp=chain[1]['timestamp']) if r['token'] == chain[2]['token']
                                             else r for r in rows])
    with pytest.raises(records.RecordsError, match=f"scene scene-0103: sample {chain[2]['token']} .* does not come "
                       f"after the sample before it, {chain[1]['token']}"):
        records.build_records(NuScenes('v1.0-mini', root, verbose=False), 'mini_val', can_bus_root=synthetic_root)


def test_non_finite_can_bus_names_sample_and_message(nusc, synthetic_root, tmp_path):
    from nuscenes import NuScenes
    root = copy_set(synthetic_root, tmp_path / 'bad', copy=('can_bus',))
    path = os.path.join(root, 'can_bus', 'scene-0103_pose.json')
    with open(path) as f:
        msgs = json.load(f)
    for m in msgs:
        m['vel'] = [float('nan'), 0.0, 0.0]
    with open(path, 'w') as f:
        json.dump(msgs, f)
    first = _scene_samples(nusc, 'scene-0103')[0]
    with pytest.raises(records.RecordsError, match=f"sample {first['token']}: non-finite can_bus vector from the "
                                                   f'message utime [0-9]+ of scene-0103_pose.json'):
        records.build_records(NuScenes('v1.0-mini', root, verbose=False), 'mini_val')


def test_load_records_rejects_non_finite_arrays(val_records, tmp_path):
    path = str(tmp_path / 'r.json')
    for where, field in (('cam', f'{CAMERA_NAMES[2]} sensor2lidar'), ('can_bus', 'can_bus'), ('pose', 'ego2global')):
        bad = json.loads(json.dumps(val_records))  # a deep copy; the fixture is shared
        rec = bad['samples'][2]
        if where == 'cam':
            rec['cams'][2]['sensor2lidar'][1][3] = float('nan')
        elif where == 'can_bus':
            rec['can_bus'][13] = float('inf')
        else:
            rec['ego2global'][0][0] = float('-inf')
        records.save_records(bad, path)
        assert 'NaN' in open(path).read() or 'Infinity' in open(path).read()
        with pytest.raises(records.RecordsError, match=f"{path}: sample {rec['token']} has a non-finite {field};"):
            records.load_records(path)
    bad = json.loads(json.dumps(val_records))
    del bad['samples'][1]['lidar2ego']
    records.save_records(bad, path)
    token = bad['samples'][1]['token']
    with pytest.raises(records.RecordsError, match=f"{path}: sample 1 \\({token}\\) has malformed.*'lidar2ego'"):
        records.load_records(path)


def test_scene_without_annotations_builds_records(synthetic_root, tmp_path, val_records):
    from nuscenes import NuScenes
    root = copy_set(synthetic_root, tmp_path / 'noann')
    drop_annotations(root, 'scene-0103')
    recs = records.build_records(NuScenes('v1.0-mini', root, verbose=False), 'mini_val', can_bus_root=synthetic_root)
    assert [r['token'] for r in recs['samples']] == [r['token'] for r in val_records['samples']]
    for rec in recs['samples']:
        assert rec['gt_boxes'] == [] and rec['gt_names'] == [] and rec['valid_flag'] == []
        assert rec['cams'] == next(r for r in val_records['samples'] if r['token'] == rec['token'])['cams']


def test_scenes_without_samples_are_skipped_with_a_warning(synthetic_root, tmp_path, capsys):
    from nuscenes import NuScenes
    root = copy_set(synthetic_root, tmp_path / 'nosamples')

    def add_empty_scene(rows):
        rows.append(dict(rows[0], token='e' * 32, name='scene-0999', nbr_samples=0, first_sample_token='',
                         last_sample_token=''))
    edit_table(root, 'scene', add_empty_scene)
    set_splits(root, {'with_empty': ['scene-0999', 'scene-0103'], 'only_empty': ['scene-0999']})
    nusc = NuScenes('v1.0-mini', root, verbose=False)
    recs = records.build_records(nusc, 'with_empty', can_bus_root=synthetic_root)
    assert {r['scene_name'] for r in recs['samples']} == {'scene-0103'}
    err = capsys.readouterr().err
    assert "warning: scene scene-0999" in err and "of split 'with_empty' has no samples" in err and 'skipped' in err
    with pytest.raises(records.RecordsError, match="split 'only_empty' has no samples .*scene-0999"):
        records.build_records(nusc, 'only_empty', can_bus_root=synthetic_root)


def _spy_builds(monkeypatch):
    """A list that gets the split of every ``records.build_records`` call."""
    builds, real_build = [], records.build_records

    def counting_build(nusc, split, *args, **kwargs):
        builds.append(split)
        return real_build(nusc, split, *args, **kwargs)
    monkeypatch.setattr(records, 'build_records', counting_build)
    return builds


def _read_only(monkeypatch, folder):
    """``os.access`` says nothing under ``folder`` can be written (chmod does not stop root, who may run the
    tests)."""
    real_access, folder = os.access, os.path.abspath(folder)

    def access(path, mode, **kwargs):
        inside = os.path.abspath(path) == folder or os.path.abspath(path).startswith(folder + os.sep)
        return False if inside and mode & os.W_OK else real_access(path, mode, **kwargs)
    monkeypatch.setattr(os, 'access', access)


def test_records_of_a_read_only_dataroot_go_to_the_user_cache(synthetic_copy, tmp_path, monkeypatch, capsys):
    """``records_dir`` '': ``<dataroot>/fd3d_records`` when fresh records are there or it can be written; else
    ``${XDG_CACHE_HOME}/fd3d_jax/records/<basename>-<hash>``, said in one line."""
    root = synthetic_copy()
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    builds = _spy_builds(monkeypatch)
    records.get_records(root, 'v1.0-mini', 'mini_train')   # writable: in the dataroot, no note
    assert os.path.exists(records.default_records_path(root, 'v1.0-mini', 'mini_train'))
    assert builds == ['mini_train'] and 'cannot be written' not in capsys.readouterr().err
    _read_only(monkeypatch, root)
    records.get_records(root, 'v1.0-mini', 'mini_train')   # fresh records in the read-only dataroot: used
    assert builds == ['mini_train'] and 'cannot be written' not in capsys.readouterr().err
    val = records.get_records(root, 'v1.0-mini', 'mini_val')
    cache = records.user_cache_dir(root)
    assert cache.startswith(str(tmp_path / 'xdg' / 'fd3d_jax' / 'records' / 'set-'))
    assert cache != records.user_cache_dir(str(tmp_path / 'another' / 'set'))
    assert os.path.exists(os.path.join(cache, 'v1.0-mini_mini_val.json'))
    assert not os.path.exists(records.default_records_path(root, 'v1.0-mini', 'mini_val'))
    lines = [line for line in capsys.readouterr().err.splitlines() if 'cannot be written' in line]
    assert lines == [f"note: {os.path.join(root, 'fd3d_records')} cannot be written (a read-only dataroot): records "
                     f'cached in {cache} instead (config data.records_dir chooses the folder)']
    assert records.get_records(root, 'v1.0-mini', 'mini_val') == val and builds == ['mini_train', 'mini_val']


def test_an_unwritable_records_dir_fails_before_the_build(synthetic_root, tmp_path, monkeypatch, val_records):
    """An explicit ``records_dir`` that cannot be written is an error naming ``data.records_dir`` before the
    tables are read; one that holds fresh records is fine."""
    folder = tmp_path / 'records'
    folder.mkdir()
    _read_only(monkeypatch, folder)

    def no_build(*args, **kwargs):
        raise AssertionError('the tables were read')
    monkeypatch.setattr(records, 'load_tables', no_build)
    with pytest.raises(records.RecordsError) as caught:
        records.get_records(synthetic_root, 'v1.0-mini', 'mini_val', str(folder))
    assert str(caught.value).startswith(f'config data.records_dir={folder}: cannot be written')
    records.save_records(val_records, records.default_records_path(synthetic_root, 'v1.0-mini', 'mini_val',
                                                                   str(folder)))
    assert records.get_records(synthetic_root, 'v1.0-mini', 'mini_val', str(folder)) == val_records


def test_a_missing_image_fails_up_front(synthetic_copy, tmp_path, monkeypatch, val_records):
    """Every camera image of the split must exist, when the records are built and when they are loaded from the
    cache: the first missing one is named with its sample token, and how many are missing."""
    root = synthetic_copy()
    first, other = val_records['samples'][2], val_records['samples'][9]
    gone = [os.path.join(root, first['cams'][4]['path']), os.path.join(root, other['cams'][0]['path'])]
    for path in gone:
        os.rename(path, path + '.away')
    cache = str(tmp_path / 'records')
    total = 6 * len(val_records['samples'])
    expected = (f"image not found: {gone[0]} (sample {first['token']}); 2 of the {total} camera images of split "
                f"'mini_val' are missing under {root}")
    with pytest.raises(records.RecordsError) as caught:
        records.get_records(root, 'v1.0-mini', 'mini_val', cache)
    assert str(caught.value) == expected
    builds = _spy_builds(monkeypatch)
    for path in gone:
        os.rename(path + '.away', path)
    records.get_records(root, 'v1.0-mini', 'mini_val', cache)   # the records were cached all the same
    os.remove(gone[1])
    with pytest.raises(records.RecordsError, match=f"^image not found: {re.escape(gone[1])} \\(sample "
                                                   f"{other['token']}\\); 1 of the {total} "):
        records.get_records(root, 'v1.0-mini', 'mini_val', cache)
    assert builds == []
