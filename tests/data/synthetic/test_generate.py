import collections
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import points_in_box

from fd3d_jax.data.nuscenes_meta import CAMERA_NAMES, CLASS_NAMES
from fd3d_jax.data.synthetic import generate, plan_splits
from tests.conftest import SYNTH_IMAGE_WH


def test_devkit_loads_the_set(nusc):
    assert len(nusc.scene) == 2 and {s['name'] for s in nusc.scene} == {'scene-0061', 'scene-0103'}
    for scene in nusc.scene:
        assert 20 <= scene['nbr_samples'] <= 40
    for sample in nusc.sample:
        assert set(sample['data']) == set(CAMERA_NAMES) | {'LIDAR_TOP'}
        for channel, token in sample['data'].items():
            sd = nusc.get('sample_data', token)
            assert os.path.exists(nusc.get_sample_data_path(token))
            if channel != 'LIDAR_TOP':
                assert (sd['width'], sd['height']) == SYNTH_IMAGE_WH
    # Key frames at 2 Hz along a driving path on the ground.
    for scene in nusc.scene:
        tokens = [scene['first_sample_token']]
        while nusc.get('sample', tokens[-1])['next']:
            tokens.append(nusc.get('sample', tokens[-1])['next'])
        stamps = [nusc.get('sample', t)['timestamp'] for t in tokens]
        assert set(np.diff(stamps)) == {500000}
        poses = [nusc.get('ego_pose', nusc.get('sample_data', nusc.get('sample', t)['data']['LIDAR_TOP'])['ego_pose_token'])
                 for t in tokens]
        assert all(p['translation'][2] == 0.0 for p in poses)


def test_all_classes_in_every_split_with_lidar_points(nusc):
    for scene in nusc.scene:
        names = collections.Counter()
        for ann in nusc.sample_annotation:
            if nusc.get('sample', ann['sample_token'])['scene_token'] == scene['token'] and ann['num_lidar_pts'] > 0:
                names[category_to_detection_name(ann['category_name'])] += 1
        assert set(names) == set(CLASS_NAMES), (scene['name'], names)


def test_instances_links_attributes_and_motion(nusc):
    for inst in nusc.instance:
        chain, token = [], inst['first_annotation_token']
        while token:
            chain.append(nusc.get('sample_annotation', token))
            token = chain[-1]['next']
        assert len(chain) == inst['nbr_annotations']
        assert chain[-1]['token'] == inst['last_annotation_token']
        assert all(a['instance_token'] == inst['token'] for a in chain)
        stamps = [nusc.get('sample', a['sample_token'])['timestamp'] for a in chain]
        assert np.all(np.diff(stamps) > 0)
    for ann in nusc.sample_annotation:
        name = category_to_detection_name(ann['category_name'])
        attrs = [nusc.get('attribute', t)['name'] for t in ann['attribute_tokens']]
        assert nusc.get('visibility', ann['visibility_token'])
        if name in ('barrier', 'traffic_cone'):
            assert attrs == []
            continue
        assert len(attrs) == 1
        if ann['prev'] and ann['next']:
            speed = np.linalg.norm(nusc.box_velocity(ann['token'])[:2])
            if attrs[0] in ('vehicle.parked', 'cycle.without_rider', 'pedestrian.standing'):
                assert speed < 0.05, (attrs, speed)
            if attrs[0] in ('vehicle.moving', 'pedestrian.moving'):
                assert speed > 0.3, (attrs, speed)


def test_num_lidar_pts_match_the_point_cloud(nusc):
    """num_lidar_pts is what the saved sweep holds: between the points the devkit finds inside the
    (5 cm enlarged) car box above the ground and all points inside it (ground returns at the
    footprint's edge cannot be told from hits on the car's lowest centimetres)."""
    checked = 0
    for sample in nusc.sample[::5]:
        sd_token = sample['data']['LIDAR_TOP']
        pc = LidarPointCloud.from_file(nusc.get_sample_data_path(sd_token))
        above_ground = pc.points[2] > -1.84 + 0.03  # LiDAR 1.84 m up; ground returns within ±1 cm
        _, boxes, _ = nusc.get_sample_data(sd_token)
        for box in boxes:
            if box.name != 'vehicle.car':
                continue
            n_pts = nusc.get('sample_annotation', box.token)['num_lidar_pts']
            box.wlh = box.wlh + 0.1
            inside = points_in_box(box, pc.points[:3], wlh_factor=1.0)
            lower, upper = int((inside & above_ground).sum()), int(inside.sum())
            assert lower - 1 <= n_pts <= upper + 2 + 0.05 * n_pts, (lower, n_pts, upper)  # 2 cm range noise
            checked += n_pts > 0
    assert checked > 10


def test_splits_plan():
    assert plan_splits(10) == ('v1.0-mini', {
        'mini_train': ['scene-0061', 'scene-0553', 'scene-0655', 'scene-0757', 'scene-0796', 'scene-1077',
                       'scene-1094', 'scene-1100'], 'mini_val': ['scene-0103', 'scene-0916']})
    version, splits = plan_splits(25)
    assert version == 'v1.0-trainval' and len(splits['train']) == 20 and len(splits['val']) == 5
    with pytest.raises(ValueError, match='--scenes'):
        plan_splits(1)


def test_cli_is_deterministic_and_protects_existing_data(tmp_path):
    outs = [tmp_path / 'a', tmp_path / 'b']
    for out, workers in zip(outs, ('1', '2')):
        proc = subprocess.run([sys.executable, '-m', 'fd3d_jax.data.synthetic', '--out', str(out), '--scenes', '2',
                               '--seed', '5', '--image-size', '48', '32', '--workers', workers],
                              capture_output=True, text=True, check=True)
        assert 'version: v1.0-mini' in proc.stdout
        assert 'split mini_train: 1 scenes (scene-0061)' in proc.stdout
        assert 'split mini_val: 1 scenes (scene-0103)' in proc.stdout
    cmp = filecmp.dircmp(outs[0], outs[1], ignore=['fd3d_synthetic.json'])  # holds the run time
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in ('v1.0-mini', 'can_bus', 'maps'):
        sub_cmp = filecmp.dircmp(outs[0] / sub, outs[1] / sub)
        assert not sub_cmp.diff_files, sub_cmp.diff_files
    for channel in ('CAM_FRONT', 'LIDAR_TOP'):
        _, mismatch, errors = filecmp.cmpfiles(outs[0] / 'samples' / channel, outs[1] / 'samples' / channel,
                                               os.listdir(outs[0] / 'samples' / channel), shallow=False)
        assert not mismatch and not errors

    # Same parameters: nothing is rewritten. Other parameters: refused without --overwrite.
    marker = json.loads((outs[0] / 'fd3d_synthetic.json').read_text())
    assert generate(str(outs[0]), 2, 5, (48, 32), verbose=False)['splits'] == marker['splits']
    with pytest.raises(FileExistsError, match='other parameters'):
        generate(str(outs[0]), 2, 6, (48, 32), verbose=False)
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'keep.txt').write_text('user data')
    proc = subprocess.run([sys.executable, '-m', 'fd3d_jax.data.synthetic', '--out', str(foreign), '--scenes', '2'],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and 'not empty' in proc.stderr
    assert (foreign / 'keep.txt').read_text() == 'user data'
