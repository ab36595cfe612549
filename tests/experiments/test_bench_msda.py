"""Smoke test of experiments/bench_msda.py on its ``tiny_test`` shape, one timed iteration (the torch
parts only where torch is installed: CI does not install it)."""
import importlib.util
import json
import os

import pytest

from tests.experiments import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSES = ('fwd', 'fwd_bwd')
FIELDS = ('out', 'd_value', 'd_loc', 'd_attn')


def _bench():
    return load_script('bench_msda')


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('bench_msda')
    result = _bench().main(['--shapes', 'tiny_test', '--iters', '1', '--warmup', '0', '--out-dir', str(out_dir)])
    with open(out_dir / 'bench_msda.json') as f:
        data = json.load(f)
    assert set(data['shapes']) == {'tiny_test'} == set(result['shapes']) and 'machine' in data
    return data


def test_jax_fields(written):
    entry = written['shapes']['tiny_test']
    assert entry['queries'] == entry['queries_full'] and not entry['subsampled'] and entry['chunks'] >= 1
    for impl in ('production', 'reference'):
        for ps in PASSES:
            assert entry['times'][impl][ps]['median_ms'] > 0 and entry['times'][impl][ps]['n'] == 1
            assert entry['memory'][impl][ps]['peak'] > 0
    errors = entry['errors_vs_reference']['production']
    assert set(errors) == set(FIELDS) and max(errors.values()) < 1e-5
    assert written['threads']['jax_cores'] >= 1


def test_torch_ratio_and_errors(written):
    pytest.importorskip('torch')
    entry = written['shapes']['tiny_test']
    assert written['torch'] == 'ran' and written['threads']['torch'] == written['threads']['jax_cores']
    assert entry['times']['torch']['fwd']['median_ms'] > 0
    for impl in ('production', 'reference'):
        assert all(entry['ratio_vs_torch'][impl][ps] > 0 for ps in PASSES)
        errors = entry['errors_vs_torch'][impl]
        assert set(errors) == set(FIELDS) and max(errors.values()) < 1e-5, errors


def test_without_torch(written):
    if importlib.util.find_spec('torch') is not None:
        pytest.skip('torch is installed (the torch-less path is covered where it is not)')
    entry = written['shapes']['tiny_test']
    assert written['torch'].startswith('skipped') and entry['ratio_vs_torch'] is None
    assert entry['errors_vs_torch'] is None and 'torch' not in entry['times']
