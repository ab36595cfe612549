import os
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from fd3d_jax.data import geometry, pipeline
from tests.conftest import SYNTH_IMAGE_WH


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


def test_train_shards_are_disjoint_and_cover_the_split(train_records, data_cfg):
    cfg = data_config_copy(data_cfg, queue_length=1, filter_empty_gt=False)
    n = len(train_records['samples'])
    seen = []
    for shard in range(2):
        it = iter(pipeline.train_dataset(train_records, cfg.dataroot, cfg, batch_size=1, seed=0,
                                         shard_index=shard, shard_count=2))
        seen.append({int(next(it)['sample_idx'][0]) for _ in range(n // 2)})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= 2 * (n // 2)
