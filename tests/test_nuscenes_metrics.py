import json
import os
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest

from fd3d_jax import nuscenes_metrics, storage
from fd3d_jax.data import geometry
from fd3d_jax.data.records import split_scene_names
from fd3d_jax.errors import RecordsError
from fd3d_jax.data.nuscenes_meta import CLASS_NAMES, SUBMISSION_META
from fd3d_jax.train import loop
from tests.fake_gcs import fake_gcs


def test_boxes_to_results_known_transform():
    """LiDAR (x right, y forward) at (1, 0, 2) in an ego that sits at (100, 50) heading +y."""
    rec = dict(token='t', lidar2ego=geometry.make_transform(geometry.yaw_to_quat(-np.pi / 2), [1.0, 0.0, 2.0]).tolist(),
               ego2global=geometry.make_transform(geometry.yaw_to_quat(np.pi / 2), [100.0, 50.0, 0.0]).tolist())
    box = np.array([[0.0, 10.0, -1.0, 2.0, 4.0, 1.5, np.pi / 2, 0.0, 5.0]])  # 10 m ahead, heading forward
    out = nuscenes_metrics.boxes_to_results(rec, box, [0.7], [0], CLASS_NAMES)[0]
    # ego frame: (11, 0, 1), heading 0 -> global: (100, 61, 1), heading +y
    np.testing.assert_allclose(out['translation'], [100.0, 61.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(out['velocity'], [0.0, 5.0], atol=1e-9)
    np.testing.assert_allclose(out['rotation'], geometry.yaw_to_quat(np.pi / 2), atol=1e-9)
    assert out['size'] == [2.0, 4.0, 1.5] and out['detection_name'] == 'car'
    assert out['detection_score'] == 0.7 and out['attribute_name'] == 'vehicle.moving'
    far = box.copy()
    far[0, 1] = 60.0  # beyond the car class range (50 m from the ego): dropped like mmdet3d does
    assert nuscenes_metrics.boxes_to_results(rec, far, [0.7], [0], CLASS_NAMES) == []


def test_default_attribute_rules():
    assert nuscenes_metrics.default_attribute('car', [0.1, 0.0]) == 'vehicle.parked'
    assert nuscenes_metrics.default_attribute('bus', [0.0, 0.0]) == 'vehicle.stopped'
    assert nuscenes_metrics.default_attribute('pedestrian', [0.0, 0.0]) == 'pedestrian.standing'
    assert nuscenes_metrics.default_attribute('bicycle', [1.0, 0.0]) == 'cycle.with_rider'
    assert nuscenes_metrics.default_attribute('traffic_cone', [1.0, 0.0]) == ''


def _evaluate(val_records, detections, tmp_path, name):
    path = tmp_path / name / 'results.json'
    nuscenes_metrics.write_results(nuscenes_metrics.results_json(val_records, detections), str(path))
    return nuscenes_metrics.run_detection_eval(str(path), val_records['dataroot'], 'v1.0-mini', 'mini_val', str(path.parent))


def test_gt_as_predictions_scores_perfectly_and_shifted_lower(val_records, tmp_path):
    gt = nuscenes_metrics.gt_as_detections(val_records, CLASS_NAMES)
    summary = _evaluate(val_records, gt, tmp_path, 'gt')
    assert summary['nd_score'] >= 0.99 and summary['mean_ap'] >= 0.99
    assert os.path.exists(tmp_path / 'gt' / 'metrics_summary.json')
    shifted = {t: [dict(d, translation=(np.asarray(d['translation']) + [1.0, 0.0, 0.0]).tolist()) for d in dets]
               for t, dets in gt.items()}
    worse = _evaluate(val_records, shifted, tmp_path, 'shifted')
    assert worse['nd_score'] < summary['nd_score'] - 0.1
    assert worse['tp_errors']['trans_err'] == pytest.approx(1.0, abs=1e-6)
    table = nuscenes_metrics.format_metrics(summary)
    assert '| 1.0000 | 1.0000 |' in table and '| traffic_cone |' in table


def test_eval_cli(val_records, tmp_path):
    results = tmp_path / 'r.json'
    nuscenes_metrics.write_results(nuscenes_metrics.results_json(val_records, nuscenes_metrics.gt_as_detections(val_records, CLASS_NAMES)),
                           str(results))
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'fd3d_jax.eval', f'--results={results}', f"--dataroot={val_records['dataroot']}",
           '--version=v1.0-mini', '--split=mini_val', f'--out={out}']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / 'metrics_summary.json').read_text())['nd_score'] >= 0.99
    proc = subprocess.run(cmd[:-2] + ['--split=nope', f'--out={out}'], capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown split 'nope'" in proc.stderr


def test_a_split_without_annotations_gets_the_submission_file_only(val_records, data_cfg, tmp_path, monkeypatch):
    """nuScenes ``test`` has no annotations: evaluation writes ``results.json`` (meta and an entry for every sample,
    the evaluation server's format) and does not run DetectionEval; with annotations it does."""
    bare = dict(val_records, samples=[dict(r, gt_names=[], gt_boxes=[]) for r in val_records['samples']])
    assert nuscenes_metrics.has_annotations(val_records) and not nuscenes_metrics.has_annotations(bare)
    calls = []
    monkeypatch.setattr(nuscenes_metrics, 'run_detection_eval', lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(nuscenes_metrics, 'format_metrics', lambda summary: '')
    monkeypatch.setattr(loop, 'predict', lambda trainer, params, recs, log=None: {recs['samples'][0]['token']: []})
    meta = dict(SUBMISSION_META, use_external=True)   # as the BEVFormer configs declare
    trainer = types.SimpleNamespace(config=ml_collections.ConfigDict(dict(data=data_cfg, submission=meta)))
    for recs, out in ((bare, tmp_path / 'test'), (val_records, tmp_path / 'val')):
        monkeypatch.setattr(loop, 'load_split', lambda config, split, recs=recs: recs)
        summary = loop.evaluate_params(trainer, None, str(out), log=lambda *a: None)
        with open(out / 'results.json') as f:
            written = json.load(f)
        assert set(written['results']) == {r['token'] for r in recs['samples']}
        assert written['meta'] == meta   # config.submission, not a hard-coded meta
        assert (summary is None) == (recs is bare)
    assert len(calls) == 1


def test_evaluation_into_a_bucket_runs_the_devkit_locally_and_copies_its_files(val_records, data_cfg, tmp_path,
                                                                              monkeypatch):
    """``W/eval`` at a URL: the devkit (local files only) evaluates in a local temporary folder, whose files
    (``results.json``, ``metrics_summary.json``, ...) then appear under the URL; a split without annotations gets
    its submission file there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, 'predict', lambda trainer, params, recs, log=None: (
        nuscenes_metrics.gt_as_detections(recs, CLASS_NAMES) if nuscenes_metrics.has_annotations(recs) else {}))
    bare = dict(val_records, samples=[dict(r, gt_names=[], gt_boxes=[]) for r in val_records['samples']])
    trainer = types.SimpleNamespace(config=ml_collections.ConfigDict(dict(data=data_cfg)))   # a run without the key
    with fake_gcs(tmp_path / 'bucket'):
        monkeypatch.setattr(loop, 'load_split', lambda config, split: val_records)
        summary = loop.evaluate_params(trainer, None, 'gs://b/run/eval', log=lambda *a: None)
        assert summary['nd_score'] >= 0.99
        eval_dir = storage.as_path('gs://b/run/eval')
        assert json.loads((eval_dir / 'metrics_summary.json').read_text()) == summary
        assert set(json.loads((eval_dir / 'results.json').read_text())['results']) == {
            r['token'] for r in val_records['samples']}
        monkeypatch.setattr(loop, 'load_split', lambda config, split: bare)
        assert loop.evaluate_params(trainer, None, 'gs://b/test/eval', log=lambda *a: None) is None
        assert storage.as_path('gs://b/test/eval/results.json').exists()
    assert {'results.json', 'metrics_summary.json', 'metrics_details.json'} <= set(
        os.listdir(tmp_path / 'bucket' / 'b' / 'run' / 'eval'))
    assert not os.path.exists(tmp_path / 'gs:')


def test_union_splits_for_final_models(data_cfg):
    """``A+B`` (``train+val`` on v1.0-trainval) is every scene of both (the schedule of final models)."""
    nusc = types.SimpleNamespace(version=data_cfg.version, dataroot=data_cfg.dataroot)
    train, val = data_cfg.train_split, data_cfg.val_split
    both = split_scene_names(nusc, f'{train}+{val}')
    assert both == split_scene_names(nusc, train) + split_scene_names(nusc, val) and len(set(both)) == len(both)
    with pytest.raises(RecordsError, match="split 'train' needs a version ending in 'trainval'"):
        split_scene_names(nusc, f'{train}+train')
