"""The train/eval command lines end bad input with one ``error:`` line naming the key, file or sample (exit
status 1, no traceback), and leave nothing half-written."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, '-m', module, '--config=configs/detr3d_r50.py:toy', *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('module', ['fd3d_jax.train', 'fd3d_jax.eval'])
@pytest.mark.parametrize('override, message', [
    ('--config.train.num_stepz=3', r'error: unknown config key in --config.train.num_stepz=3 \(Did you mean "num_steps"'),
    ('--config.train.num_steps=abc', r'^error: flag --config.train.num_steps=abc: invalid literal for int\(\)'),
    ('--config.model.name=pointpillars', r"^error: config.model.name must be 'bevformer' or 'detr3d', got 'pointpillars'"),
])
def test_bad_config_overrides_name_the_key(module, override, message, data_cfg, tmp_path):
    res = _run(module, f'--workdir={tmp_path}', f'--config.data.dataroot={data_cfg.dataroot}', override)
    assert res.returncode == 1
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert re.search(message, res.stderr, re.M), res.stderr[-3000:]


def test_missing_images_and_tables_end_training_with_the_file_and_sample(data_cfg, tmp_path):
    root = tmp_path / 'broken'
    os.makedirs(root)
    for name in ('v1.0-mini', 'maps'):
        os.symlink(os.path.join(data_cfg.dataroot, name), root / name)
    shutil.copytree(os.path.join(data_cfg.dataroot, 'samples'), root / 'samples',
                    ignore=shutil.ignore_patterns('LIDAR_TOP', 'CAM_FRONT'))
    res = _run('fd3d_jax.train', f'--workdir={tmp_path / "run"}', f'--config.data.dataroot={root}',
               f'--config.data.records_dir={tmp_path / "records"}')
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert f'error: image not found: {root}/samples/CAM_FRONT/' in res.stderr and '(sample ' in res.stderr
    assert not os.path.exists(tmp_path / 'run' / 'checkpoints') or not os.listdir(tmp_path / 'run' / 'checkpoints')
    res = _run('fd3d_jax.train', f'--workdir={tmp_path / "run"}', f'--config.data.dataroot={tmp_path / "none"}')
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert f"error: no nuScenes tables for version 'v1.0-mini' in {tmp_path / 'none'}" in res.stderr
