"""experiments/distill_table.py: cells are run once and reused, other settings in a run folder are
refused, failures name the folder, and the table files (json, md, png) hold mean +- std per row."""
import glob
import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

from tests.experiments import load_script
from tests.test_configs import _parse

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


dt = load_script('distill_table')

# Stands in for `python -m fd3d_jax.train`: writes the evaluation a finished run leaves, with an NDS
# read from the command line (`--config.seed=S` -> NDS 0.1 * (S + 1)), and counts its calls.
FAKE_TRAIN = '''
import json, os, sys
argv = sys.argv[1:]
workdir = argv[argv.index('--workdir') + 1]
seed = int(([a for a in argv if a.startswith('--config.seed=')] or ['=9'])[0].split('=')[1])   # expert: 9
os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
with open(os.path.join(workdir, 'calls'), 'a') as f:
    f.write('x')
print('some start-up line', flush=True)
if seed != 9:   # a training run (the expert's evaluation prints no progress)
    print('step      7/7  loss   1.2345    3.00 steps/s  elapsed   0.1 min  ETA   0.0 min', flush=True)
if '--config.distill.method=fail' in argv or '--config.distill.focal.weight=-1.0' in argv:
    sys.exit(3)
with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:   # losses 10, 8, 6, 4 + seed at steps 1-4
    for step, loss in enumerate([10.0, 8.0, 6.0, 4.0 + seed], 1):
        f.write(json.dumps(dict(step=step, loss=loss)) + '\\n')
with open(os.path.join(workdir, 'eval', 'metrics_summary.json'), 'w') as f:
    json.dump(dict(nd_score=0.1 * (seed + 1), mean_ap=0.05 * (seed + 1), tp_errors=dict(trans_err=1.0)), f)
'''

# Stands in for experiments/cell_fingerprint.py: prints the behaviour written in TMP/behaviour (default
# 'a1b2c3d4e5f6') for FD3D rows, and that behaviour with a method tag for other methods (the weights do not
# enter it: a weight written out at its default is the same behaviour); counts its calls in TMP/fingerprints_run.
FAKE_FINGERPRINT = '''
import hashlib, json, os, sys
tmp = sys.argv[1]
with open(os.path.join(tmp, 'fingerprints_run'), 'a') as f:
    f.write('x')
path = os.path.join(tmp, 'behaviour')
found = open(path).read() if os.path.exists(path) else 'a1b2c3d4e5f6'
method = ([a for a in sys.argv if a.startswith('--config.distill.method=')] or ['=fd3d'])[0].split('=')[1]
if method != 'fd3d':
    found = found[:6] + hashlib.sha256(method.encode()).hexdigest()[:6]
print('a start-up line')
print(json.dumps(dict(behaviour=found, loss=[1.0])))
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / 'fake_train.py'
    script.write_text(FAKE_TRAIN)
    real = dt.run_command

    def command(*args):
        cmd = real(*args)
        assert cmd[1:3] == ['-m', 'fd3d_jax.train']
        return [sys.executable, str(script)] + cmd[3:]
    monkeypatch.setattr(dt, 'run_command', command)
    real_expert = dt.expert_command

    def expert_command(*args):
        cmd = real_expert(*args)
        assert cmd[1:4] == ['-m', 'fd3d_jax.eval', '--expert']
        return [sys.executable, str(script)] + cmd[4:]
    monkeypatch.setattr(dt, 'expert_command', expert_command)
    fingerprint = tmp_path / 'fake_fingerprint.py'
    fingerprint.write_text(FAKE_FINGERPRINT)
    real_fingerprint = dt.fingerprint_command

    def fingerprint_command(*args):
        cmd = real_fingerprint(*args)
        assert cmd[1].endswith('cell_fingerprint.py') and '--workdir' not in cmd and '--config.seed=0' in cmd
        return [sys.executable, str(fingerprint), str(tmp_path)] + cmd[2:]
    monkeypatch.setattr(dt, 'fingerprint_command', fingerprint_command)
    root = tmp_path / 'data'
    (root / 'v1.0-mini').mkdir(parents=True)
    expert = tmp_path / 'expert'
    expert.mkdir()
    (expert / 'metrics_summary.json').write_text(json.dumps(dict(nd_score=0.5, mean_ap=0.4)))
    (expert / 'params').mkdir()
    (expert / 'params' / 'weights').write_bytes(b'expert weights')
    return tmp_path, str(root), str(expert)


def _cell(runs, *parts):
    """The one run folder ``runs/<table>/<row>/<steps_seed>_<code hash>_<expert hash>``."""
    *path, prefix = parts
    found = glob.glob(os.path.join(str(runs), *path, prefix + '_*'))
    assert len(found) == 1, found
    return pathlib.Path(found[0])


def _table(rows):
    return dict(title='test table', config='configs/fd3d_bevformer_base_to_tiny.py:toy', expert='', rows=rows)


def test_table_runs_cells_once_and_writes_mean_and_std(fake):
    tmp, root, expert = fake
    rows = [('alone', 'apprentice alone', dt.NONE), ('fd3d', 'FD3D', {'distill.method': 'fd3d'})]
    args = ('t', _table(rows), [0, 1], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'))
    result = dt.run_table(*args, log=lambda *a: None)
    assert result['expert'] == dict(nds=0.5, map=0.4)
    assert [r['key'] for r in result['rows']] == ['alone', 'fd3d']
    nds = result['rows'][1]['nds']
    assert nds['values'] == pytest.approx([0.1, 0.2]) and nds['mean'] == pytest.approx(0.15)
    assert nds['std'] == pytest.approx(0.0707107, rel=1e-5)
    assert [cell['final_loss'] for cell in result['rows'][1]['cells']] == [4.0, 5.0]   # the last quarter's mean
    md = (tmp / 'out' / 't.md').read_text()
    assert '| FD3D | 0.1500 ± 0.0707 | 0.0750 ± 0.0354 | +0.0000 |' in md and '| expert (expert) | 0.5000 |' in md
    assert '| expert on the distillation input | 1.0000 | 0.5000 |' in md and result['expert_input']['nds'] == 1.0
    assert (tmp / 'out' / 't.png').stat().st_size > 0
    saved = json.loads((tmp / 'out' / 't.json').read_text())
    assert saved['steps'] == 7 and saved['seeds'] == [0, 1]
    run = json.loads((_cell(tmp / 'runs', 't', 'fd3d', 'steps7_seed1') / 'run.json').read_text())['argv']
    for arg in ('--config.seed=1', '--config.train.num_steps=7', '--config.distill.method=fd3d',
                f'--config.distill.expert_checkpoint={expert}', '--config.data.version=v1.0-mini',
                '--config.data.val_split=mini_val'):
        assert arg in run
    dt.run_table(*args, log=lambda *a: None)   # finished cells are reused, not retrained
    assert (_cell(tmp / 'runs', 't', 'fd3d', 'steps7_seed1') / 'calls').read_text() == 'x'


def test_progress_lines_of_a_training_run_are_shown_and_logged(fake):
    tmp, root, expert = fake
    shown = []
    dt.run_table('t', _table([('a', 'a', dt.NONE)]), [0], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'),
                 log=shown.append)
    progress = [line for line in shown if 'ETA' in line]
    assert progress == ['    step      7/7  loss   1.2345    3.00 steps/s  elapsed   0.1 min  ETA   0.0 min']
    assert not any('start-up' in line for line in shown)
    log = (_cell(tmp / 'runs', 't', 'a', 'steps7_seed0') / 'train.log').read_text()
    assert 'some start-up line' in log and 'ETA' in log


def test_table_refuses_a_folder_of_another_run_and_names_failures(fake):
    tmp, root, expert = fake
    runs, out = str(tmp / 'runs'), str(tmp / 'out')
    broken = {'distill.method': 'fd3d', 'distill.focal.weight': -1.0}   # the fake fails: an unfinished folder
    with pytest.raises(dt.TableError, match='failed'):
        dt.run_table('t', _table([('a', 'a', broken)]), [0], 5, root, expert, runs, out, log=lambda *a: None)
    other = {'distill.method': 'fd3d', 'distill.focal.weight': 0.5}   # the fake's behaviour ignores weights
    with pytest.raises(dt.TableError, match=r'runs/t/a/steps5_seed0_\w+ holds a run with other settings'):
        dt.run_table('t', _table([('a', 'a', other)]), [0], 5, root, expert, runs, out, log=lambda *a: None)
    # a finished run of the same behaviour under another command line (the default written out) is this cell
    same = {'distill.method': 'fd3d', 'distill.focal.weight': 3.0}
    dt.run_table('t', _table([('c', 'c', {'distill.method': 'fd3d'})]), [0], 5, root, expert, runs, out,
                 log=lambda *a: None)
    result = dt.run_table('t', _table([('c', 'c', same)]), [0], 5, root, expert, runs, out, log=lambda *a: None)
    assert result['rows'][0]['cells'][0]['same_as'].startswith(os.path.join('t', 'c', 'steps5_seed0_'))
    assert (_cell(runs, 't', 'c', 'steps5_seed0') / 'calls').read_text() == 'x'        # not trained again
    with pytest.raises(dt.TableError, match=r'training in .*runs/t/b/steps5_seed0_\w+ failed \(exit 3\)'):
        dt.run_table('t', _table([('b', 'b', {'distill.method': 'fail'})]), [0], 5, root, expert, runs, out,
                     log=lambda *a: None)
    with pytest.raises(dt.TableError, match=r'unknown rows'):
        dt.run_table('t', _table([('a', 'a', dt.NONE)]), [0], 5, root, expert, runs, out, ['zzz'])
    with pytest.raises(dt.TableError, match='holds no v1.0-trainval or v1.0-mini'):
        dt.dataset_split(str(tmp))


def test_every_table_row_is_a_valid_override():
    """Each row's overrides name existing keys of its pair config with values of the key's type."""
    for name, table in dt.TABLES.items():
        path, arg = table['config'].split(':')
        for key, _, overrides in table['rows']:
            config = _parse(f'{os.path.join(REPO, path)}:{arg}', *[f'--config.{k}={v}' for k, v in overrides.items()])
            for k, v in overrides.items():
                node = config
                for part in k.split('.'):
                    node = node[part]
                assert node == v, (name, key, k)


def test_sweep_sets_every_weight_of_a_method_and_covers_the_shipped_one():
    """The sweep sets all of a method's weights (none forgotten), and the weight each config ships is one the
    sweep measured."""
    _, config = dt.load_config(dt.TABLES['sweep']['config'])
    groups = {'fd3d': ('generative', 'focal'), 'mgd': ('mgd',), 'fitnet': ('fitnet',)}
    for method, keys in dt.METHOD_WEIGHTS.items():
        shipped = {f'distill.{group}.{k}': v for group in groups[method]
                   for k, v in config.distill[group].items() if k.endswith('weight')}
        assert set(shipped) == set(keys), method
        assert len(set(shipped.values())) == 1 and set(shipped.values()) <= set(dt.SWEEP_WEIGHTS), shipped
    rows = {key: overrides for key, _, overrides in dt.TABLES['sweep']['rows']}
    assert rows['fd3d_w10'] == {'distill.method': 'fd3d', 'distill.generative.bev_weight': 10.0,
                                'distill.generative.pv_weight': 10.0, 'distill.focal.weight': 10.0}


def test_detr3d_sweep_covers_the_weight_its_pair_ships():
    """The DETR3D pair's FD3D weights are one value the DETR3D sweep measured, set on every FD3D weight."""
    _, config = dt.load_config(dt.TABLES['sweep_detr3d']['config'])
    shipped = {key: config.distill[key.split('.')[1]][key.split('.')[2]] for key in dt.METHOD_WEIGHTS['fd3d']}
    assert len(set(shipped.values())) == 1 and set(shipped.values()) <= set(dt.DETR3D_SWEEP_WEIGHTS), shipped
    rows = {key: overrides for key, _, overrides in dt.TABLES['sweep_detr3d']['rows']}
    assert set(rows) == {'head'} | {f'{m}_w{w}' for m in ('fd3d', 'mgd', 'fitnet') for w in dt.DETR3D_SWEEP_WEIGHTS}
    assert rows['mgd_w0.3'] == {'distill.method': 'mgd', 'distill.mgd.weight': 0.3}
    assert set(shipped.values()) == {dt.DETR3D_WEIGHT}             # table2_tuned's FD3D row is what ships
    tuned = {key: overrides for key, _, overrides in dt.TABLES['table2_tuned']['rows']}
    assert tuned[f'fd3d_w{dt.DETR3D_WEIGHT}'] == rows[f'fd3d_w{dt.DETR3D_WEIGHT}']
    assert set(tuned) >= set(dt.BASELINES) | {'alone'}
    assert rows['fd3d_w0.3'] == {'distill.method': 'fd3d', 'distill.generative.bev_weight': 0.3,
                                 'distill.generative.pv_weight': 0.3, 'distill.focal.weight': 0.3}


def test_recorded_cells_stand_in_for_missing_runs_of_the_same_table(fake):
    tmp, root, expert = fake
    rows = [('alone', 'apprentice alone', dt.NONE), ('fd3d', 'FD3D', {'distill.method': 'fd3d'})]
    quiet = dict(log=lambda *a: None)
    dt.run_table('old', _table(rows), [0], 7, root, expert, str(tmp / 'runs_old'), str(tmp / 'out'), **quiet)
    old = str(tmp / 'out' / 'old.json')
    result = dt.run_table('new', _table(rows), [0, 1], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'),
                          reuse=[old], **quiet)
    cells = result['rows'][1]['cells']
    assert cells[0]['reused_from'] == old and 'reused_from' not in cells[1]
    assert not glob.glob(str(tmp / 'runs' / 'new' / 'fd3d' / 'steps7_seed0_*'))   # not retrained
    assert (_cell(tmp / 'runs', 'new', 'fd3d', 'steps7_seed1') / 'calls').read_text() == 'x'
    assert result['rows'][1]['nds']['values'] == pytest.approx([0.1, 0.2])
    other = [('fd3d', 'FD3D', {'distill.method': 'fd3d', 'distill.focal.weight': 0.5})]   # other overrides: rerun
    dt.run_table('w', _table(other), [0], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'), reuse=[old], **quiet)
    assert (_cell(tmp / 'runs', 'w', 'fd3d', 'steps7_seed0') / 'calls').exists()
    with pytest.raises(dt.TableError, match='holds another table'):   # other step count
        dt.run_table('x', _table(rows), [0], 8, root, expert, str(tmp / 'runs'), str(tmp / 'out'), reuse=[old], **quiet)


def test_cells_are_reused_for_the_same_behaviour_and_expert_only(fake, monkeypatch):
    tmp, root, expert = fake
    rows = [('fd3d', 'FD3D', {'distill.method': 'fd3d'})]
    quiet = dict(log=lambda *a: None)
    first = dt.run_table('t', _table(rows), [0], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'), **quiet)
    cell = first['rows'][0]['cells'][0]
    assert cell['code_hash'] == dt.source_hash() and cell['expert_hash'] == dt.expert_hash(expert)
    assert cell['behaviour_hash'] == 'a1b2c3d4e5f6'
    assert 'behaviour hash, code hash, expert hash, commit' in (tmp / 'out' / 't.md').read_text()
    fingerprinted = (tmp / 'fingerprints_run').read_text()
    dt.run_table('t', _table(rows), [0], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'), **quiet)
    assert (tmp / 'fingerprints_run').read_text() == fingerprinted   # cached for the same code and expert
    monkeypatch.setattr(dt, 'source_hash', lambda: 'another code')     # a refactor: fingerprinted again ...
    dt.run_table('t', _table(rows), [0], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'), **quiet)
    assert len((tmp / 'fingerprints_run').read_text()) == len(fingerprinted) + 1
    assert len(glob.glob(str(tmp / 'runs' / 't' / 'fd3d' / 'steps7_seed0_*'))) == 1   # ... same behaviour: reused
    assert (_cell(tmp / 'runs', 't', 'fd3d', 'steps7_seed0') / 'calls').read_text() == 'x'
    (tmp / 'behaviour').write_text('f6e5d4c3b2a1')                        # a change of behaviour: a new cell
    monkeypatch.setattr(dt, 'source_hash', lambda: 'third code')
    dt.run_table('t', _table(rows), [0], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'), **quiet)
    assert len(glob.glob(str(tmp / 'runs' / 't' / 'fd3d' / 'steps7_seed0_*'))) == 2   # not the old run's numbers
    recorded = str(tmp / 'out' / 't.json')
    (pathlib.Path(expert) / 'params' / 'weights').write_bytes(b'retrained expert')   # the expert changed
    second = dt.run_table('t2', _table(rows), [0], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'),
                          reuse=[recorded], **quiet)
    assert 'reused_from' not in second['rows'][0]['cells'][0]
    assert (_cell(tmp / 'runs', 't2', 'fd3d', 'steps7_seed0') / 'calls').read_text() == 'x'


def test_paired_differences_per_seed_against_head_and_the_best_baseline():
    def row(key, values):
        return dict(key=key, nds=dict(values=values, mean=sum(values) / len(values)))
    rows = [row('alone', [0.0, 0.0, 0.0]), row('head', [0.10, 0.20, 0.30]), row('fitnet', [0.15, 0.10, 0.50]),
            row('mgd', [0.12, 0.22, 0.29]), row('fd3d', [0.20, 0.20, 0.40])]
    paired = dt.paired_differences(rows)
    assert paired['fd3d']['head']['values'] == pytest.approx([0.10, 0.0, 0.10])
    assert paired['fd3d']['head']['positive'] == 2 and paired['fd3d']['head']['mean'] == pytest.approx(0.2 / 3)
    assert paired['fd3d']['best_baseline']['against'] == 'fitnet'                  # the best mean: 0.25
    assert paired['fd3d']['best_baseline']['values'] == pytest.approx([0.05, 0.10, -0.10])
    assert paired['fitnet']['best_baseline']['against'] == 'mgd'                   # itself left out
    assert 'head' not in paired['head']


def test_the_decision_rule_is_a_paired_t_interval_that_must_exclude_zero():
    """The rule of docs/experiments.md: mean +- t(0.975, n-1) * std / sqrt(n) of the per-seed differences, with
    t from a table (not from the code under test); separated only when the interval excludes 0."""
    t_table = {2: 12.706, 3: 4.303, 8: 2.365}   # t(0.975, n - 1), a printed table
    for seeds, quantile in t_table.items():
        assert dt.t_quantile(seeds) == pytest.approx(quantile, abs=1e-3)
    diffs = [0.02, 0.01, 0.03, -0.005, 0.015, 0.025, 0.01, 0.02]   # 7 of 8 positive
    rule = dt.compare(diffs)
    mean, std = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    half = 2.365 * std / np.sqrt(8)
    assert rule['interval'] == pytest.approx([mean - half, mean + half], abs=1e-5)
    assert rule['verdict'] == 'better' and rule['positive'] == 7 and rule['seeds'] == 8
    assert dt.compare([-d for d in diffs])['verdict'] == 'worse'
    # the same mean with three times the spread, and a 3-seed version of it: ties
    wide = [mean + 3 * (d - mean) for d in diffs]
    assert dt.compare(wide)['verdict'] == 'tie' and dt.compare(wide)['interval'][0] < 0 < dt.compare(wide)['interval'][1]
    assert dt.compare([0.02, 0.021, 0.019])['verdict'] == 'better' and dt.compare([0.02, -0.01, 0.03])['verdict'] == 'tie'
    assert dt.compare([0.05])['verdict'] == 'tie' and dt.compare([0.05])['interval'] is None   # one seed: no rule
    # seeds a spread needs to separate 0.01: std 0.02 -> t(n-1) * 0.02 / sqrt(n) < 0.01 first at n = 18
    assert dt.seeds_to_separate(0.02) == 18
    assert 2.110 * 0.02 / np.sqrt(18) < 0.01 <= 2.120 * 0.02 / np.sqrt(17)   # t(0.975, 17), t(0.975, 16)
    assert dt.seeds_to_separate(0.0) is None


def test_every_row_is_compared_with_every_baseline_in_the_markdown():
    def row(key, values):
        return dict(key=key, label=f'the {key} row', cells=[dict(wall_s=None)] * len(values),
                    nds=dict(values=values, mean=float(np.mean(values)), std=float(np.std(values, ddof=1))),
                    map=dict(values=values, mean=float(np.mean(values)), std=0.0))
    rows = [row('alone', [0.0] * 3), row('head', [0.10, 0.20, 0.30]), row('fitnet', [0.15, 0.10, 0.50]),
            row('fd3d', [0.20, 0.30, 0.40])]
    text = dt.markdown(dict(title='t', steps=1, seeds=[0, 1, 2], dataset='d', machine='m', expert=None, rows=rows))
    decided = [line for line in text.splitlines() if line.startswith('| fd3d | ')]
    assert [line.split(' | ')[1] for line in decided] == ['head', 'fitnet']
    assert decided[0].split(' | ')[2].startswith('+0.1000') and decided[0].split(' | ')[2].endswith(': better')
    assert any(line.startswith('| fitnet | head | ') for line in text.splitlines())


def test_tuning_splits_are_carved_from_the_training_scenes(tmp_path):
    root = tmp_path / 'data'
    (root / 'v1.0-trainval').mkdir(parents=True)
    train = [f'scene-{i:04d}' for i in range(1, 11)]
    val = ['scene-0003x', 'scene-0999x']
    splits = {'train': train, 'val': val}
    (root / 'v1.0-trainval' / 'splits.json').write_text(json.dumps(splits))
    (root / 'v1.0-trainval' / 'scene.json').write_text(json.dumps([{'name': n} for n in train + val]))
    assert dt.carve_tune_splits(str(root)) == ('tune_train', 'tune_val')
    written = json.loads((root / 'v1.0-trainval' / 'splits.json').read_text())
    assert written['tune_val'] == train[-2:] and written['tune_train'] == train[:-2]
    assert written['train'] == train and written['val'] == val          # the others are kept


def test_parallel_jobs_give_the_same_table(fake):
    tmp, root, expert = fake
    rows = [('alone', 'apprentice alone', dt.NONE), ('fd3d', 'FD3D', {'distill.method': 'fd3d'})]
    shown = []
    result = dt.run_table('p', _table(rows), [0, 1, 2], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'),
                          log=shown.append, jobs=3)
    assert [r['nds']['values'] for r in result['rows']] == [pytest.approx([0.1, 0.2, 0.3])] * 2
    assert any(line.startswith('[fd3d 2] ') and 'ETA' in line for line in shown)
    assert (tmp / 'fingerprints_run').read_text() == 'xx'   # one fingerprint per row, though its seeds ran at once


def test_a_row_of_the_same_behaviour_reuses_another_rows_run(fake):
    """A default written out (``fd3d`` and ``fd3d_w3``) has the same behaviour fingerprint: its cells are the
    other row's runs, not new trainings; a row of another behaviour trains."""
    tmp, root, expert = fake
    runs = tmp / 'runs'
    first = [('fd3d_w3', 'FD3D, weights 3', dt.weighted('fd3d', 3))]
    dt.run_table('t', _table(first), [0, 1], 7, root, expert, str(runs), str(tmp / 'out'), log=lambda *a: None)
    trained = _cell(runs, 't', 'fd3d_w3', 'steps7_seed1')
    assert (trained / 'calls').read_text() == 'x'
    lines = []
    both = first + [('fd3d', 'FD3D', {'distill.method': 'fd3d'})]
    result = dt.run_table('t', _table(both), [0, 1], 7, root, expert, str(runs), str(tmp / 'out'), log=lines.append)
    assert not (runs / 't' / 'fd3d').exists() or not list((runs / 't' / 'fd3d').glob('*/calls'))
    assert (trained / 'calls').read_text() == 'x'                          # not trained again either
    assert [c['same_as'] for c in result['rows'][1]['cells']] == [
        os.path.join('t', 'fd3d_w3', _cell(runs, 't', 'fd3d_w3', f'steps7_seed{s}').name) for s in (0, 1)]
    assert result['rows'][1]['nds']['values'] == pytest.approx([0.1, 0.2])
    assert any('the same behaviour as' in line for line in lines)
    assert 'fd3d = fd3d_w3' in (tmp / 'out' / 't.md').read_text()
    (tmp / 'behaviour').write_text('ffff0000ffff')   # another behaviour (another code): a new run
    third = [('mgd', 'MGD', {'distill.method': 'mgd'})]
    dt.run_table('t', _table(third), [0], 7, root, expert, str(runs), str(tmp / 'out'), log=lambda *a: None)
    assert (_cell(runs, 't', 'mgd', 'steps7_seed0') / 'calls').read_text() == 'x'


def test_render_rewrites_the_markdown_of_a_result_file_by_todays_rule(fake, monkeypatch, capsys):
    tmp, root, expert = fake
    rows = [('head', 'head only', {'distill.method': 'none'}), ('fd3d', 'FD3D', {'distill.method': 'fd3d'})]
    dt.run_table('t', _table(rows), [0, 1, 2], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'),
                 log=lambda *a: None)
    written = (tmp / 'out' / 't.md').read_text()
    (tmp / 'out' / 't.md').write_text('an older rendering without the decisions')
    monkeypatch.setattr(sys, 'argv', ['distill_table.py', '--render', str(tmp / 'out' / 't.json')])
    dt.main()
    assert (tmp / 'out' / 't.md').read_text() == written and '| fd3d | head |' in written
    (tmp / 'bad.json').write_text('{"rows": []}')
    monkeypatch.setattr(sys, 'argv', ['distill_table.py', '--render', str(tmp / 'bad.json')])
    with pytest.raises(SystemExit, match=r'bad.json: not a result file'):
        dt.main()


def test_an_interrupted_table_keeps_its_finished_cells_for_reuse(fake):
    """Every finished cell is written to NAME.partial.json at once; after a failure (or a lost machine) the partial
    file stands in for the gone run folders, and the finished table removes it."""
    tmp, root, expert = fake
    runs, out, quiet = tmp / 'runs', tmp / 'out', dict(log=lambda *a: None)
    rows = [('fd3d', 'FD3D', {'distill.method': 'fd3d'}), ('mgd', 'MGD', {'distill.method': 'fail'})]
    with pytest.raises(dt.TableError, match='failed'):
        dt.run_table('t', _table(rows), [0, 1], 7, root, expert, str(runs), str(out), **quiet)
    partial = json.loads((out / 't.partial.json').read_text())
    assert partial['complete'] is False and not (out / 't.json').exists()
    assert [(c['seed'], c['nds']) for c in partial['rows'][0]['cells']] == [(0, pytest.approx(0.1)), (1, pytest.approx(0.2))]
    assert partial['rows'][1]['cells'] == []
    shutil.rmtree(runs)                                    # the machine is gone; the committed partial file is not
    done = [('fd3d', 'FD3D', {'distill.method': 'fd3d'}), ('mgd', 'MGD', {'distill.method': 'mgd'})]
    result = dt.run_table('t', _table(done), [0, 1], 7, root, expert, str(runs), str(out),
                          reuse=[str(out / 't.partial.json')], **quiet)
    assert not list((runs / 't' / 'fd3d').glob('*/calls'))               # the FD3D cells were not trained again
    assert [c['reused_from'] for c in result['rows'][0]['cells']] == [str(out / 't.partial.json')] * 2
    assert result['rows'][0]['nds']['values'] == pytest.approx([0.1, 0.2])
    assert len(list((runs / 't' / 'mgd').glob('*/calls'))) == 2
    assert (out / 't.json').exists() and not (out / 't.partial.json').exists()


def test_tuned_table_runs_every_method_at_a_swept_weight_with_the_baselines_keys():
    """table1_tuned writes out each method's tuned weight (one the sweep measured, every weight of the method set),
    keeps table 1's baseline keys (so the decision rule compares against them) and its single-term rows switch off
    exactly one FD3D term."""
    rows = {key: overrides for key, _, overrides in dt.TABLES['table1_tuned']['rows']}
    assert set(dt.BASELINES) <= set(rows) and {'fd3d', 'fd3d_gen', 'fd3d_focal'} <= set(rows)
    for method, weight in dt.TUNED_WEIGHTS.items():
        assert weight in dt.SWEEP_WEIGHTS and f'{method}_w{weight}' in {r[0] for r in dt.TABLES['sweep']['rows']}
        assert rows[method] == dt.weighted(method, weight), method
    assert rows['fd3d_gen'] == {**dt.weighted('fd3d', dt.TUNED_WEIGHTS['fd3d']), 'distill.focal.weight': 0.0}
    assert rows['fd3d_focal']['distill.focal.weight'] == float(dt.TUNED_WEIGHTS['fd3d'])
    assert rows['fd3d_focal']['distill.generative.bev_weight'] == rows['fd3d_focal']['distill.generative.pv_weight'] == 0


def test_an_ablation_table_compares_each_choice_with_its_default(fake):
    """A table with a ``reference`` row (table 3: the current FD3D default) judges each choice against it by the
    rule, besides the baselines; the default itself and the baselines are not compared with it."""
    tmp, root, expert = fake
    assert dt.TABLES['table3']['reference'] == 'fd3d'
    rows = [('head', 'head only', {'distill.method': 'none'}), ('fd3d', 'FD3D', {'distill.method': 'fd3d'}),
            ('topk', 'top-k', {'distill.method': 'fd3d', 'distill.mask.select': 'topk'})]
    table = dict(_table(rows), reference='fd3d')
    result = dt.run_table('t', table, [0, 1, 2], 7, root, expert, str(tmp / 'runs'), str(tmp / 'out'),
                          log=lambda *a: None)
    assert result['reference'] == 'fd3d' and result['paired']['topk']['reference']['against'] == 'fd3d'
    assert 'reference' not in result['paired']['fd3d'] and 'reference' not in result['paired']['head']
    md = (tmp / 'out' / 't.md').read_text()
    assert '| topk | fd3d (the default) | +0.0000 [+0.0000, +0.0000] 0/3 > 0: tie |' in md   # the fake: equal NDS
    assert '| fd3d | fd3d (the default) |' not in md
