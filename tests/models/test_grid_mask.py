import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs.common import toy_backbone
from fd3d_jax.models.bevformer import ImageFeatures
from fd3d_jax.models.grid_mask import grid_mask, grid_mask_from_params


def original_mask(h, w, d, st_h, st_w, ratio=0.5, use_h=True, use_w=True, mode=1, r=0):
    """The mask of BEVFormer's ``GridMask.forward`` for given draws (``r``: the rotation drawn from
    ``randint(rotate)``, 0 for the released ``rotate=1``), as a numpy loop and PIL."""
    hh, ww = int(1.5 * h), int(1.5 * w)
    l = min(max(int(d * ratio + 0.5), 1), d - 1)
    mask = np.ones((hh, ww), np.float32)
    if use_h:
        for i in range(hh // d):
            s = d * i + st_h
            mask[s:min(s + l, hh), :] *= 0
    if use_w:
        for i in range(ww // d):
            s = d * i + st_w
            mask[:, s:min(s + l, ww)] *= 0
    mask = np.asarray(Image.fromarray(np.uint8(mask)).rotate(r))
    mask = mask[(hh - h) // 2:(hh - h) // 2 + h, (ww - w) // 2:(ww - w) // 2 + w].astype(np.float32)
    return 1 - mask if mode == 1 else mask


@pytest.mark.parametrize('hw', [(12, 20), (32, 48), (17, 9)])
@pytest.mark.parametrize('use_h,use_w,mode,ratio', [(True, True, 1, 0.5), (True, False, 0, 0.5),
                                                    (False, True, 1, 0.3), (True, True, 0, 0.8)])
def test_matches_the_original_for_all_draws(hw, use_h, use_w, mode, ratio):
    h, w = hw
    img = np.random.default_rng(0).normal(size=(3, h, w, 2)).astype(np.float32)
    fn = jax.jit(lambda x, d, a, b: grid_mask_from_params(x, d, a, b, True, ratio, use_h, use_w, mode))
    for d in range(2, h):
        for st_h, st_w in [(0, 0), (d - 1, 0), (0, d - 1), (d // 2, (d + 1) // 2)]:
            want = img * original_mask(h, w, d, st_h, st_w, ratio, use_h, use_w, mode)[None, :, :, None]
            np.testing.assert_array_equal(np.asarray(fn(img, d, st_h, st_w)), want, err_msg=str((d, st_h, st_w)))


def test_apply_false_and_offset():
    img = jnp.ones((2, 10, 14, 3))
    np.testing.assert_array_equal(grid_mask_from_params(img, 4, 1, 2, False), img)
    noise = np.random.default_rng(1).uniform(-1, 1, (10, 14)).astype(np.float32)
    out = np.asarray(grid_mask_from_params(img, 4, 1, 2, True, offset=noise))
    m = original_mask(10, 14, 4, 1, 2)[None, :, :, None]
    np.testing.assert_allclose(out, np.broadcast_to(m + noise[None, :, :, None] * (1 - m), out.shape), rtol=1e-6)


def test_random_mask_is_shared_by_all_images_and_jits():
    img = jnp.ones((6, 24, 40, 3))
    fn = jax.jit(lambda x, k: grid_mask(x, k, prob=1.0))
    seen = set()
    for seed in range(8):
        out = np.asarray(fn(img, jax.random.PRNGKey(seed)))
        assert set(np.unique(out)) <= {0.0, 1.0} and 0 < out.mean() < 1
        np.testing.assert_array_equal(out, np.broadcast_to(out[:1, :, :, :1], out.shape))  # images and channels
        seen.add(out[0, :, :, 0].tobytes())
    assert len(seen) > 1
    # each drawn mask is one the original can produce
    masks = {original_mask(24, 40, d, a, b).tobytes() for d in range(2, 24) for a in range(d) for b in range(d)}
    assert seen <= masks


def test_probability():
    img = jnp.ones((2, 16, 16, 1))
    fn = jax.jit(jax.vmap(lambda k: grid_mask(img, k, prob=0.7)))
    out = np.asarray(fn(jax.random.split(jax.random.PRNGKey(0), 400)))
    applied = (out != 1).any(axis=(1, 2, 3, 4))
    assert 0.6 < applied.mean() < 0.8
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda k: grid_mask(img, k, prob=0.0))(jax.random.PRNGKey(3))),
                                  np.asarray(img))


@pytest.mark.parametrize('r', [0, 7, 33, 90, 145, 180, 271, 359])
def test_rotation_matches_pil(r):
    """The rotated canvas is PIL's ``Image.rotate`` (nearest, zero fill), pixel for pixel."""
    h, w = 24, 40
    fn = jax.jit(lambda d, a, b, angle: grid_mask_from_params(jnp.ones((1, h, w, 1)), d, a, b, True, angle=angle))
    for d, st_h, st_w in [(5, 1, 3), (9, 0, 8), (13, 6, 2)]:
        ours = np.asarray(fn(d, st_h, st_w, r))[0, :, :, 0]
        want = original_mask(h, w, d, st_h, st_w, r=r)
        np.testing.assert_array_equal(ours, want, err_msg=str((r, d, st_h, st_w)))


def test_rotation_draws_integer_degrees_below_rotate():
    img = jnp.ones((1, 24, 40, 1))
    with pytest.raises(ValueError, match='rotate must be >= 1'):
        grid_mask(img, jax.random.PRNGKey(0), rotate=0)
    fn = jax.jit(lambda k: grid_mask(img, k, prob=1.0, rotate=360))
    masks = [np.asarray(fn(jax.random.PRNGKey(s)))[0, :, :, 0] for s in range(6)]
    plain = {original_mask(24, 40, d, a, b).tobytes() for d in range(2, 24) for a in range(d) for b in range(d)}
    assert sum(m.tobytes() not in plain for m in masks) >= 3      # most draws are rotated


def test_image_features_mask_only_in_training():
    m = toy_backbone(ml_collections.ConfigDict())
    img = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 32, 48, 3))
    plain = ImageFeatures(dict(m.backbone), dict(m.neck), False)
    masked = ImageFeatures(dict(m.backbone), dict(m.neck), True)
    params = plain.init(jax.random.PRNGKey(1), img)
    rngs = {'dropout': jax.random.PRNGKey(2)}
    want = plain.apply(params, img, False, rngs=rngs)
    for a, b in zip(masked.apply(params, img, True), want):  # deterministic: no mask
        np.testing.assert_array_equal(a, b)
    outs = [masked.apply(params, img, False, rngs={'dropout': jax.random.PRNGKey(s)})[0] for s in range(4)]
    assert any(not np.allclose(o, want[0]) for o in outs)  # prob 0.7 per draw
