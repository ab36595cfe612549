"""``data.device_normalize``: raw uint8 images from the pipeline, prepared in jnp, equal the host path's."""
import cv2
import jax
import numpy as np
import pytest

from fd3d_jax.data import augment, device_input, pipeline
from tests.data.test_pipeline import data_config_copy

CAFFE = dict(image_mean=(103.53, 116.28, 123.675), image_std=(1.0, 1.0, 1.0), to_rgb=False)


def _train(records, cfg, n=2, batch_size=2):
    it = iter(pipeline.train_dataset(records, cfg.dataroot, cfg, batch_size=batch_size, seed=0))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize('overrides, atol', [
    (dict(), 1e-4),                                      # torchvision RGB, x0.5 (BEVFormer-tiny)
    (dict(CAFFE, image_scale=1.0), 1e-3),                # caffe BGR (std 1: pixel units, 4e-6 of 255), x1 (base)
    (dict(image_scale=0.8, pad_divisor=32), 1e-4),       # a scale that is not a power of 2 (BEVFormer-small)
])
def test_prepared_images_equal_the_host_pipeline(train_records, data_cfg, overrides, atol):
    """The same batches (same queue and photometric draws from the same RNG stream) and, after
    ``prepare_images``, the host path's float32 images up to float rounding, padding included."""
    host_cfg = data_config_copy(data_cfg, photometric=True, **overrides)
    dev_cfg = data_config_copy(host_cfg, device_normalize=True)
    prepare = jax.jit(lambda b: device_input.prepare_images(b, dev_cfg))
    for want, raw in zip(_train(train_records, host_cfg), _train(train_records, dev_cfg)):
        assert raw['img'].dtype == np.uint8 and raw['img'].shape[-3:] == (90, 160, 3)
        assert raw['photo_params'].shape == raw['img'].shape[:3] + (5,) and raw['photo_perm'].dtype == np.int32
        got = jax.device_get(prepare(raw))
        assert set(got) == set(want)
        for key in want:
            if key != 'img':
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got['img'].dtype == np.float32 and got['img'].shape == want['img'].shape
        np.testing.assert_allclose(got['img'], want['img'], rtol=0, atol=atol)
        # the draws matter: without them the images are far off
        plain = jax.device_get(prepare({k: v for k, v in raw.items() if k not in device_input.PHOTO_KEYS}))
        assert np.abs(plain['img'] - want['img']).max() > 100 * atol


def test_evaluation_batches_and_idempotence(val_records, data_cfg):
    dev_cfg = data_config_copy(data_cfg, device_normalize=True)
    want = next(iter(pipeline.eval_dataset(val_records, data_cfg.dataroot, data_cfg, batch_size=2)))
    raw = next(iter(pipeline.eval_dataset(val_records, dev_cfg.dataroot, dev_cfg, batch_size=2)))
    assert raw['img'].dtype == np.uint8 and not set(device_input.PHOTO_KEYS) & set(raw)  # never distorted
    got = device_input.prepare_images(raw, dev_cfg)
    np.testing.assert_allclose(np.asarray(got['img']), want['img'], rtol=0, atol=1e-4)
    assert device_input.prepare_images(got, dev_cfg) is got   # float images: already prepared


@pytest.mark.parametrize('seed', range(12))
def test_photometric_matches_cv2(seed):
    """cv2's float HSV round trip and the drawn steps, per image, on values outside 0..255 too."""
    rng = np.random.default_rng(seed)
    img = (rng.integers(0, 256, (2, 23, 31, 3)) * 1.2 - 20).astype(np.float32)
    draws = [augment.photometric_params(np.random.default_rng(100 * seed + i)) for i in range(2)]
    arrays = [augment.photometric_arrays(p) for p in draws]
    got = np.asarray(jax.jit(device_input.photometric)(img, np.stack([a[0] for a in arrays]),
                                                       np.stack([a[1] for a in arrays])))
    for i, p in enumerate(draws):
        np.testing.assert_allclose(got[i], augment.photometric_from_params(img[i], p), rtol=0, atol=1e-3)


@pytest.mark.parametrize('out_hw', [(45, 80), (72, 128), (27, 48), (135, 240), (90, 100)])
def test_resize_matches_cv2_inter_linear(out_hw):
    img = (np.random.default_rng(0).normal(size=(90, 160, 3)) * 50).astype(np.float32)
    want = cv2.resize(img, out_hw[::-1], interpolation=cv2.INTER_LINEAR)
    got = np.asarray(jax.jit(lambda x: device_input.resize_bilinear(x, out_hw))(img))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_expert_batch_prepares_raw_images(train_records, data_cfg):
    """``distill.expert.expert_batch`` on the raw batch = on the host path's batch (renormalised to caffe BGR,
    upsampled x2)."""
    from fd3d_jax.distill.expert import expert_batch
    expert = data_config_copy(data_cfg, **CAFFE)
    host_cfg = data_config_copy(data_cfg, photometric=True)
    dev_cfg = data_config_copy(host_cfg, device_normalize=True)
    want = expert_batch(_train(train_records, host_cfg, n=1)[0], host_cfg, expert, 2)
    got = expert_batch(_train(train_records, dev_cfg, n=1)[0], dev_cfg, expert, 2)
    assert set(got) == set(want)
    np.testing.assert_allclose(np.asarray(got['img']), np.asarray(want['img']), rtol=0, atol=1e-3)
