"""Shared fixtures: a small synthetic nuScenes-format set written once per test session (its CAN bus expansion
``can_bus/`` inside the dataroot, where ``records.resolve_can_bus`` finds it when nothing is beside it)."""
import os
import shutil

import pytest

from configs.common import data_config
from fd3d_jax.data import records as records_lib
from fd3d_jax.data.synthetic import generate

SYNTH_IMAGE_WH = (160, 90)


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """2 scenes (mini_train: scene-0061, mini_val: scene-0103), 160x90 images, seed 0."""
    root = str(tmp_path_factory.mktemp('synthetic'))
    info = generate(root, num_scenes=2, seed=0, image_wh=SYNTH_IMAGE_WH, verbose=False)
    assert info['version'] == 'v1.0-mini'
    return root


@pytest.fixture
def synthetic_copy(synthetic_root, tmp_path):
    """``copy(dest=None)``: a copy of the synthetic set to modify (``shutil.copytree``: tables, camera images,
    ``can_bus/``, maps; not the LiDAR sweeps nor cached records) at ``dest`` (default ``<tmp_path>/set``)."""
    def copy(dest=None):
        dest = str(dest or tmp_path / 'set')
        skipped = shutil.ignore_patterns('LIDAR_TOP', 'records_test', 'fd3d_records')
        shutil.copytree(synthetic_root, dest, ignore=skipped)
        return dest
    return copy


@pytest.fixture(scope='session')
def nusc(synthetic_root):
    from nuscenes import NuScenes
    return NuScenes(version='v1.0-mini', dataroot=synthetic_root, verbose=False)


@pytest.fixture(scope='session')
def data_cfg(synthetic_root):
    cfg = data_config(toy=True)
    cfg.dataroot = synthetic_root
    cfg.records_dir = os.path.join(synthetic_root, 'records_test')
    return cfg


@pytest.fixture(scope='session')
def train_records(data_cfg):
    return records_lib.get_records(data_cfg.dataroot, data_cfg.version, data_cfg.train_split, data_cfg.records_dir)


@pytest.fixture(scope='session')
def val_records(data_cfg):
    return records_lib.get_records(data_cfg.dataroot, data_cfg.version, data_cfg.val_split, data_cfg.records_dir)
