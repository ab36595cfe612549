"""Smoke tests of experiments/bench_pipeline.py and experiments/bench_inference.py on the toy configs
over the tests' synthetic set (``synthetic_root``: 2 scenes, 160x90 images)."""
import functools
import json
import os

import pytest

from tests.experiments import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(root, name, config, out_dir, *args):
    result = load_script(name).main(['--config', os.path.join(ROOT, 'configs', config),
                                     f'--config.data.dataroot={root}', '--config.data.raw_image_wh=(160, 90)',
                                     f'--config.data.records_dir={out_dir / "records"}', '--out-dir', str(out_dir),
                                     *args])
    slug = os.path.basename(config).replace('.py', '').replace(':', '_')
    with open(os.path.join(out_dir, f'{name}_{slug}.json')) as f:
        written = json.load(f)
    assert written['config'] == result['config'] and 'machine' in written
    return written


@pytest.fixture
def run(synthetic_root):
    return functools.partial(_run, synthetic_root)


def test_pipeline_samples_per_second(run, tmp_path):
    out = run('bench_pipeline', 'bevformer_tiny.py:toy', tmp_path, '--workers', '0', '1', '--batches', '2',
               '--warmup', '1', '--steps', '0')
    assert out['config'] == 'bevformer_tiny:toy' and out['train_step'] is None
    assert [r['workers'] for r in out['pipeline']] == [0, 1]
    assert all(r['samples_per_s'] > 0 and r['images_per_s'] > 0 for r in out['pipeline'])


def test_inference_fps_on_data(run, tmp_path):
    out = run('bench_inference', 'detr3d_r50.py:toy', tmp_path, '--frames', '2', '--warmup', '1')
    assert out['inputs']['kind'] == 'data' and out['frames'] == 2 and out['batch_size'] == 1
    assert out['fps_mean'] > 0 and out['fps_median'] > 0 and out['latency']['median_ms'] > 0
    assert out['device_kind'] and [e['fps'] for e in out['published']['entries']] == [4.0]


@pytest.mark.slow
def test_pipeline_against_train_step(run, tmp_path):
    out = run('bench_pipeline', 'detr3d_r50.py:toy', tmp_path, '--workers', '0', '--batches', '2',
               '--warmup', '1', '--steps', '2', '--loop-steps', '2')
    assert out['train_step']['steps_per_s'] > 0
    row, = out['pipeline']
    assert row['samples_per_s'] > 0 and row['headroom'] > 0 and row['loop']['steps'] == 2
    assert 0 <= row['loop']['wait_fraction'] <= 1 and 0 <= row['loop']['device_idle_fraction'] <= 1


@pytest.mark.slow
def test_inference_bevformer_dummy_inputs(run, tmp_path):
    out = run('bench_inference', 'bevformer_tiny.py:toy', tmp_path, '--frames', '2', '--warmup', '1',
               '--inputs', 'dummy')
    assert out['inputs']['kind'] == 'dummy_batch' and out['fps_mean'] > 0
    assert {e['config'] for e in out['published']['entries']} == {'bevformer_tiny:full', 'bevformer_tiny:fd3d'}
