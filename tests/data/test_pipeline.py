import logging
import os
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from fd3d_jax import nuscenes_metrics
from fd3d_jax.data import geometry, pipeline
from fd3d_jax.data import records as records_lib
from tests.conftest import SYNTH_IMAGE_WH
from tests.data.tables import copy_images, copy_set, drop_annotations, set_splits


def _batches(records, cfg, n, seed=0, batch_size=2):
    it = iter(pipeline.train_dataset(records, cfg.dataroot, cfg, batch_size=batch_size, seed=seed))
    return it, [next(it) for _ in range(n)]


def test_batch_shapes_dtypes_and_determinism(train_records, data_cfg):
    _, first = _batches(train_records, data_cfg, 2)
    _, again = _batches(train_records, data_cfg, 2)
    t, n, g = data_cfg.queue_length, 6, data_cfg.max_gt
    h, w = pipeline.output_image_hw(train_records, data_cfg)
    assert (h, w) == (64, 96)  # 160x90 * 0.5 = 80x45 -> padded to /32
    expected = dict(img=((2, t, n, h, w, 3), np.float32), lidar2img=((2, t, n, 4, 4), np.float32),
                    can_bus=((2, t, 18), np.float32), prev_bev_exists=((2, t), np.bool_),
                    gt_boxes=((2, g, 9), np.float32), gt_labels=((2, g), np.int32), gt_mask=((2, g), np.bool_),
                    sample_idx=((2,), np.int32), valid=((2,), np.bool_))
    for batch_a, batch_b in zip(first, again):
        assert set(batch_a) == set(expected)
        for key, (shape, dtype) in expected.items():
            assert batch_a[key].shape == shape and batch_a[key].dtype == dtype, key
            np.testing.assert_array_equal(batch_a[key], batch_b[key])
    assert not np.array_equal(first[0]['sample_idx'], first[1]['sample_idx'])
    _, other_seed = _batches(train_records, data_cfg, 2, seed=1)
    assert any(not np.array_equal(a['sample_idx'], b['sample_idx']) for a, b in zip(first, other_seed))


def test_restored_iterator_continues_with_the_next_batch(train_records, data_cfg):
    it, _ = _batches(train_records, data_cfg, 3)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = iter(pipeline.train_dataset(train_records, data_cfg.dataroot, data_cfg, batch_size=2, seed=0))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_images_and_lidar2img_follow_the_mmdet3d_transforms(train_records, data_cfg):
    rec = train_records['samples'][3]
    out_hw = pipeline.output_image_hw(train_records, data_cfg)
    imgs, l2i = pipeline.load_frame(rec, data_cfg.dataroot, data_cfg, out_hw)
    cam = rec['cams'][1]
    raw = np.asarray(Image.open(os.path.join(data_cfg.dataroot, cam['path'])).convert('RGB'), np.float32)
    norm = (raw - np.array(data_cfg.image_mean, np.float32)) / np.array(data_cfg.image_std, np.float32)
    small = cv2.resize(norm, (80, 45), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(imgs[1, :45, :80], small, atol=1e-5)
    assert (imgs[1, 45:] == 0).all() and (imgs[1, :, 80:] == 0).all()  # padding after normalisation
    want = np.diag([0.5, 0.5, 1, 1]) @ geometry.view_pad(np.asarray(cam['intrinsic'])) @ \
        np.linalg.inv(np.asarray(cam['sensor2lidar']))
    np.testing.assert_allclose(l2i[1], want, rtol=1e-5, atol=1e-4)
    # BGR caffe normalisation flips the channels
    cfg = data_config_copy(data_cfg, to_rgb=False, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), image_scale=1.0)
    bgr, _ = pipeline.load_frame(rec, cfg.dataroot, cfg, pipeline.output_image_hw(train_records, cfg))
    np.testing.assert_allclose(bgr[1, :90, :160], raw[..., ::-1])


def data_config_copy(cfg, **overrides):
    cfg = cfg.copy_and_resolve_references()
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def test_ground_truth_filters_and_pads(train_records, data_cfg):
    rec = train_records['samples'][0]
    boxes, labels, mask = pipeline.ground_truth(rec, data_cfg)
    raw = np.asarray(rec['gt_boxes'])
    keep = [i for i, name in enumerate(rec['gt_names'])
            if rec['valid_flag'][i] and abs(raw[i, 0]) < 51.2 and abs(raw[i, 1]) < 51.2]
    assert mask.sum() == len(keep) and (labels[mask] >= 0).all() and (labels[~mask] == -1).all()
    np.testing.assert_allclose(boxes[:len(keep), :7], raw[keep], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(boxes[:len(keep), 7:], np.asarray(rec['gt_velocity'])[keep], rtol=1e-6, atol=1e-5)
    assert (boxes[~mask] == 0).all()
    small = data_config_copy(data_cfg, max_gt=3)
    with pytest.raises(pipeline.DataError, match=f"sample {rec['token']}.*data.max_gt=3"):
        pipeline.ground_truth(rec, small)
    only_cars = data_config_copy(data_cfg, class_names=('car',))
    _, labels, mask = pipeline.ground_truth(rec, only_cars)
    assert mask.sum() == sum(rec['gt_names'][i] == 'car' for i in keep) and (labels[mask] == 0).all()


def test_train_queue_follows_bevformer():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        idx = pipeline.train_queue_indices(10, 3, rng)
        assert len(idx) == 3 and idx[-1] == 10 and idx[0] < idx[1] < 10 and set(idx[:2]) <= {7, 8, 9}
        seen.add(tuple(idx))
    assert seen == {(7, 8, 10), (7, 9, 10), (8, 9, 10)}
    assert pipeline.train_queue_indices(1, 3, rng)[:2] == [0, 0]  # negative indices clamp to 0


def test_queue_can_bus_deltas_restart_at_scene_changes():
    def rec(scene, x, yaw_deg):
        cb = np.zeros(18)
        cb[0], cb[16], cb[17] = x, np.radians(yaw_deg), yaw_deg
        return dict(scene_token=scene, can_bus=cb.tolist())
    samples = [rec('a', 0.0, 10.0), rec('a', 2.0, 12.0), rec('b', 100.0, 90.0), rec('b', 103.0, 91.0)]
    can_bus, exists = pipeline._queue_can_bus(samples, [0, 1, 2, 3])
    np.testing.assert_array_equal(exists, [False, True, False, True])
    np.testing.assert_allclose(can_bus[:, 0], [0.0, 2.0, 0.0, 3.0])
    np.testing.assert_allclose(can_bus[:, 17], [0.0, 2.0, 0.0, 1.0])
    np.testing.assert_allclose(can_bus[:, 16], np.radians([10.0, 12.0, 90.0, 91.0]), rtol=1e-6)


def test_eval_streams_and_padding(val_records, train_records, data_cfg):
    both = dict(val_records, samples=train_records['samples'] + val_records['samples'])
    streams = pipeline.eval_streams(both, 3)
    flat = sorted(i for s in streams for i in s)
    assert flat == list(range(len(both['samples'])))
    for s in streams:  # whole scenes, each in time order
        for a, b in zip(s[:-1], s[1:]):
            assert b == a + 1 or both['samples'][b]['frame_idx'] == 0
    steps = max(len(s) for s in streams)
    batches = list(pipeline.eval_dataset(both, data_cfg.dataroot, data_cfg, batch_size=2, shard_index=0, shard_count=2))
    other = list(pipeline.eval_dataset(both, data_cfg.dataroot, data_cfg, batch_size=2, shard_index=1, shard_count=2))
    assert len(batches) == len(other) == steps
    valid = [(b['sample_idx'][j], b['prev_bev_exists'][j, 0]) for b in batches + other for j in range(2) if b['valid'][j]]
    assert sorted(v[0] for v in valid) == list(range(len(both['samples'])))
    first_frames = {i for i, r in enumerate(both['samples']) if r['frame_idx'] == 0}
    assert all(exists == (idx not in first_frames) for idx, exists in valid)
    b = batches[0]
    assert b['img'].shape[:2] == (2, 1) and b['can_bus'].shape == (2, 1, 18)
    assert (b['can_bus'][:, 0, :3] == 0).all()  # first frames: no ego-motion delta


def test_missing_and_corrupt_images_name_the_file_and_sample(train_records, data_cfg, tmp_path):
    rec = train_records['samples'][0]
    root = tmp_path / 'broken'
    shutil.copytree(os.path.join(data_cfg.dataroot, 'samples'), root / 'samples')
    cfg = data_config_copy(data_cfg, dataroot=str(root))
    out_hw = pipeline.output_image_hw(train_records, cfg)
    path = root / rec['cams'][2]['path']
    os.remove(path)
    with pytest.raises(pipeline.DataError, match=f"image not found: {path} \\(sample {rec['token']}\\)"):
        pipeline.load_frame(rec, cfg.dataroot, cfg, out_hw)
    good = open(os.path.join(data_cfg.dataroot, rec['cams'][2]['path']), 'rb').read()
    path.write_bytes(good[:len(good) // 3])
    with pytest.raises(pipeline.DataError, match=f"cannot decode image {path} \\(sample {rec['token']}\\)"):
        pipeline.load_frame(rec, cfg.dataroot, cfg, out_hw)
    path.write_bytes(b'not a jpeg')
    with pytest.raises(pipeline.DataError, match=f'cannot decode image {path}'):
        pipeline.load_frame(rec, cfg.dataroot, cfg, out_hw)
    assert SYNTH_IMAGE_WH == (rec['cams'][2]['width'], rec['cams'][2]['height'])


def test_train_shards_are_slices_of_one_global_batch(train_records, data_cfg):
    """Two processes with 2 samples each see exactly the 4-sample batches of one process (images with
    their photometric distortion included), and their iterators are at the same position."""
    cfg = data_config_copy(data_cfg, queue_length=1, filter_empty_gt=False, photometric=True)
    n = len(train_records['samples'])

    def batches(batch_size, shard=0, count=1, steps=n // 4 + 1):
        it = iter(pipeline.train_dataset(train_records, cfg.dataroot, cfg, batch_size=batch_size, seed=0,
                                         shard_index=shard, shard_count=count))
        return [next(it) for _ in range(steps)], it.get_state()

    whole, state = batches(4)
    shards = [batches(2, p, 2) for p in range(2)]
    assert shards[0][1] == shards[1][1] == state
    for t, b in enumerate(whole):
        for key in b:
            np.testing.assert_array_equal(np.concatenate([shards[0][0][t][key], shards[1][0][t][key]]), b[key])
    first_epoch = [int(i) for b in whole for i in b['sample_idx']][:n]
    assert sorted(first_epoch) == list(range(n))   # one epoch covers the split once


def _gt_record(boxes, names=None, token='sample-tok'):
    n = len(boxes)
    return dict(token=token, gt_boxes=boxes, gt_velocity=[[1.0, -1.0]] * n, gt_names=names or ['car'] * n,
                valid_flag=[True] * n)


def test_ground_truth_drops_boxes_outside_the_point_cloud_range(data_cfg):
    """mmdet3d's ObjectRangeFilter: centres strictly inside the BEV range are kept (z is not filtered)."""
    x0, y0, _, x1, y1, _ = data_cfg.point_cloud_range
    size = [2.0, 4.0, 1.5, 0.3]
    boxes = [[0.0, 0.0, 0.0, *size], [x1 + 1.0, 0.0, 0.0, *size], [0.0, y0 - 5.0, 0.0, *size],
             [x1 - 0.1, y0 + 0.1, 0.0, *size], [x1, 0.0, 0.0, *size], [0.0, 0.0, 100.0, *size],
             [x0 - 0.01, y1 - 1.0, 0.0, *size]]
    names = ['car', 'car', 'truck', 'pedestrian', 'car', 'barrier', 'car']
    out, labels, mask = pipeline.ground_truth(_gt_record(boxes, names), data_cfg)
    kept = [0, 3, 5]
    assert mask.tolist() == [True] * len(kept) + [False] * (data_cfg.max_gt - len(kept))
    np.testing.assert_allclose(out[:3, :7], np.asarray(boxes, np.float32)[kept])
    np.testing.assert_allclose(out[:3, 7:], [[1.0, -1.0]] * 3)
    assert labels[:3].tolist() == [data_cfg.class_names.index(names[i]) for i in kept]
    assert (out[3:] == 0).all() and (labels[3:] == -1).all()
    _, _, mask = pipeline.ground_truth(_gt_record(boxes[1:3]), data_cfg)
    assert not mask.any()


@pytest.mark.parametrize('column,value', [(0, float('nan')), (2, float('inf')), (3, 0.0), (5, -1.0),
                                          (6, float('nan'))])
def test_invalid_gt_boxes_name_the_sample_and_annotation(data_cfg, column, value):
    """Non-finite centre/size/yaw or non-positive size: checked on every box, kept or not."""
    boxes = [[1.0, 2.0, 0.0, 2.0, 4.0, 1.5, 0.3] for _ in range(3)]
    boxes[1][column] = value
    rec = _gt_record(boxes, names=['car', 'animal', 'car'])
    with pytest.raises(pipeline.DataError, match='sample sample-tok: GT box of annotation 1 is invalid'):
        pipeline.ground_truth(rec, data_cfg)


@pytest.fixture(scope='module')
def no_gt_set(synthetic_root, tmp_path_factory):
    """A copy of the set whose scene-0103 has no annotations: its root and records of mini_val
    (scene-0103 alone) and of the custom split 'both' (scene-0061, then scene-0103)."""
    from nuscenes import NuScenes
    root = copy_set(synthetic_root, tmp_path_factory.mktemp('nogt'))
    drop_annotations(root, 'scene-0103')
    set_splits(root, {'both': ['scene-0061', 'scene-0103']})
    nusc = NuScenes('v1.0-mini', root, verbose=False)
    return root, {split: records_lib.build_records(nusc, split, can_bus_root=synthetic_root)
                  for split in ('mini_val', 'both')}


def test_scene_without_gt_is_resampled_in_training_and_evaluated(no_gt_set, data_cfg, tmp_path):
    """Training queues ending in the GT-less scene are redrawn (filter_empty_gt); evaluation
    streams it with no GT, has no GT detections for it, and the devkit evaluates the split."""
    root, recs = no_gt_set
    both, cfg = recs['both'], data_config_copy(data_cfg, photometric=False)
    no_gt = [i for i, r in enumerate(both['samples']) if r['scene_name'] == 'scene-0103']
    assert no_gt and not any(both['samples'][i]['gt_boxes'] for i in no_gt)
    loader = pipeline.SampleLoader(both, cfg.dataroot, cfg)
    rng = np.random.default_rng(0)
    for index in (no_gt[3], no_gt[-1]):
        out = loader.train(index, rng)
        assert out['sample_idx'] not in no_gt and out['gt_mask'].any()
    batches = list(pipeline.eval_dataset(recs['mini_val'], cfg.dataroot, cfg, batch_size=2))
    assert sorted(int(i) for b in batches for i, v in zip(b['sample_idx'], b['valid']) if v) == \
        list(range(len(recs['mini_val']['samples'])))
    assert not any(b['gt_mask'].any() for b in batches)
    detections = nuscenes_metrics.gt_as_detections(both, cfg.class_names)
    assert not any(detections[both['samples'][i]['token']] for i in no_gt)
    results = str(tmp_path / 'results.json')
    nuscenes_metrics.write_results(nuscenes_metrics.results_json(both, detections), results)
    summary = nuscenes_metrics.run_detection_eval(results, root, 'v1.0-mini', 'both', str(tmp_path / 'eval'))
    assert summary['mean_ap'] > 0.9  # GT as detections: the GT-less scene adds no false positives


def test_split_without_gt_fails_naming_the_config_keys(no_gt_set, train_records, data_cfg):
    """filter_empty_gt on a split without GT: a DataError (also with skip_bad_samples), not a
    silent GT-less queue; without filter_empty_gt GT-less queues are fine."""
    val = no_gt_set[1]['mini_val']
    cfg = data_config_copy(data_cfg, photometric=False, skip_bad_samples=True)
    keys = 'has GT within config data.point_cloud_range / data.class_names'
    loader = pipeline.SampleLoader(val, cfg.dataroot, cfg)
    with pytest.raises(pipeline.DataError, match=f"no sample of split 'mini_val' {keys}.*data.filter_empty_gt"):
        loader.train(0, np.random.default_rng(0))
    assert loader.skipped == 0
    far = data_config_copy(cfg, point_cloud_range=(100.0, 100.0, -5.0, 200.0, 200.0, 3.0))
    with pytest.raises(pipeline.DataError, match=f"no sample of split 'mini_train' {keys}"):
        pipeline.SampleLoader(train_records, far.dataroot, far).train(5, np.random.default_rng(0))
    out = pipeline.SampleLoader(val, cfg.dataroot, data_config_copy(cfg, filter_empty_gt=False)).train(
        4, np.random.default_rng(0))
    assert out['sample_idx'] == 4 and not out['gt_mask'].any()


def test_unreadable_samples_are_skipped_only_when_configured(train_records, data_cfg, tmp_path, caplog):
    root = copy_images(data_cfg.dataroot, tmp_path / 'broken')
    cfg = data_config_copy(data_cfg, dataroot=root, queue_length=1, filter_empty_gt=False, photometric=False)
    index = 4
    rec = train_records['samples'][index]
    path = os.path.join(root, rec['cams'][0]['path'])
    os.remove(path)
    loader = pipeline.SampleLoader(train_records, root, cfg)
    assert not cfg.skip_bad_samples  # the default
    with pytest.raises(pipeline.DataError, match=f"image not found: {path} \\(sample {rec['token']}\\)"):
        loader.train(index, np.random.default_rng(0))
    skip_cfg = data_config_copy(cfg, skip_bad_samples=True)
    skipping = pipeline.SampleLoader(train_records, root, skip_cfg)
    with caplog.at_level(logging.WARNING):
        out = skipping.train(index, np.random.default_rng(0))
    assert out['sample_idx'] != index and skipping.skipped >= 1
    assert 'data.skip_bad_samples' in caplog.text and f"image not found: {path} (sample {rec['token']})" in caplog.text
    again = pipeline.SampleLoader(train_records, root, skip_cfg).train(index, np.random.default_rng(0))
    assert again['sample_idx'] == out['sample_idx']  # the replacement comes from the same rng
    with pytest.raises(pipeline.DataError, match='image not found'):  # evaluation never skips
        skipping.eval(index)
    with pytest.raises(pipeline.DataError, match='data.max_gt=1'):  # config mismatches are not skipped
        pipeline.SampleLoader(train_records, root, data_config_copy(skip_cfg, max_gt=1)).train(
            0, np.random.default_rng(0))
    shutil.rmtree(os.path.join(root, 'samples', rec['cams'][0]['channel']))
    skipped = skipping.skipped
    with pytest.raises(pipeline.DataError, match="100 consecutive training samples of split 'mini_train' failed "
                                                 'to load with config data.skip_bad_samples=True'):
        skipping.train(index, np.random.default_rng(1))
    assert skipping.skipped == skipped + 100


def test_batches_do_not_depend_on_the_worker_count(train_records, data_cfg):
    """The same batches, bit for bit (photometric draws included), from the training process's threads and
    from 2 worker processes; a state of one restores in the other (~10 s: starting the workers)."""
    inline = data_config_copy(data_cfg, num_workers=0, num_threads=0, photometric=True)
    workers = data_config_copy(data_cfg, num_workers=2, num_threads=1, photometric=True)
    _, want = _batches(train_records, inline, 3)
    it = iter(pipeline.train_dataset(train_records, workers.dataroot, workers, batch_size=2, seed=0))
    try:
        got = [next(it) for _ in range(3)]
        assert it.get_state() == {'next_index': 3}
        it.set_state({'next_index': 1})
        got.append(next(it))
    finally:
        it.close()
    for a, b in zip(want + want[1:2], got):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert pipeline.num_workers(data_config_copy(data_cfg, num_workers=-1)) == min(
        pipeline.MAX_AUTO_WORKERS, len(os.sched_getaffinity(0)) - 1)
