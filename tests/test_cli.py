"""The train/eval command lines end bad input with one ``error:`` line naming the key, file or sample (exit
status 1, no traceback), and leave nothing half-written."""
import os
import re
import shutil
import subprocess
import sys

import grain
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
               f'--config.data.records_dir={tmp_path / "records"}', f'--config.data.can_bus_root={data_cfg.dataroot}')
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert f'error: image not found: {root}/samples/CAM_FRONT/' in res.stderr and '(sample ' in res.stderr
    assert not os.path.exists(tmp_path / 'run' / 'checkpoints') or not os.listdir(tmp_path / 'run' / 'checkpoints')
    res = _run('fd3d_jax.train', f'--workdir={tmp_path / "run"}', f'--config.data.dataroot={tmp_path / "none"}')
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert f"error: no nuScenes tables for version 'v1.0-mini' in {tmp_path / 'none'}" in res.stderr


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith('error:')]


def _assert_ended_cleanly(res):
    """Exit status 1 after exactly one ``error:`` line: no traceback, no interpreter abort (status 134)."""
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert 'Fatal Python error' not in res.stderr and 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert len(_error_lines(res.stderr)) == 1, res.stderr[-3000:]
    return _error_lines(res.stderr)[0]


def test_a_corrupt_image_read_mid_run_ends_with_its_file_and_sample(data_cfg, train_records, tmp_path):
    """A camera JPEG overwritten with text, first read by training step 25: the host has dispatched steps 1-24
    at once (their input was prefetched while step 1 compiled), so the device is still running some of them. The
    run ends with one ``error:`` line naming the file and sample and exit status 1, not with an abort at
    interpreter exit (a step still running calls the matching's host callback into the finalising interpreter:
    SIGABRT before ``loop.stop_training`` waited for them), and saves nothing."""
    root = tmp_path / 'data'
    os.makedirs(root / 'samples')
    for name in os.listdir(data_cfg.dataroot):
        if name != 'samples':
            os.symlink(os.path.join(data_cfg.dataroot, name), root / name)
    for name in os.listdir(os.path.join(data_cfg.dataroot, 'samples')):
        if name != 'CAM_FRONT':
            os.symlink(os.path.join(data_cfg.dataroot, 'samples', name), root / 'samples' / name)
    shutil.copytree(os.path.join(data_cfg.dataroot, 'samples', 'CAM_FRONT'), root / 'samples' / 'CAM_FRONT')
    # the training pipeline's first epoch: the samples in this order (detr3d: one frame per training sample)
    order = grain.MapDataset.range(len(train_records['samples'])).shuffle(seed=0)
    sample = train_records['samples'][order[24]]
    path = os.path.join(root, next(c['path'] for c in sample['cams'] if c['channel'] == 'CAM_FRONT'))
    with open(path, 'w') as f:
        f.write('not a JPEG')
    workdir = tmp_path / 'run'
    res = _run('fd3d_jax.train', f'--workdir={workdir}', f'--config.data.dataroot={root}',
               f'--config.data.records_dir={data_cfg.records_dir}', '--config.train.num_steps=30',
               '--config.data.prefetch=32')
    line = _assert_ended_cleanly(res)
    assert line.startswith(f"error: cannot decode image {path} (sample {sample['token']})"), line
    assert not os.path.exists(workdir / 'checkpoints') or not os.listdir(workdir / 'checkpoints')


def test_a_non_finite_loss_mid_run_ends_with_its_step_and_keeps_the_checkpoint_being_written(data_cfg, tmp_path):
    """``optim.lr=1e30``: step 1 is finite and its checkpoint is written asynchronously; step 2's loss is not
    (``train.nonfinite='stop'``). The run ends with one ``error:`` line naming step 2 and that checkpoint, exit
    status 1, and the checkpoint complete on disk (no temporary folder left). No step is running when this error
    is raised (it comes from the fetched metrics of every dispatched step)."""
    workdir = tmp_path / 'run'
    res = _run('fd3d_jax.train', f'--workdir={workdir}', f'--config.data.dataroot={data_cfg.dataroot}',
               f'--config.data.records_dir={data_cfg.records_dir}', '--config.train.num_steps=30',
               '--config.optim.lr=1e30', '--config.train.log_every=1', '--config.train.checkpoint_every=1')
    line = _assert_ended_cleanly(res)
    checkpoints = workdir / 'checkpoints'
    assert line.startswith('error: non-finite loss or gradient at step 2 ') and f'{checkpoints}/1.' in line, line
    assert os.listdir(checkpoints) == ['1']


def test_a_bad_init_from_source_ends_with_the_file(data_cfg, tmp_path):
    """``train.init_from`` naming a missing file or a file that is not a checkpoint: one error line naming it."""
    missing = tmp_path / 'resnet50.pth'
    res = _run('fd3d_jax.train', f'--workdir={tmp_path / "run"}', f'--config.data.dataroot={data_cfg.dataroot}',
               f'--config.data.records_dir={data_cfg.records_dir}', f'--config.train.init_from={missing}')
    assert f'error: init_from {missing}: no such file or folder' in _assert_ended_cleanly(res)
    missing.write_text('not a checkpoint')
    res = _run('fd3d_jax.train', f'--workdir={tmp_path / "run"}', f'--config.data.dataroot={data_cfg.dataroot}',
               f'--config.data.records_dir={data_cfg.records_dir}', f'--config.train.init_from={missing}')
    assert f'error: {missing}: torch.load(weights_only=True) failed' in _assert_ended_cleanly(res)
