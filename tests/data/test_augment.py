import cv2
import numpy as np
import pytest

from fd3d_jax.data import pipeline
from fd3d_jax.data.augment import photometric_distortion, photometric_from_params, photometric_params
from tests.data.test_pipeline import data_config_copy


def original(img, rng):
    """``PhotoMetricDistortionMultiViewImage.__call__`` on one BGR float32 image, restated with
    ``numpy.random`` replaced by the Generator ``rng`` (same calls, same order)."""
    img = img.copy()
    if rng.integers(2):
        img += rng.uniform(-32, 32)
    mode = rng.integers(2)
    if mode == 1:
        if rng.integers(2):
            img *= rng.uniform(0.5, 1.5)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)  # mmcv.bgr2hsv
    if rng.integers(2):
        img[..., 1] *= rng.uniform(0.5, 1.5)
    if rng.integers(2):
        img[..., 0] += rng.uniform(-18, 18)
        img[..., 0][img[..., 0] > 360] -= 360
        img[..., 0][img[..., 0] < 0] += 360
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)  # mmcv.hsv2bgr
    if mode == 0:
        if rng.integers(2):
            img *= rng.uniform(0.5, 1.5)
    if rng.integers(2):
        img = img[..., rng.permutation(3)]
    return img


def _image(seed, hw=(23, 31)):
    return np.random.default_rng(seed).integers(0, 256, hw + (3,)).astype(np.float32)


@pytest.mark.parametrize('seed', range(40))
def test_equals_the_original_on_the_bgr_image(seed):
    rgb = _image(seed)
    got = photometric_distortion(rgb, np.random.default_rng(seed))
    want = original(rgb[..., ::-1].copy(), np.random.default_rng(seed))
    assert got.dtype == np.float32 and got.shape == rgb.shape
    np.testing.assert_array_equal(got, want[..., ::-1])
    np.testing.assert_array_equal(rgb, _image(seed))  # input untouched


def test_fixed_draws():
    rgb = _image(0)
    bgr = rgb[..., ::-1].copy()
    p = dict(brightness=10.5, contrast_first=False, contrast=1.25, saturation=0.7, hue=-17.0,
             swap=np.array([1, 2, 0]))
    hsv = cv2.cvtColor(bgr + np.float32(10.5), cv2.COLOR_BGR2HSV)
    hsv[..., 1] *= 0.7
    hsv[..., 0] -= 17.0
    hsv[..., 0][hsv[..., 0] < 0] += 360
    want = (cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) * 1.25)[..., [1, 2, 0]]
    np.testing.assert_array_equal(photometric_from_params(rgb, p), want[..., ::-1])
    # nothing drawn: the HSV round trip only
    none = dict(brightness=None, contrast_first=True, contrast=None, saturation=None, hue=None, swap=None)
    np.testing.assert_allclose(photometric_from_params(rgb, none), rgb, atol=1e-3)
    # contrast first: before the HSV round trip
    first = dict(none, contrast=0.5)
    np.testing.assert_array_equal(photometric_from_params(rgb, first),
                                  cv2.cvtColor(cv2.cvtColor(rgb * np.float32(0.5), cv2.COLOR_RGB2HSV),
                                               cv2.COLOR_HSV2RGB))


def test_draws_cover_every_branch():
    draws = [photometric_params(np.random.default_rng(s)) for s in range(200)]
    for key in ('brightness', 'contrast', 'saturation', 'hue', 'swap'):
        frac = np.mean([d[key] is not None for d in draws])
        assert 0.35 < frac < 0.65, (key, frac)
    assert 0.35 < np.mean([d['contrast_first'] for d in draws]) < 0.65
    assert all(abs(d['hue']) <= 18 for d in draws if d['hue'] is not None)


def _train_batches(records, cfg, seed, n=2):
    it = iter(pipeline.train_dataset(records, cfg.dataroot, cfg, batch_size=1, seed=seed))
    return [next(it) for _ in range(n)]


def test_training_batches_are_distorted_deterministically(train_records, data_cfg):
    on = data_config_copy(data_cfg, photometric=True)
    off = data_config_copy(data_cfg, photometric=False)
    a, b, plain = (_train_batches(train_records, on, 0), _train_batches(train_records, on, 0),
                   _train_batches(train_records, off, 0))
    for x, y, z in zip(a, b, plain):
        np.testing.assert_array_equal(x['img'], y['img'])
        assert x['img'].dtype == np.float32 and x['img'].shape == z['img'].shape
        for key in z:
            if key != 'img':
                np.testing.assert_array_equal(x[key], z[key])  # the queue draws are unchanged
        assert not np.allclose(x['img'], z['img'])
        # padding stays zero (distortion before normalisation and resize)
        h, w = int(90 * on.image_scale), int(160 * on.image_scale)
        assert (x['img'][..., h:, :, :] == 0).all() and (x['img'][..., :, w:, :] == 0).all()
        # independent draws per camera: the cameras' changes differ
        diff = (x['img'] - z['img'])[0, -1, :, :h, :w]
        assert len({np.round(d.mean(), 3) for d in diff}) > 1


def test_evaluation_is_never_distorted(train_records, data_cfg):
    on = data_config_copy(data_cfg, photometric=True)
    off = data_config_copy(data_cfg, photometric=False)
    got = next(iter(pipeline.eval_dataset(train_records, on.dataroot, on, batch_size=2)))
    want = next(iter(pipeline.eval_dataset(train_records, off.dataroot, off, batch_size=2)))
    np.testing.assert_array_equal(got['img'], want['img'])
