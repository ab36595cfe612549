"""The paper's distillation tables in miniature, trained and evaluated end to end on a synthetic
nuScenes-format set (a real ``fd3d_jax.train`` run and the devkit's ``DetectionEval`` per cell).

    python experiments/distill_table.py --table table1 [--seeds 0 1 2] [--steps 2000] [--rows alone fd3d]
        [--dataroot data/synthetic40] [--expert DIR] [--runs runs/tables] [--name NAME]
    python experiments/distill_table.py --table table1 --short      # the README's main job (minutes)
    python experiments/distill_table.py --table table1 --seeds 0 1 2 --reuse experiments/results/table1.json
    python experiments/distill_table.py --render experiments/results/NAME.json   # .md/.png by today's rule

Tables: ``table1`` BEVFormer base -> tiny (the ``:demo`` pair), ``table2`` DETR3D R101 -> R50 (``:demo``),
``table3`` ablations of the reconstructed FD3D switches (mask source, queries, weights; the paper publishes
no ablation table; docs/fd3d_reconstruction.md). Every row x seed is one training run in
``RUNS/TABLE/ROW/stepsN_seedS_<code hash>_<expert hash>``; finished runs of the same code and expert are reused,
so an interrupted table resumes. Writes ``experiments/results/NAME.json``, ``NAME.md`` and ``NAME.png`` (mean
+- std over seeds, per-seed paired differences against head-only and the best baseline; the expert's own score
and its score on the distillation input). The expert is a folder of ``experiments/export_expert.py`` or a
training workdir. ``--split tune`` trains and reports on splits carved from the training scenes.
"""
import argparse
import concurrent.futures
import glob
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import matplotlib
import numpy as np
import scipy.stats

from experiments.benchmark import REPO, git_commit, load_config, machine_info
from fd3d_jax.train import loop
from fd3d_jax.train.metrics_writer import read_metrics

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

NONE = {'distill.method': 'none', 'distill.init_apprentice_head': False}

# Rows: (key, label, config overrides). Every distillation row starts the apprentice's head from the
# expert's (the released duplicate_student_head); "apprentice alone" never sees the expert, "expert head
# only" separates that initialisation from the distillation losses. BASELINES are the rows a method must beat.
FD3D = {'distill.method': 'fd3d'}
FD3D_GEN = {**FD3D, 'distill.focal.weight': 0.0}
FD3D_FOCAL = {**FD3D, 'distill.generative.bev_weight': 0.0, 'distill.generative.pv_weight': 0.0}
HEAD_ROW = ('head', 'expert head only (no distillation loss)', {'distill.method': 'none'})
_METHOD_ROWS = [
    ('alone', 'apprentice alone', NONE),
    HEAD_ROW,
    ('fitnet', 'FitNet (BEV + FPN)', {'distill.method': 'fitnet'}),
    ('mgd', 'MGD (random masks)', {'distill.method': 'mgd'}),
    ('heatmap', 'released heatmap distiller (CWD + GT-heatmap BEV L2)', {'distill.method': 'heatmap'}),
    ('fd3d_gen', 'FD3D generative only (query masks)', FD3D_GEN),
    ('fd3d_focal', 'FD3D focal only', FD3D_FOCAL),
    ('fd3d', 'FD3D generative + focal', FD3D),
]
BASELINES = ('head', 'fitnet', 'mgd', 'heatmap')
# Every weight of a method, set together by the weight sweep (``sweep`` table, run on the tuning split).
METHOD_WEIGHTS = {
    'fd3d': ('distill.generative.bev_weight', 'distill.generative.pv_weight', 'distill.focal.weight'),
    'mgd': ('distill.mgd.weight',),
    'fitnet': ('distill.fitnet.bev_weight', 'distill.fitnet.pv_weight'),
}
SWEEP_WEIGHTS = (1, 3, 10)
DETR3D_SWEEP_WEIGHTS = (0.3, 1, 3)   # below BEVFormer's: at 3 the focal term pulls on the FPN as hard as detection
# The weight of best mean NDS of each method's sweep on the BEVFormer pair's tuning split (1 / 3 / 10, seeds 0-2):
# what table1_tuned runs. None of them is separated from the others by the decision rule (docs/experiments.md).
TUNED_WEIGHTS = {'fd3d': 3, 'fitnet': 3, 'mgd': 3}
DETR3D_WEIGHT = 0.3                  # the sweep's choice (configs/fd3d_detr3d_r101_to_r50.py ships it)


def weighted(method, weight):
    """The overrides of ``distill.method=method`` with every one of its (per-element) weights at ``weight``."""
    return {'distill.method': method, **{key: float(weight) for key in METHOD_WEIGHTS[method]}}


def _sweep_rows():
    rows = [HEAD_ROW]
    for method, label in (('fd3d', 'FD3D generative + focal'), ('mgd', 'MGD (random masks)'),
                          ('fitnet', 'FitNet (BEV + FPN)')):
        rows += [(f'{method}_w{w}', f'{label}, weights {w}', weighted(method, w)) for w in SWEEP_WEIGHTS]
    return rows


def _detr3d_sweep_rows():
    rows = [HEAD_ROW]
    for method, label in (('fd3d', 'FD3D generative + focal'), ('mgd', 'MGD (random masks)'),
                          ('fitnet', 'FitNet (FPN)')):
        rows += [(f'{method}_w{w}', f'{label}, weights {w}', weighted(method, w)) for w in DETR3D_SWEEP_WEIGHTS]
    return rows


TABLES = {
    'table1': dict(title='BEVFormer base -> tiny (fd3d_bevformer_base_to_tiny.py:demo)',
                   config='configs/fd3d_bevformer_base_to_tiny.py:demo',
                   expert='experiments/experts/bevformer_base_demo', rows=_METHOD_ROWS),
    'table2': dict(title='DETR3D R101 -> R50 (fd3d_detr3d_r101_to_r50.py:demo)',
                   config='configs/fd3d_detr3d_r101_to_r50.py:demo',
                   expert='experiments/experts/detr3d_r101_demo', rows=_METHOD_ROWS),
    'table3': dict(title='FD3D ablations, BEVFormer base -> tiny (:demo)',
                   config='configs/fd3d_bevformer_base_to_tiny.py:demo', folder='table1',   # shares its runs
                   reference='fd3d',   # each choice against the current default (replaces it only when separated)
                   expert='experiments/experts/bevformer_base_demo', rows=[
                       *_METHOD_ROWS[:2],
                       ('fd3d', 'FD3D (score >= 0.3 queries, zero mask, full-map loss, focal on selected queries)', FD3D),
                       ('fd3d_gen', 'generative only', FD3D_GEN),
                       ('fd3d_focal', 'focal only', FD3D_FOCAL),
                       ('topk', 'mask source: top-30 queries', {**FD3D, 'distill.mask.select': 'topk'}),
                       ('gt', 'mask source: GT-matched queries', {**FD3D, 'distill.mask.select': 'gt'}),
                       ('random_mask', 'mask mode: MGD random mask inside the boxes',
                        {**FD3D, 'distill.mask.mode': 'random'}),
                       ('instance_area', 'generative loss over the masked area only',
                        {**FD3D, 'distill.generative.area': 'instance'}),
                       ('focal_selected', 'focal: selected queries only', {**FD3D, 'distill.focal.queries': 'selected'}),
                       ('focal_all', 'focal: all queries (the default until 2026-12-08)',
                        {**FD3D, 'distill.focal.queries': 'all'}),
                       ('focal_generated', 'focal: on the generated BEV', {**FD3D, 'distill.focal.source': 'generated'}),
                       ('bev_only', 'BEV terms only (no PV generative)', {**FD3D, 'distill.generative.pv_weight': 0.0}),
                   ]),
    # The weight sweep: each method's weights at 1, 3, 10 (run it with --split tune: weights are chosen on the
    # tuning split, never on val). Shares table 1's run folders.
    'sweep': dict(title='Weight sweep, BEVFormer base -> tiny (:demo)',
                  config='configs/fd3d_bevformer_base_to_tiny.py:demo', folder='table1',
                  expert='experiments/experts/bevformer_base_demo', rows=_sweep_rows()),
    # Table 1 with every method at the weight of best mean on the tuning split (written out, so the cells stay valid
    # whatever the config defaults): FD3D 3 and FitNet 3 (sweep_tune_gpu, sweep_fitnet_tune_gpu), MGD 3
    # (sweep_mgd_tune_cpu); the heatmap baseline at its released strength (no weight to tune). Keys as table 1's, so
    # the baselines are the same rows. Shares table 1's run folders.
    'table1_tuned': dict(title='BEVFormer base -> tiny (:demo), every method at its tuned weight',
                         config='configs/fd3d_bevformer_base_to_tiny.py:demo', folder='table1',
                         expert='experiments/experts/bevformer_base_demo', rows=[
                             HEAD_ROW,
                             ('fitnet', f"FitNet (BEV + FPN), weights {TUNED_WEIGHTS['fitnet']}",
                              weighted('fitnet', TUNED_WEIGHTS['fitnet'])),
                             ('mgd', f"MGD (random masks), weight {TUNED_WEIGHTS['mgd']}",
                              weighted('mgd', TUNED_WEIGHTS['mgd'])),
                             *(row for row in _METHOD_ROWS if row[0] == 'heatmap'),
                             ('fd3d', f"FD3D generative + focal, weights {TUNED_WEIGHTS['fd3d']}",
                              weighted('fd3d', TUNED_WEIGHTS['fd3d'])),
                             ('fd3d_gen', f"FD3D generative only, weights {TUNED_WEIGHTS['fd3d']}",
                              {**weighted('fd3d', TUNED_WEIGHTS['fd3d']), 'distill.focal.weight': 0.0}),
                             ('fd3d_focal', f"FD3D focal only, weight {TUNED_WEIGHTS['fd3d']}",
                              {**weighted('fd3d', TUNED_WEIGHTS['fd3d']), 'distill.generative.bev_weight': 0.0,
                               'distill.generative.pv_weight': 0.0})]),
    # Table 2 with FD3D's weight written out (the one the DETR3D sweep chose, as the pair config ships it): its
    # FD3D cells are the sweep's, so they stay valid for code whose config default was another weight.
    'table2_tuned': dict(title='DETR3D R101 -> R50 (fd3d_detr3d_r101_to_r50.py:demo), FD3D at the tuned weight',
                         config='configs/fd3d_detr3d_r101_to_r50.py:demo', folder='table2',
                         expert='experiments/experts/detr3d_r101_demo', rows=[
                             *(row for row in _METHOD_ROWS if row[0] in ('alone',) + BASELINES),
                             (f'fd3d_w{DETR3D_WEIGHT}', f'FD3D generative + focal, weights {DETR3D_WEIGHT}',
                              weighted('fd3d', DETR3D_WEIGHT))]),
    # FD3D's ablations for the DETR3D pair at the tuned weight (each remaining term keeps weight DETR3D_WEIGHT),
    # beside the rows it must beat. Shares table 2's run folders.
    'table2_ablations': dict(title=f'FD3D ablations, DETR3D R101 -> R50 (:demo), weights {DETR3D_WEIGHT}',
                             config='configs/fd3d_detr3d_r101_to_r50.py:demo', folder='table2',
                             expert='experiments/experts/detr3d_r101_demo', rows=[
                                 HEAD_ROW,
                                 *(row for row in _METHOD_ROWS if row[0] == 'fitnet'),
                                 (f'fd3d_w{DETR3D_WEIGHT}', f'FD3D generative + focal, weights {DETR3D_WEIGHT}',
                                  weighted('fd3d', DETR3D_WEIGHT)),
                                 (f'fd3d_gen_w{DETR3D_WEIGHT}', 'generative only',
                                  {**weighted('fd3d', DETR3D_WEIGHT), 'distill.focal.weight': 0.0}),
                                 (f'fd3d_focal_w{DETR3D_WEIGHT}', 'focal only',
                                  {**weighted('fd3d', DETR3D_WEIGHT), 'distill.generative.bev_weight': 0.0,
                                   'distill.generative.pv_weight': 0.0}),
                             ]),
    # Compute precision (model.dtype): the head-only row in float32 and in bfloat16, paired by seed (same init,
    # same batches). Shares table 1's run folders.
    'precision': dict(title='float32 vs bfloat16 compute, BEVFormer base -> tiny (:demo), expert head only',
                      config='configs/fd3d_bevformer_base_to_tiny.py:demo', folder='table1',
                      expert='experiments/experts/bevformer_base_demo', rows=[
                          HEAD_ROW,
                          ('head_bf16', 'expert head only, model.dtype=bfloat16',
                           {'distill.method': 'none', 'model.dtype': 'bfloat16'})]),
    # Every method's weights for the DETR3D pair (0.3, 1, 3; run it with --split tune). Shares table 2's run folders.
    'sweep_detr3d': dict(title='Weight sweep, DETR3D R101 -> R50 (:demo)',
                         config='configs/fd3d_detr3d_r101_to_r50.py:demo', folder='table2',
                         expert='experiments/experts/detr3d_r101_demo', rows=_detr3d_sweep_rows()),
}
SHORT = dict(rows=('alone', 'head', 'fd3d'), seeds=(0,), steps=600)
TUNE_SPLITS = ('tune_train', 'tune_val')   # carved from the training scenes (--split tune); val is never tuned on


class TableError(ValueError):
    """A run folder that holds another run, or a run that failed; names the folder."""


def dataset_split(dataroot):
    """(version, train split, val split) of a synthetic set (``fd3d_jax.data.synthetic``: 10 scenes give
    v1.0-mini, more give v1.0-trainval)."""
    if os.path.isdir(os.path.join(dataroot, 'v1.0-trainval')):
        return 'v1.0-trainval', 'train', 'val'
    if os.path.isdir(os.path.join(dataroot, 'v1.0-mini')):
        return 'v1.0-mini', 'mini_train', 'mini_val'
    raise TableError(f'{dataroot} holds no v1.0-trainval or v1.0-mini tables: generate it with '
                     f'python -m fd3d_jax.data.synthetic --out {dataroot} --scenes 40')


def _hash_files(paths, root):
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, 'rb') as f:
            digest.update(f.read())
    return digest.hexdigest()


def source_hash():
    """sha256 of the code a cell runs: every ``fd3d_jax/**/*.py`` and ``configs/*.py`` (content and path)."""
    files = glob.glob(os.path.join(REPO, 'fd3d_jax', '**', '*.py'), recursive=True)
    return _hash_files(files + glob.glob(os.path.join(REPO, 'configs', '*.py')), REPO)


def expert_hash(expert):
    """sha256 of an expert's parameters: the files of its ``params/`` folder (``export_expert.py``, the
    converter) or of its training workdir's ``checkpoints/``."""
    for sub in ('params', 'checkpoints'):
        files = [f for f in glob.glob(os.path.join(expert, sub, '**', '*'), recursive=True) if os.path.isfile(f)]
        if files:
            return _hash_files(files, expert)
    raise TableError(f'{expert} holds no params/ or checkpoints/: not an expert')


def carve_tune_splits(dataroot, fraction=0.2):
    """Writes ``tune_train`` / ``tune_val`` to ``<dataroot>/<version>/splits.json``: the training split's scenes
    (in name order) with the last ``fraction`` held out for tuning; the val split is not touched. Returns
    (train split, val split) names for the cells."""
    version, train, _ = dataset_split(dataroot)
    with open(os.path.join(dataroot, version, 'scene.json')) as f:
        names = sorted(s['name'] for s in json.load(f))
    splits_path = os.path.join(dataroot, version, 'splits.json')
    splits = {}
    if os.path.exists(splits_path):
        with open(splits_path) as f:
            splits = json.load(f)
    from nuscenes.utils.splits import create_splits_scenes   # nuscenes-devkit: imported where used
    train_scenes = [n for n in names if n in set(splits.get(train) or create_splits_scenes()[train])]
    held = max(1, int(round(fraction * len(train_scenes))))
    if len(train_scenes) <= held:
        raise TableError(f'{dataroot}: {len(train_scenes)} training scenes are too few to carve a tuning split')
    splits.update({TUNE_SPLITS[0]: train_scenes[:-held], TUNE_SPLITS[1]: train_scenes[-held:]})
    with open(splits_path, 'w') as f:
        json.dump(splits, f, indent=1)
    return TUNE_SPLITS


def _config_args(dataroot, expert, splits, sets):
    version, train, val = dataset_split(dataroot)
    train, val = splits or (train, val)
    sets = {'data.dataroot': dataroot, 'data.version': version, 'data.train_split': train,
            'data.val_split': val, 'distill.expert_checkpoint': expert, **sets}
    return [f'--config.{k}={v}' for k, v in sets.items()]


def run_command(table, overrides, seed, steps, dataroot, expert, workdir, splits=None):
    sets = {'seed': seed, **overrides}
    if steps:
        sets['train.num_steps'] = steps
    return [sys.executable, '-m', 'fd3d_jax.train', '--config', table['config'], '--workdir', workdir,
            *_config_args(dataroot, expert, splits, sets)]


def expert_command(table, dataroot, expert, workdir, splits=None):
    """``fd3d_jax.eval --expert``: the expert on the apprentice's val images as the distiller feeds them."""
    return [sys.executable, '-m', 'fd3d_jax.eval', '--expert', '--config', table['config'], '--workdir', workdir,
            *_config_args(dataroot, expert, splits, {})]


def fingerprint_command(table, overrides, steps, dataroot, expert, splits=None):
    """``experiments/cell_fingerprint.py`` on a row's command line (seed 0: the code's behaviour, not the seed's)."""
    cmd = run_command(table, overrides, 0, steps, dataroot, expert, '', splits)
    workdir = cmd.index('--workdir')
    return [sys.executable, os.path.join(REPO, 'experiments', 'cell_fingerprint.py')] + cmd[3:workdir] + \
        cmd[workdir + 2:]


def behaviour(table, overrides, steps, dataroot, expert, splits, cache_dir, identity, log=print):
    """The behaviour fingerprint (``experiments/cell_fingerprint.py``) of a row: what its cells' numbers depend
    on. Computed once per code and expert (cached in ``cache_dir`` by their hashes and the command line)."""
    cmd = fingerprint_command(table, overrides, steps, dataroot, expert, splits)
    key = hashlib.sha256(json.dumps([identity['code_hash'], identity['expert_hash'], cmd[2:]]).encode()).hexdigest()
    path = os.path.join(cache_dir, f'{key[:16]}.json')
    with _FINGERPRINT_LOCKS_LOCK:   # --jobs: the seeds of a row ask at once; one computes, the others read its file
        lock = _FINGERPRINT_LOCKS.setdefault(path, threading.Lock())
    with lock:
        return _behaviour(cmd, path, identity, log)


_FINGERPRINT_LOCKS, _FINGERPRINT_LOCKS_LOCK = {}, threading.Lock()


def _behaviour(cmd, path, identity, log):
    cache_dir = os.path.dirname(path)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)['behaviour']
    os.makedirs(cache_dir, exist_ok=True)
    log(f'  behaviour fingerprint: {" ".join(cmd[1:])}')
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or not lines[-1].startswith('{"behaviour"'):
        log_path = path[:-len('.json')] + '.log'
        with open(log_path, 'w') as f:
            f.write(done.stdout + done.stderr)
        raise TableError(f'the behaviour fingerprint failed (exit {done.returncode}): see {log_path}')
    result = dict(json.loads(lines[-1]), argv=cmd[1:], **identity)
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(path + '.tmp', path)
    return result['behaviour']


def run_logged(cmd, log_path, log=print):
    """Runs ``cmd`` with its output appended to ``log_path``; its progress lines (``step N/M  loss ...  ETA``)
    and its evaluation line are passed on to ``log`` as they come. Returns the exit status."""
    with open(log_path, 'a') as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True, bufsize=1)
        for line in proc.stdout:
            out.write(line)
            if line.startswith(('step ', 'evaluation on', 'resumed from')):
                log('    ' + line.rstrip())
        return proc.wait()


def run_cell(cmd, workdir, identity=None, log=print):
    """Runs (or reuses) one training run; returns its devkit summary, timing and ``identity`` (the code, expert
    and commit that made it: ``cell_identity``, kept in the folder's run.json)."""
    os.makedirs(workdir, exist_ok=True)
    evaluated = loop.EXPERT_EVAL if '--expert' in cmd else 'eval'   # the expert's own folder
    spec_path, summary_path = os.path.join(workdir, 'run.json'), os.path.join(workdir, evaluated, 'metrics_summary.json')
    argv = cmd[1:]
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            saved = json.load(f)
        if saved['argv'] != argv:
            raise TableError(f'{workdir} holds a run with other settings (see its run.json): remove it or '
                             f'pass another --runs folder')
        identity = dict(identity or {}, commit=saved.get('commit', (identity or {}).get('commit')))
    with open(spec_path, 'w') as f:
        json.dump(dict(argv=argv, **(identity or {})), f, indent=1)
    if not os.path.exists(summary_path):
        log(f'  training: {" ".join(argv)}')
        t0 = time.time()
        rc = run_logged(cmd, os.path.join(workdir, 'train.log'), log)
        if rc or not os.path.exists(summary_path):
            raise TableError(f'training in {workdir} failed (exit {rc}): see {workdir}/train.log')
        with open(os.path.join(workdir, 'wall.json'), 'w') as f:
            json.dump(dict(seconds=time.time() - t0), f)
    with open(summary_path) as f:
        s = json.load(f)
    wall = None
    if os.path.exists(os.path.join(workdir, 'wall.json')):
        with open(os.path.join(workdir, 'wall.json')) as f:
            wall = json.load(f)['seconds']
    return dict(nds=s['nd_score'], map=s['mean_ap'], tp_errors=s['tp_errors'], wall_s=wall, argv=argv,
                final_loss=final_loss(workdir), **(identity or {}))


def final_loss(workdir, fraction=0.25):
    """Mean training loss over the last ``fraction`` of the run's logged steps (its ``metrics.jsonl``), or None."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return None
    losses = [m['loss'] for m in read_metrics(path) if 'loss' in m]
    return float(np.mean(losses[-max(1, int(len(losses) * fraction)):])) if losses else None


def cell_identity(expert):
    """What a cell's numbers depend on besides its command line: ``code_hash`` (``source_hash``),
    ``expert_hash`` and the ``commit`` (informative: a docs-only commit does not change the code hash)."""
    return dict(code_hash=source_hash(), expert_hash=expert_hash(expert), commit=git_commit())


# The decision rule, fixed before the runs (docs/experiments.md): a row and a baseline are compared by their
# per-seed paired differences (same seed: same initialisation and batches); "separated" when the two-sided 95 %
# t-interval of the mean difference excludes 0, "better" or "worse" by its sign; otherwise "tie".
CONFIDENCE = 0.95
RESOLUTION = 0.01   # the NDS difference whose seed count each comparison reports (``seeds_to_separate``)


def t_quantile(seeds):
    """The two-sided ``CONFIDENCE`` quantile of Student's t with ``seeds - 1`` degrees of freedom."""
    return float(scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, seeds - 1))


def seeds_to_separate(std, difference=RESOLUTION, most=1000):
    """The fewest seeds whose interval half-width ``t(n - 1) * std / sqrt(n)`` is below ``difference``, for
    paired differences of standard deviation ``std`` (None when ``std`` is 0 or more than ``most`` are needed)."""
    if not std:
        return None
    return next((n for n in range(2, most + 1) if t_quantile(n) * std / np.sqrt(n) < difference), None)


def compare(values):
    """The rule on per-seed differences ``values`` (row minus baseline): mean, std, the 95 % t-interval, how many
    are positive, the verdict ('better', 'worse', 'tie'; one seed: 'tie', no interval) and the seeds the observed
    std needs to separate a ``RESOLUTION`` difference."""
    diffs = np.asarray(values, np.float64)
    mean, seeds = float(diffs.mean()), diffs.size
    std = float(diffs.std(ddof=1)) if seeds > 1 else 0.0
    out = dict(values=diffs.tolist(), mean=mean, std=std, seeds=seeds, positive=int((diffs > 0).sum()),
               interval=None, verdict='tie', seeds_for_resolution=seeds_to_separate(std))
    if seeds > 1:
        half = t_quantile(seeds) * std / np.sqrt(seeds)
        low, high = mean - half, mean + half
        out['interval'] = [low, high]
        out['verdict'] = 'better' if low > 0 else 'worse' if high < 0 else 'tie'
    return out


def paired_differences(rows, key='nds', reference=None):
    """Per row, the rule (``compare``) on its per-seed ``key`` differences against every baseline of the table
    (``BASELINES``, the row itself left out), keyed by the baseline's key, against the best baseline by mean
    (``best_baseline``) and, in an ablation table, against its ``reference`` row (the current default, key
    ``reference``); each entry names its baseline in ``against``."""
    by_key = {r['key']: r for r in rows}
    baselines = [by_key[k] for k in BASELINES if k in by_key]
    out = {}
    for row in rows:
        others = [b for b in baselines if b['key'] != row['key']]
        against = {b['key']: b for b in others}
        if others:
            against['best_baseline'] = max(others, key=lambda b: b[key]['mean'])
        if reference in by_key and row['key'] not in (reference, *BASELINES, 'alone'):
            against['reference'] = by_key[reference]
        out[row['key']] = {
            name: dict(compare([a - b for a, b in zip(row[key]['values'], other[key]['values'])]),
                       against=other['key'])
            for name, other in against.items()}
    return out


def verdict_text(diff):
    """'+0.0123 [-0.0040, +0.0286] 5/8 > 0: tie' (the interval only with two seeds or more)."""
    interval = ' [{:+.4f}, {:+.4f}]'.format(*diff['interval']) if diff.get('interval') else ''
    return f"{diff['mean']:+.4f}{interval} {diff['positive']}/{diff['seeds']} > 0: {diff.get('verdict', 'tie')}"


def _stats(values):
    v = np.asarray(values, np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0, values=v.tolist())


def expert_score(expert):
    path = os.path.join(expert, 'metrics_summary.json')
    if not os.path.exists(path):
        path = os.path.join(expert, 'eval', 'metrics_summary.json')   # a training workdir
    if not os.path.exists(path):
        return None
    with open(path) as f:
        s = json.load(f)
    return dict(nds=s['nd_score'], map=s['mean_ap'])


def _pm(stats):
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}" if len(stats['values']) > 1 else f"{stats['mean']:.4f}"


def markdown(result):
    lines = [f"**{result['title']}** — {result['steps']} steps, seeds {result['seeds']}, "
             f"{result['dataset']} ({result['machine']})", '',
             '| row | NDS | mAP | ΔNDS | ΔmAP | min/run | ΔNDS vs head only, paired | ΔNDS vs best baseline, paired |',
             '|---|---|---|---|---|---|---|---|']
    e = result['expert']
    if e:
        lines.append(f"| expert ({os.path.basename(result['expert_path'])}) | {e['nds']:.4f} | {e['map']:.4f} "
                     f"| | | | | |")
    e = result.get('expert_input')
    if e:
        lines.append(f"| expert on the distillation input | {e['nds']:.4f} | {e['map']:.4f} | | | | | |")
    base = result['rows'][0]
    reference = result.get('reference')
    paired = paired_differences(result['rows'], reference=reference)   # recomputed: older files have none

    def per_seed(diff):
        if not diff:
            return ''
        values = ' / '.join(f'{v:+.4f}' for v in diff['values'])
        return f"{verdict_text(diff)} ({values}; vs {diff['against']})"

    for r in result['rows']:
        dn, dm = r['nds']['mean'] - base['nds']['mean'], r['map']['mean'] - base['map']['mean']
        wall = [c['wall_s'] for c in r['cells'] if c['wall_s']]
        minutes = f'{np.mean(wall) / 60:.1f}' if wall else ''
        diffs = paired.get(r['key'], {})
        lines.append(f"| {r['label']} | {_pm(r['nds'])} | {_pm(r['map'])} | {dn:+.4f} | {dm:+.4f} | {minutes} | "
                     f"{per_seed(diffs.get('head'))} | {per_seed(diffs.get('best_baseline'))} |")
    lines += decisions(result['rows'], paired, reference)
    identities = sorted({(c.get('behaviour_hash', '')[:10], c.get('code_hash', '')[:10],
                          c.get('expert_hash', '')[:10], str(c.get('commit'))) for r in result['rows'] for c in r['cells']})
    lines += ['', 'Cells (behaviour hash, code hash, expert hash, commit): ' + '; '.join(', '.join(i) for i in identities)]
    sources = sorted({os.path.basename(c['reused_from']) for r in result['rows'] for c in r['cells'] if 'reused_from' in c})
    if sources:
        lines += ['', f"Some cells are the recorded runs of {', '.join(sources)} (same config, steps and expert)."]
    twins = sorted({(r['key'], c['same_as'].split(os.sep)[1]) for r in result['rows'] for c in r['cells'] if 'same_as' in c})
    if twins:
        lines += ['', 'Cells that are the runs of another row of the same behaviour (equal overrides in effect): ' +
                  '; '.join(f'{row} = {other}' for row, other in twins) + '.']
    return '\n'.join(lines) + '\n'


def decisions(rows, paired, reference=None):
    """Markdown lines: the rule's verdict for every row that is not a baseline against each baseline and against
    the table's ``reference`` row (an ablation's current default: a choice replaces it only when separated), and
    for each baseline against head only (docs/experiments.md, "The decision rule")."""
    baselines = [k for k in BASELINES if any(r['key'] == k for r in rows)]
    lines = []
    for row in rows:
        against = baselines if row['key'] not in BASELINES else [k for k in ('head',) if k != row['key']]
        if 'reference' in paired.get(row['key'], {}):
            against = [*against, 'reference']
        for other in against:
            diff = paired.get(row['key'], {}).get(other)
            if diff and row['key'] != 'alone':
                name = f'{reference} (the default)' if other == 'reference' else other
                lines.append(f"| {row['key']} | {name} | {verdict_text(diff)} | "
                             f"{diff['seeds_for_resolution'] or '–'} |")
    if not lines:
        return []
    return ['', f'Decisions (ΔNDS per seed, paired; {CONFIDENCE:.0%} t-interval; separated when it excludes 0):', '',
            f'| row | against | ΔNDS [interval] sign count: verdict | seeds for ±{RESOLUTION} at this spread |',
            '|---|---|---|---|'] + lines


def plot(result, path):
    rows = result['rows']
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(rows), 3.6))
    x = np.arange(len(rows))
    for ax, key, name in ((axes[0], 'nds', 'NDS'), (axes[1], 'map', 'mAP')):
        ax.bar(x, [r[key]['mean'] for r in rows], yerr=[r[key]['std'] for r in rows], capsize=3,
               color=['0.6'] + ['C0'] * (len(rows) - 1))
        for i, r in enumerate(rows):
            ax.plot([i] * len(r[key]['values']), r[key]['values'], 'k.', ms=4)
        if result['expert']:
            ax.axhline(result['expert'][key], color='C3', ls='--', label='expert')
            ax.legend(loc='lower right', fontsize=7)
        ax.set_xticks(x, [r['key'] for r in rows], rotation=30, ha='right', fontsize=8)
        ax.set_ylabel(name)
    fig.suptitle(result['title'], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recorded_cells(paths, table, steps, expert):
    """{(row key, seed, overrides, behaviour hash, expert hash, splits): cell} from earlier result files of the same
    table config, step count and expert (e.g. when their run folders are gone); each cell names the file it came
    from. A cell stands in only for a run of the same behaviour (``behaviour``) and expert parameters: cells
    recorded without them are never reused."""
    cells = {}
    for path in paths or ():
        with open(path) as f:
            r = json.load(f)
        if (r['config'], r['steps'], os.path.basename(r['expert_path'])) != (table['config'], steps, os.path.basename(expert)):
            raise TableError(f'{path} holds another table (config {r["config"]}, {r["steps"]} steps, expert '
                             f'{r["expert_path"]}), not {table["config"]}, {steps} steps, {expert}')
        for row in r['rows']:
            for index, cell in enumerate(row['cells']):
                seed = cell.get('seed', r['seeds'][index] if index < len(r['seeds']) else None)   # older files: in order
                if 'behaviour_hash' in cell and 'expert_hash' in cell:
                    key = (row['key'], seed, json.dumps(row['overrides'], sort_keys=True), cell['behaviour_hash'],
                           cell['expert_hash'], tuple(r.get('splits') or ()))
                    cells[key] = dict(cell, reused_from=path)
    return cells


def _argv(workdir):
    """The command line recorded in a run folder's run.json, or None."""
    path = os.path.join(workdir, 'run.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)['argv']


def finished_twin(workdir):
    """A finished run folder of another row of the same table folder with this cell's name (same steps, seed,
    behaviour, expert and split: the same numbers), or None."""
    rows_dir, cell_name = os.path.dirname(os.path.dirname(workdir)), os.path.basename(workdir)
    twins = sorted(glob.glob(os.path.join(rows_dir, '*', cell_name, 'eval', 'metrics_summary.json')))
    twins = [os.path.dirname(os.path.dirname(t)) for t in twins]
    return next((t for t in twins if os.path.exists(os.path.join(t, 'run.json'))), None)


def _header(name, table, seeds, steps, dataroot, expert, splits):
    """What a result file (whole or partial) says of its table: name, config, expert, set, seeds, steps, splits."""
    return dict(table=name, title=table['title'], config=table['config'], expert_path=expert,
                dataset=f'{os.path.basename(dataroot)} ({dataset_split(dataroot)[0]})', seeds=list(seeds), steps=steps,
                splits=list(splits) if splits else None, reference=table.get('reference'))


def write_partial(path, header, rows, finished):
    """``NAME.partial.json``: the cells finished so far (each with its ``seed``), in the result file's layout, so that
    an interrupted table leaves its evidence: pass it to ``--reuse`` (its run folders gone) to finish the table."""
    partial = dict(header, complete=False, rows=[dict(key=key, label=label, overrides=overrides,
                                                      cells=finished.get(key, [])) for key, label, overrides in rows])
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(partial, f, indent=1)
    os.replace(path + '.tmp', path)


def run_table(name, table, seeds, steps, dataroot, expert, runs, out_dir, row_keys=None, reuse=(), log=print,
              splits=None, jobs=1):
    """Runs (or reuses) every row x seed in ``runs/<table folder>/<row>/steps<N>_seed<S>_<code>_<expert>[_<split>]``
    (the hashes of ``cell_identity``: other code or another expert is another folder) and writes
    ``out_dir/NAME.{json,md,png}``; returns the result dict with the per-seed ``paired`` differences.
    ``reuse``: earlier result files whose cells stand in for run folders that hold no finished run.
    ``splits``: (train, val) split names, e.g. the tuning splits of ``carve_tune_splits``. ``jobs``: training
    runs at a time (a machine with many cores or an accelerator; each run's lines are prefixed with its cell)."""
    recorded = recorded_cells(reuse, table, steps, expert)
    identity = cell_identity(expert)
    split_tag = f'_{splits[1]}' if splits else ''
    tag = f"{identity['code_hash'][:8]}_{identity['expert_hash'][:8]}" + split_tag
    rows = [r for r in table['rows'] if not row_keys or r[0] in row_keys]
    if row_keys and len(rows) != len(row_keys):
        known = ', '.join(r[0] for r in table['rows'])
        raise TableError(f'unknown rows {sorted(set(row_keys) - {r[0] for r in rows})} (rows: {known})')
    fingerprints = os.path.join(runs, table.get('folder', name), 'fingerprints')
    partial_path, partial_lock, finished_cells = os.path.join(out_dir, f'{name}.partial.json'), threading.Lock(), {}
    header = _header(name, table, seeds, steps, dataroot, expert, splits)

    def cell(key, label, overrides, seed, cell_log):
        cell_log(f'{name}: {label}, seed {seed}')
        found = behaviour(table, overrides, steps, dataroot, expert, splits, fingerprints, identity, cell_log)
        workdir = os.path.join(runs, table.get('folder', name), key,
                               f"steps{steps}_seed{seed}_b{found[:8]}_{identity['expert_hash'][:8]}{split_tag}")
        old = recorded.get((key, seed, json.dumps(overrides, sort_keys=True), found, identity['expert_hash'],
                            tuple(splits or ())))
        command = run_command(table, overrides, seed, steps, dataroot, expert, workdir, splits)
        finished = os.path.exists(os.path.join(workdir, 'eval', 'metrics_summary.json'))
        twin = finished_twin(workdir) if not finished else workdir if _argv(workdir) not in (None, command[1:]) else None
        if old and not finished:
            cell_log(f'  recorded in {old["reused_from"]}')
            done = old
        elif twin:   # a finished run of the same behaviour under another command line (a row of another table with
            # the default written out, or another row): its run is this cell
            cell_log(f'  the same behaviour as {twin}: reused')
            done = dict(run_cell([sys.executable, *_argv(twin)], twin, dict(identity, behaviour_hash=found), cell_log),
                        same_as=os.path.relpath(twin, runs))
        else:
            done = run_cell(command, workdir, dict(identity, behaviour_hash=found), cell_log)
        cell_log(f'  NDS {done["nds"]:.4f}  mAP {done["map"]:.4f}')
        done = dict(done, seed=seed)
        with partial_lock:   # every finished cell is kept in NAME.partial.json until the table is written
            finished_cells.setdefault(key, []).append(done)
            write_partial(partial_path, header, rows, finished_cells)
        return done

    expert_dir = os.path.join(runs, table.get('folder', name), 'expert_input', tag)

    def expert_cell(cell_log):
        cell_log(f'{name}: the expert on the distillation input')
        return run_cell(expert_command(table, dataroot, expert, expert_dir, splits), expert_dir, identity, cell_log)

    plan = [(row, seed) for row in rows for seed in seeds]
    if jobs > 1:   # the expert's evaluation is one more job of the pool
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            expert_future = pool.submit(expert_cell, lambda line: log(f'[expert] {line}'))
            futures = [pool.submit(cell, *row, seed, lambda line, tag=f'[{row[0]} {seed}]': log(f'{tag} {line}'))
                       for row, seed in plan]
            done = [future.result() for future in futures]
            expert_input = expert_future.result()
    else:
        expert_input = expert_cell(log)
        done = [cell(*row, seed, log) for row, seed in plan]
    results = []
    for index, (key, label, overrides) in enumerate(rows):
        cells = done[index * len(seeds):(index + 1) * len(seeds)]
        results.append(dict(key=key, label=label, overrides=overrides, cells=cells,
                            nds=_stats([c['nds'] for c in cells]), map=_stats([c['map'] for c in cells])))
    m = machine_info()
    result = dict(header, expert=expert_score(expert),
                  expert_input=dict(nds=expert_input['nds'], map=expert_input['map']),
                  machine=f"{m['cpu_count']}-core {m['backend']}, {m['date']}", versions=m['versions'], rows=results,
                  paired=paired_differences(results, reference=table.get('reference')))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
        json.dump(result, f, indent=1)
    if os.path.exists(partial_path):
        os.remove(partial_path)
    with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
        f.write(markdown(result))
    plot(result, os.path.join(out_dir, f'{name}.png'))
    return result


def render(path):
    """Rewrites ``NAME.md`` and ``NAME.png`` beside the result file ``NAME.json`` from its cells (the paired
    differences and decisions recomputed by today's rule; the cells and the JSON are left as they are)."""
    try:
        with open(path) as f:
            result = json.load(f)
        stem = path[:-len('.json')] if path.endswith('.json') else path
        text = markdown(result)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f'error: {path}: not a result file of this script ({e})')
    with open(stem + '.md', 'w') as f:
        f.write(text)
    plot(result, stem + '.png')
    print(f'wrote {stem}.md, .png')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--table', choices=sorted(TABLES), default='table1')
    p.add_argument('--rows', nargs='*', help='row keys (default: all)')
    p.add_argument('--seeds', nargs='*', type=int, default=[0, 1, 2])
    p.add_argument('--steps', type=int, default=0, help='training steps per run (0: the config\'s)')
    p.add_argument('--short', action='store_true', help=f'the main job: rows {SHORT["rows"]}, seed 0, '
                   f'{SHORT["steps"]} steps, written as NAME_short')
    p.add_argument('--dataroot', default='data/synthetic40')
    p.add_argument('--expert', help='expert folder or workdir (default: the table\'s committed expert)')
    p.add_argument('--runs', default='runs/tables', help='training runs (reused when finished)')
    p.add_argument('--out', default=os.path.join('experiments', 'results'))
    p.add_argument('--name', help='result name (default: the table name)')
    p.add_argument('--reuse', nargs='*', default=[], help='earlier result JSON files whose cells stand in for '
                   'runs that are not in --runs (same config, steps, code and expert)')
    p.add_argument('--split', choices=('val', 'tune'), default='val',
                   help='val: train on the training split, report on val; tune: train on tune_train and report on '
                        'tune_val, both carved from the training scenes (for choosing weights; never tune on val)')
    p.add_argument('--jobs', type=int, default=1, help='training runs at a time (default 1)')
    p.add_argument('--render', nargs='+', metavar='JSON', help='rewrite the .md and .png of these result files '
                   'with the current decision rule (no run)')
    args = p.parse_args()
    if args.render:
        for path in args.render:
            render(path)
        return
    table = dict(TABLES[args.table])
    table.setdefault('folder', args.table)   # the short table reuses the full table's runs
    rows, seeds, steps, name = args.rows, args.seeds, args.steps, args.name or args.table
    if args.short:
        rows, seeds, steps, name = list(SHORT['rows']), list(SHORT['seeds']), args.steps or SHORT['steps'], \
            args.name or f'{args.table}_short'
    if not steps:   # the config's own count, so that cells and recorded results name it
        steps = int(load_config(table['config'])[1].train.num_steps)
    expert = os.path.abspath(args.expert or os.path.join(REPO, table['expert']))
    dataroot = os.path.abspath(args.dataroot)
    try:
        if not os.path.isdir(expert):
            raise TableError(f'expert {expert} not found: train and export one (make expert) or pass --expert')
        splits = carve_tune_splits(dataroot) if args.split == 'tune' else None
        if splits:
            name = args.name or f'{name}_tune'
        result = run_table(name, table, seeds, steps, dataroot, expert, os.path.abspath(args.runs), args.out, rows,
                           args.reuse, splits=splits, jobs=args.jobs)
    except TableError as e:
        sys.exit(f'error: {e}')
    print()
    print(markdown(result))
    print(f'wrote {args.out}/{name}.json, .md, .png')


if __name__ == '__main__':
    main()
