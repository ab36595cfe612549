"""The can_bus vector of the records as BEVFormer's converter and ``get_data_info`` make it: the raw ego-pose
quaternion, the CAN bus expansion found beside or inside the dataroot (``records.resolve_can_bus``), zeros for
scenes without CAN data, one-line errors for a missing, doubled or corrupt expansion, and a cache that follows the
CAN bus source."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from fd3d_jax.data import records
from fd3d_jax.errors import RecordsError
from tests.data.tables import VERSION, edit_table, set_splits


def _nusc(root):
    from nuscenes import NuScenes
    return NuScenes(VERSION, root, verbose=False)


def _one_line(caught):
    message = str(caught.value)
    assert '\n' not in message, message
    return message


def _notes(capsys, needle):
    return [line for line in capsys.readouterr().err.splitlines() if needle in line]


def test_records_keep_the_raw_ego_pose_quaternion(synthetic_copy, nusc, val_records):
    """can_bus[3:7] is the LIDAR_TOP ego_pose row's ``rotation`` exactly as the table has it (get_data_info copies
    it): a negated quaternion (the same rotation) stays negated, w < 0, and the yaw does not change."""
    root = synthetic_copy()
    sample = nusc.get('sample', val_records['samples'][3]['token'])
    pose_token = nusc.get('sample_data', sample['data']['LIDAR_TOP'])['ego_pose_token']
    negated = {}

    def negate(rows):
        row = next(r for r in rows if r['token'] == pose_token)
        row['rotation'] = [-value for value in row['rotation']]
        negated.update(row)
    edit_table(root, 'ego_pose', negate)
    edited = _nusc(root)
    built = records.build_records(edited, 'mini_val')
    for new, old in zip(built['samples'], val_records['samples']):
        sample = edited.get('sample', new['token'])
        pose = edited.get('ego_pose', edited.get('sample_data', sample['data']['LIDAR_TOP'])['ego_pose_token'])
        assert new['can_bus'][3:7] == pose['rotation']   # the table's numbers, bit for bit
        np.testing.assert_allclose(new['ego2global'], old['ego2global'], atol=1e-12)
        assert new['can_bus'][16:] == pytest.approx(old['can_bus'][16:], abs=1e-9)
    changed = built['samples'][3]['can_bus']
    assert changed[3:7] == negated['rotation'] and changed[3] < 0
    assert changed[3:7] == pytest.approx([-value for value in val_records['samples'][3]['can_bus'][3:7]], abs=1e-12)


def test_the_expansion_is_found_beside_or_inside_the_dataroot(tmp_path):
    beside_root, inside_root = tmp_path / 'beside', tmp_path / 'inside'
    os.makedirs(beside_root / 'can_bus')
    os.makedirs(beside_root / 'nuscenes')
    os.makedirs(inside_root / 'nuscenes' / 'can_bus')
    found = records.resolve_can_bus(str(beside_root / 'nuscenes'))
    assert found == {'kind': 'can_bus_expansion', 'root': str(beside_root)}
    found = records.resolve_can_bus(str(inside_root / 'nuscenes'))
    assert found == {'kind': 'can_bus_expansion', 'root': str(inside_root / 'nuscenes')}
    os.makedirs(beside_root / 'nuscenes' / 'can_bus')   # both: which one is a choice
    with pytest.raises(RecordsError) as caught:
        records.resolve_can_bus(str(beside_root / 'nuscenes'))
    message = _one_line(caught)
    assert (f"two CAN bus expansions for dataroot {beside_root / 'nuscenes'}: {beside_root / 'can_bus'} "
            f"(beside it, the official layout) and {beside_root / 'nuscenes' / 'can_bus'}") in message
    assert 'data.can_bus_root' in message
    chosen = records.resolve_can_bus(str(beside_root / 'nuscenes'), can_bus_root=str(beside_root / 'nuscenes'))
    assert chosen['root'] == str(beside_root / 'nuscenes')
    os.makedirs(tmp_path / 'neither' / 'nuscenes')
    with pytest.raises(RecordsError) as caught:
        records.resolve_can_bus(str(tmp_path / 'neither' / 'nuscenes'))
    message = _one_line(caught)
    assert f"neither {tmp_path / 'neither' / 'can_bus'} (beside it" in message
    assert f"nor {tmp_path / 'neither' / 'nuscenes' / 'can_bus'} exists" in message
    assert 'data.can_bus_root' in message and 'data.can_bus_from_poses=True' in message
    assert records.resolve_can_bus(str(tmp_path / 'neither' / 'nuscenes'), from_poses=True) == {'kind': 'ego_poses'}


def test_an_explicit_root_must_hold_can_bus(tmp_path):
    os.makedirs(tmp_path / 'data' / 'can_bus')
    with pytest.raises(RecordsError) as caught:
        records.resolve_can_bus(str(tmp_path / 'data'), can_bus_root=str(tmp_path / 'elsewhere'))
    assert _one_line(caught).startswith(f"config data.can_bus_root={tmp_path / 'elsewhere'}: no CAN bus expansion "
                                        f"folder {tmp_path / 'elsewhere' / 'can_bus'}")
    with pytest.raises(RecordsError, match='give the folder that holds can_bus/, not can_bus/ itself'):
        records.resolve_can_bus(str(tmp_path / 'data'), can_bus_root=str(tmp_path / 'data' / 'can_bus'))
    with pytest.raises(RecordsError, match='data.can_bus_root=.* and data.can_bus_from_poses=True exclude each other'):
        records.resolve_can_bus(str(tmp_path / 'data'), can_bus_root=str(tmp_path / 'data'), from_poses=True)


def test_records_read_the_expansion_beside_the_dataroot(synthetic_copy, tmp_path, val_records):
    """The official layout (``data/can_bus`` beside ``data/nuscenes``): the records read it and name it."""
    root = synthetic_copy(tmp_path / 'data' / 'nuscenes')
    shutil.move(os.path.join(root, 'can_bus'), tmp_path / 'data' / 'can_bus')
    got = records.get_records(root, VERSION, 'mini_val', str(tmp_path / 'records'))
    assert got['can_bus_source'] == {'kind': 'can_bus_expansion', 'root': str(tmp_path / 'data')}
    assert [rec['can_bus'] for rec in got['samples']] == [rec['can_bus'] for rec in val_records['samples']]
    assert val_records['can_bus_source']['root'] == os.path.abspath(val_records['dataroot'])   # the fixture's: inside


def test_scenes_without_can_data_get_zeros_and_one_line(synthetic_copy, train_records, val_records, capsys):
    """A scene of the devkit's ``can_blacklist`` (scene-0061 renamed scene-0161, whose pose file is there all the
    same) and a scene without ``<scene>_pose.json`` (scene-0103): zero accel / rotation_rate / vel, as BEVFormer's
    converter gives, everything else as usual; one line names them."""
    root = synthetic_copy()
    can_bus = os.path.join(root, 'can_bus')
    shutil.copy(os.path.join(can_bus, 'scene-0061_pose.json'), os.path.join(can_bus, 'scene-0161_pose.json'))
    os.remove(os.path.join(can_bus, 'scene-0103_pose.json'))
    edit_table(root, 'scene', lambda rows: [dict(r, name='scene-0161') if r['name'] == 'scene-0061' else r
                                            for r in rows])
    set_splits(root, {'both': ['scene-0161', 'scene-0103']})
    capsys.readouterr()
    built = records.build_records(_nusc(root), 'both')
    before = train_records['samples'] + val_records['samples']
    assert [rec['token'] for rec in built['samples']] == [rec['token'] for rec in before]
    for new, old in zip(built['samples'], before):
        assert new['can_bus'][7:16] == [0.0] * 9
        assert new['can_bus'][:7] == old['can_bus'][:7] and new['can_bus'][16:] == old['can_bus'][16:]
    assert any(any(rec['can_bus'][7:16]) for rec in before)
    lines = _notes(capsys, 'no CAN bus data')
    assert len(lines) == 1, lines
    assert "2 scene(s) of split 'both' have no CAN bus data in " + can_bus in lines[0]
    assert 'scene-0161, scene-0103' in lines[0] and 'zeros' in lines[0]


def _truncate(path):
    text = open(path).read()
    with open(path, 'w') as pose_file:
        pose_file.write(text[:len(text) // 2])


def _rewrite(edit):
    def apply(path):
        with open(path) as pose_file:
            messages = json.load(pose_file)
        with open(path, 'w') as pose_file:
            json.dump(edit(messages), pose_file)
    return apply


def _drop(key, index):
    def edit(messages):
        del messages[index][key]
        return messages
    return edit


def _set(key, index, value):
    def edit(messages):
        messages[index][key] = value
        return messages
    return edit


POSE_FAULTS = [
    (_truncate, r'not valid JSON, the file is truncated or corrupt \('),
    (_rewrite(lambda messages: {'pose': messages}), 'a JSON dict, not a list of CAN bus pose messages'),
    (_rewrite(lambda messages: []), r'no messages \(an empty list\)'),
    (_rewrite(_drop('vel', 7)), "message 7 has no 'vel'"),
    (_rewrite(_drop('utime', 0)), "message 0 has no 'utime'"),
    (_rewrite(_set('accel', 3, [0.1, 9.8])), r'message 3 \(utime \d+\): accel \[0.1, 9.8\] is not three numbers'),
    (_rewrite(_set('rotation_rate', 2, 'zero')), r"message 2 \(utime \d+\): rotation_rate 'zero' is not three"),
]


def test_a_corrupt_pose_file_is_named(synthetic_copy):
    root = synthetic_copy()
    nusc = _nusc(root)
    path = os.path.join(root, 'can_bus', 'scene-0103_pose.json')
    good = open(path).read()
    for damage, message in POSE_FAULTS:
        with open(path, 'w') as pose_file:
            pose_file.write(good)
        damage(path)
        with pytest.raises(RecordsError) as caught:
            records.build_records(nusc, 'mini_val')
        assert _one_line(caught).startswith(f'{path}: '), caught.value
        assert re.match(message, str(caught.value)[len(path) + 2:]), (message, caught.value)


def test_the_cache_follows_the_can_bus_source(synthetic_copy, tmp_path, monkeypatch):
    """Cached records are rebuilt when a ``*_pose.json`` changes, the source switches to ego poses or to another
    root, and when they are of an older ``FORMAT``; otherwise they are loaded."""
    root = synthetic_copy()
    builds = []
    real_build = records.build_records

    def counting_build(nusc, split, *args, **kwargs):
        builds.append(split)
        return real_build(nusc, split, *args, **kwargs)
    monkeypatch.setattr(records, 'build_records', counting_build)
    cache = str(tmp_path / 'records')

    def get(**kwargs):
        before = len(builds)
        got = records.get_records(root, VERSION, 'mini_val', cache, **kwargs)
        return got, len(builds) > before

    first, built = get()
    assert built and first['can_bus_source'] == {'kind': 'can_bus_expansion', 'root': root}
    assert get() == (first, False)
    unrelated = os.path.join(root, 'can_bus', 'scene-0103_meta.json')   # a file the records do not read
    open(unrelated, 'w').write('{}')
    assert get()[1] is False
    pose = os.path.join(root, 'can_bus', 'scene-0103_pose.json')
    stat = os.stat(pose)
    os.utime(pose, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert get()[1] is True and get()[1] is False
    from_poses, built = get(can_bus_from_poses=True)
    assert built and from_poses['can_bus_source'] == {'kind': 'ego_poses'}
    assert from_poses['samples'][5]['can_bus'][7:16] != first['samples'][5]['can_bus'][7:16]
    assert get(can_bus_from_poses=True)[1] is False
    other = tmp_path / 'other'
    shutil.copytree(os.path.join(root, 'can_bus'), other / 'can_bus')
    moved, built = get(can_bus_root=str(other))
    assert built and moved['can_bus_source']['root'] == str(other)
    path = records.default_records_path(root, VERSION, 'mini_val', cache)
    with open(path) as cached:
        old = json.load(cached)
    old['format'] = 'fd3d_jax.records/1'
    with open(path, 'w') as cached:
        json.dump(old, cached)
    again, built = get(can_bus_root=str(other))
    assert built and again['format'] == records.FORMAT
