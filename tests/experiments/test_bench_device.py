"""experiments/bench_device.py (``make bench-device``) in its ``--toy`` mode on the CPU.

The whole toy matrix compiles 14 programs (6 inference, 8 train steps) and takes ~4 minutes on the 2-core CPU, so
it is marked slow; the default suite runs the MSDA figure and one bfloat16 inference figure for real, the
selection and ``--keep-existing`` on top of them, and the budget's skip path (nothing compiled)."""
import json

import pytest

from tests.experiments import load_script

INFERENCE = [(family, dtype) for dtype in ('float32', 'bfloat16')
             for family in ('bevformer_tiny', 'bevformer_small', 'bevformer_base')]
TRAIN = [(family, dtype) for dtype in ('float32', 'bfloat16') for family in ('bevformer_tiny', 'bevformer_base')]
# PyTorch's published batch-1 FPS on an RTX 3090 and training memory (GB, nvidia-smi) of the :full configs
RTX3090_FPS = {'bevformer_tiny': 15.9, 'bevformer_small': 5.1, 'bevformer_base': 2.4}
PYTORCH_TRAIN_GB = {'bevformer_tiny': 6.5, 'bevformer_base': 28.5}


def _run(out_dir, *args, module=None):
    with open((module or load_script('bench_device')).main(['--toy', '--out-dir', str(out_dir), *args])) as f:
        return json.load(f)


def _check_inference(fig, family, dtype):
    assert fig['status'] == 'ok', fig
    assert fig['config'] == f'{family}:toy' and fig['frames'] == 2 and fig['batch_size'] == 1
    assert fig['fps_mean'] > 0 and fig['latency']['median_ms'] > 0 and fig['latency']['n'] == 2
    assert fig['model_dtype'] == dtype and fig['sca_max_cameras'] == 0
    program = fig['program']   # the compiled eval step computes in the asked precision
    assert (program['bf16_values'] > 0) == (dtype == 'bfloat16'), program
    rtx3090 = [e for e in fig['published']['entries'] if e['hardware'] == 'RTX 3090']
    assert [e['fps'] for e in rtx3090] == [RTX3090_FPS[family]]
    assert all(e['config'] == f'{family}:full' for e in fig['published']['entries'])


def test_budget_skips_every_figure_and_says_so(tmp_path, capsys):
    out = _run(tmp_path, '--budget-s', '0')
    figures = out['figures']
    expected = {'msda/tiny_test'} | {f'inference/{f}:toy/{d}' for f, d in INFERENCE} | \
        {f'train/{f}:toy/{d}' for f, d in TRAIN}
    assert set(figures) == expected and out['benchmark'] == 'bench_device_toy_cpu' and 'machine' in out
    for fid, fig in figures.items():
        assert fig['status'] == 'skipped' and fig['reason'].startswith('budget:'), (fid, fig)
        assert 'elapsed_s' not in fig
    printed = capsys.readouterr().out
    assert all(f'| {fid} | skipped | budget:' in printed for fid in figures)


def test_a_failing_figure_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    module = load_script('bench_device')

    def out_of_memory(self, fig):
        raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99 GiB.\nthe rest of it')

    def compile_error(self, fig):
        raise ValueError('a compile error')

    monkeypatch.setattr(module.Run, 'msda', out_of_memory)
    monkeypatch.setattr(module.Run, 'inference', compile_error)
    figures = _run(tmp_path, '--figures', 'msda', 'inference', '--models', 'bevformer_tiny', module=module)['figures']
    assert figures['msda/tiny_test']['status'] == 'failed'
    assert figures['msda/tiny_test']['reason'] == ('RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to '
                                                   'allocate 99 GiB.')
    for dtype in ('float32', 'bfloat16'):
        fig = figures[f'inference/bevformer_tiny:toy/{dtype}']
        assert fig['status'] == 'failed' and fig['reason'] == 'ValueError: a compile error' and fig['elapsed_s'] >= 0
    assert '| msda/tiny_test | failed | RuntimeError: RESOURCE_EXHAUSTED' in capsys.readouterr().out


def test_selected_figures_run_and_keep_existing_keeps_them(tmp_path):
    out = _run(tmp_path, '--figures', 'msda', 'inference', '--models', 'bevformer_tiny', '--dtypes', 'bfloat16')
    figures = out['figures']
    assert out['toy'] and out['xla'].startswith('jax_disable_most_optimizations')
    _check_inference(figures['inference/bevformer_tiny:toy/bfloat16'], 'bevformer_tiny', 'bfloat16')
    msda = figures['msda/tiny_test']
    assert msda['status'] == 'ok' and msda['memory_limit_bytes'] > 0
    for impl in ('production', 'reference'):
        assert all(msda['times'][impl][ps]['median_ms'] > 0 for ps in ('fwd', 'fwd_bwd'))
        assert msda['memory'][impl]['fwd_bwd']['peak'] > 0
    assert max(msda['errors_vs_reference']['production'].values()) < 1e-5 and msda['errors_vs_torch'] is None
    reasons = {fid: fig.get('reason') for fid, fig in figures.items() if fig['status'] != 'ok'}
    assert len(reasons) == len(figures) - 2
    assert reasons['train/bevformer_tiny:toy/bfloat16'] == 'not selected (--figures)'
    assert reasons['inference/bevformer_base:toy/bfloat16'] == 'not selected (--models)'
    assert reasons['inference/bevformer_tiny:toy/float32'] == 'not selected (--dtypes)'

    again = _run(tmp_path, '--keep-existing', '--budget-s', '0')['figures']
    kept = again['inference/bevformer_tiny:toy/bfloat16']
    assert kept['status'] == 'ok' and kept['fps_mean'] == figures['inference/bevformer_tiny:toy/bfloat16']['fps_mean']
    assert kept['kept_from']['date'] == out['machine']['date'] and again['msda/tiny_test']['status'] == 'ok'
    assert again['inference/bevformer_tiny:toy/float32']['reason'].startswith('budget:')


@pytest.mark.slow
def test_toy_run_measures_every_figure(tmp_path, capsys):
    out = _run(tmp_path)
    figures = out['figures']
    assert all(fig['status'] == 'ok' for fig in figures.values()), {k: f.get('reason') for k, f in figures.items()}
    for family, dtype in INFERENCE:
        _check_inference(figures[f'inference/{family}:toy/{dtype}'], family, dtype)
    fingerprints = set()
    for family, dtype in TRAIN:
        fig = figures[f'train/{family}:toy/{dtype}']
        assert fig['config'] == f'{family}:toy' and fig['dense_reused_inference_trainer']
        assert fig['published']['pytorch_train_gb'] == PYTORCH_TRAIN_GB[family]
        assert set(fig['variants']) == {'dense', 'sparse_2'}
        for variant, slots in (('dense', 0), ('sparse_2', 2)):
            entry = fig['variants'][variant]
            assert entry['sca_max_cameras'] == slots and entry['model_dtype'] == dtype
            assert entry['step']['median_ms'] > 0 and entry['step']['n'] == 2
            assert entry['memory_bytes']['peak'] > entry['memory_bytes']['argument'] > 0
            assert (entry['program']['bf16_values'] > 0) == (dtype == 'bfloat16'), entry['program']
            fingerprints.add(entry['program']['fingerprint'])
    assert len(fingerprints) == 2 * len(TRAIN)   # 8 different programs: dense != sparse, float32 != bfloat16
    printed = capsys.readouterr().out
    assert all(f'| {fid} | ok |' in printed for fid in figures)
    assert '15.9 FPS (RTX 3090)' in printed and '28.5 GB (nvidia-smi)' in printed
