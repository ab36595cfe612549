"""Smoke tests of experiments/bench_train_step.py and experiments/bench_memory.py on :toy configs (one
toy compile in the fast test; the train-step benchmark compiles three steps and is marked slow)."""
import json
import math
import os

import pytest

from tests.experiments import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATAROOT = os.path.join(ROOT, 'data', 'synthetic')
HAVE_DATA = os.path.isdir(os.path.join(DATAROOT, 'v1.0-mini'))


def _main(name, *args):
    with open(load_script(name).main(list(args))) as f:
        return json.load(f)


def test_bench_memory_compiles_the_real_train_step(tmp_path):
    out = _main('bench_memory', '--configs', 'detr3d_r50:toy', '--out-dir', str(tmp_path))
    assert out['benchmark'] == 'bench_memory' and 'machine' in out
    [row] = out['rows']
    assert row['config'] == 'detr3d_r50:toy' and 'error' not in row, row
    m = row['memory_bytes']
    assert m['peak'] > m['argument'] > 0 and m['temp'] > 0 and row['peak_gb'] > 0
    assert row['params'] > 0 and row['expert_params'] == 0 and row['pytorch_train_gb'] is None


@pytest.mark.slow
def test_bench_memory_compiles_a_pair_in_bfloat16(tmp_path):
    out = _main('bench_memory', '--configs', 'fd3d_detr3d_r101_to_r50:toy', '--dtypes', 'bfloat16',
                '--out-dir', str(tmp_path))
    [row] = out['rows']
    assert out['benchmark'] == 'bench_memory_precision' and 'error' not in row, row
    assert row['dtype'] == 'bfloat16' and row['expert_params'] > 0 and row['memory_bytes']['peak'] > 0


@pytest.mark.slow
def test_bench_precision_times_both_precisions(tmp_path):
    out = _main('bench_precision', '--configs', 'detr3d_r50:toy', '--time', 'detr3d_r50:toy', '--iters', '1',
                '--warmup', '0', '--out-dir', str(tmp_path))
    entry = out['configs']['detr3d_r50:toy']
    assert set(entry['over_first']) == {'float32', 'bfloat16'} and entry['over_first']['float32'] == 1.0
    assert entry['peak_bfloat16_over_float32'] > 0 and entry['bfloat16']['memory_bytes']['peak'] > 0


@pytest.mark.slow
def test_bench_memory_of_a_pair_counts_the_expert(tmp_path):
    out = _main('bench_memory', '--configs', 'fd3d_detr3d_r101_to_r50:toy', '--remat', 'on', '--out-dir', str(tmp_path))
    [row] = out['rows']
    assert out['benchmark'] == 'bench_memory_remat_on' and row['remat'] and row['backbone_remat']
    assert row['memory_bytes']['peak'] > 0 and row['expert_params'] > 0 and row['distill_params'] > 0


@pytest.mark.slow
@pytest.mark.parametrize('config', ['fd3d_bevformer_base_to_tiny.py:toy', 'fd3d_detr3d_r101_to_r50.py:toy'])
def test_bench_train_step_overhead_and_retraces(config, tmp_path):
    data = ['--dataroot', DATAROOT] if HAVE_DATA else []
    out = _main('bench_train_step', '--config', f'configs/{config}', '--iters', '2', '--warmup', '1',
                '--steps', '4', '--out-dir', str(tmp_path), *data)
    assert out['benchmark'] == 'bench_train_step_' + config.replace('.py', '').replace(':', '_')
    for key in ('apprentice', 'expert_forward', 'fd3d'):
        assert out['times'][key]['median_ms'] > 0 and out['compile_s'][key]['compile'] > 0
    for key in ('ratio_fd3d_over_apprentice_plus_expert', 'ratio_fd3d_over_apprentice'):
        assert math.isfinite(out[key]) and out[key] > 0
    assert math.isfinite(out['losses']['loss_distill']) and out['losses']['loss_det'] > 0
    r = out['retrace']
    assert r['steps'] == 4 and r['real_data'] == HAVE_DATA
    assert r['traces'] == 1 and r['cache_entries'] == 1 and r['apprentice_traces'] == 1, r


@pytest.mark.slow
def test_bench_train_step_compile_only(tmp_path):
    out = _main('bench_train_step', '--config', 'configs/fd3d_detr3d_r101_to_r50.py:toy', '--compile-only',
                '--out-dir', str(tmp_path))
    assert out['benchmark'] == 'bench_train_step_compile_fd3d_detr3d_r101_to_r50_toy'
    for key in ('apprentice', 'fd3d'):
        assert out[key]['compile_s']['total'] > 0 and out[key]['memory_bytes']['peak'] > 0
    assert out['fd3d']['memory_bytes']['peak'] > out['apprentice']['memory_bytes']['peak']


@pytest.mark.slow
def test_bench_compile_splits_the_step_and_compiles_variants(tmp_path):
    out = _main('bench_compile', '--config', 'detr3d_r50:toy', '--variants', 'matcher_jax', '--out-dir', str(tmp_path))
    assert set(out['parts']) == {'forward', 'loss_gradient', 'train_step'} and set(out['variants']) == {'matcher_jax'}
    assert all(seconds['compile'] > 0 and seconds['cpu'] > 0 for seconds in [*out['parts'].values(),
                                                                             *out['variants'].values()])
