"""Distillation losses vs float64 numpy restatements of the original formulas (channels-last); the public
face of ``losses.py`` (one argument order, exported by the package) and the example of docs/distillation.md."""
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fd3d_jax.distill
from fd3d_jax.distill import losses, masks
from tests.models.numpy_reference import conv2d


def _rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


def np_log_softmax(x, axis):
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def np_cwd(s, t, tau):
    """kd/losses/cwd.py on NCHW: softmax(T.view(-1, W*H)/tau), loss = sum(-p_T * logsoftmax(S/tau))
    * tau**2 / (C * N)."""
    n, c, h, w = s.shape
    p_t = np.exp(np_log_softmax(t.reshape(-1, h * w) / tau, 1))
    return np.sum(-p_t * np_log_softmax(s.reshape(-1, h * w) / tau, 1)) * tau ** 2 / (c * n)


def to_nchw(x):
    return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


def test_generative_mgd_matches_mgd_formula_with_fixed_mask():
    rng = np.random.default_rng(0)
    s, t = _rand(rng, 3, 5, 6, 4), _rand(rng, 3, 5, 6, 4)
    kernel1, kernel2 = _rand(rng, 3, 3, 4, 4) * 0.3, _rand(rng, 3, 3, 4, 4) * 0.3
    mask = np.asarray(masks.random_mask(jax.random.PRNGKey(3), s.shape, 0.65))
    # MGD get_dis_loss in NCHW: new = generation(S * mat); MSELoss(sum)(new, T) / N.
    gen_np = conv2d(np.maximum(conv2d(s * mask, kernel1, pad=1), 0), kernel2, pad=1)
    want = np.sum((to_nchw(gen_np) - to_nchw(t)) ** 2) / s.shape[0]
    # 'full' is the per-element mean: MGD's released value divided by the elements of one image.
    got = losses.generative_loss(gen_np.astype(np.float32), t)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got * (5 * 6 * 4), want, rtol=1e-5)
    # The region is ignored by 'full'.
    np.testing.assert_allclose(losses.generative_loss(gen_np, t, np.zeros((3, 5, 6)), 'full') * (5 * 6 * 4), want,
                               rtol=1e-5)


def test_generative_instance_hand_made_region():
    rng = np.random.default_rng(1)
    g, t = _rand(rng, 2, 4, 5, 3), _rand(rng, 2, 4, 5, 3)
    region = np.zeros((2, 4, 5), np.float32)
    region[0, 1:3, 2:4] = 1.0
    region[1, 0, 0] = 0.5
    d2 = (g.astype(np.float64) - t) ** 2
    want = (d2[0, 1:3, 2:4].sum() + 0.5 * d2[1, 0, 0].sum()) / (4.5 * 3)
    for r in (region, region[..., None]):
        np.testing.assert_allclose(losses.generative_loss(g, t, r, 'instance'), want, rtol=1e-5)
        np.testing.assert_allclose(losses.generative_loss(g, t, r, 'full'), d2.mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.generative_loss(g, t), d2.mean(), rtol=1e-5)
    # Small region: the denominator is floored at 1.
    tiny = np.zeros((2, 4, 5), np.float32)
    tiny[0, 0, 0] = 0.1
    np.testing.assert_allclose(losses.generative_loss(g, t, tiny, 'instance'), 0.1 * d2[0, 0, 0].sum(), rtol=1e-5)
    # FPN layout (B, N_cam, H, W, C) with a (B, N_cam, H, W) region.
    g5, t5 = _rand(rng, 2, 3, 4, 5, 2), _rand(rng, 2, 3, 4, 5, 2)
    r5 = (rng.uniform(size=(2, 3, 4, 5)) > 0.5).astype(np.float32)
    want5 = (r5[..., None] * (g5.astype(np.float64) - t5) ** 2).sum() / (r5.sum() * 2)
    np.testing.assert_allclose(losses.generative_loss(g5, t5, r5, area='instance'), want5, rtol=1e-5)
    with pytest.raises(ValueError):
        losses.generative_loss(g, t, area='sum')


def test_cwd_matches_released_formula():
    rng = np.random.default_rng(2)
    s, t = _rand(rng, 2, 5, 7, 6) * 3, _rand(rng, 2, 5, 7, 6) * 3
    for tau in (1.0, 2.0):
        got = losses.cwd_loss(s, t, tau)
        assert got.dtype == jnp.float32 and got.shape == ()
        np.testing.assert_allclose(got, np_cwd(to_nchw(s), to_nchw(t), tau), rtol=1e-5)
    # (B, N_cam, H, W, C): every leading axis is an image, N = B * N_cam.
    s5, t5 = _rand(rng, 2, 3, 4, 5, 6), _rand(rng, 2, 3, 4, 5, 6)
    want = np_cwd(to_nchw(s5.reshape(6, 4, 5, 6)), to_nchw(t5.reshape(6, 4, 5, 6)), 2.0)
    np.testing.assert_allclose(losses.cwd_loss(s5, t5), want, rtol=1e-5)


def test_cwd_identical_features_give_teacher_entropy_and_zero_grad():
    """The released CWD drops the teacher-entropy term: at S = T it equals tau² H(p_T) / (N C),
    and its student gradient (that of the KL) is 0."""
    rng = np.random.default_rng(3)
    t = _rand(rng, 2, 4, 5, 3)
    p = np.exp(np_log_softmax(to_nchw(t).reshape(-1, 20) / 2.0, 1))
    entropy = -(p * np.log(p)).sum() * 4.0 / (2 * 3)
    np.testing.assert_allclose(losses.cwd_loss(t, t, 2.0), entropy, rtol=1e-5)
    grad = jax.grad(losses.cwd_loss)(jnp.asarray(t), jnp.asarray(t))
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)


def test_fitnet():
    rng = np.random.default_rng(4)
    s, t = _rand(rng, 2, 3, 4, 5), _rand(rng, 2, 3, 4, 5)
    np.testing.assert_allclose(losses.fitnet_loss(s, t), ((s.astype(np.float64) - t) ** 2).mean(), rtol=1e-5)


def test_masked_l2_matches_released_formula():
    rng = np.random.default_rng(5)
    s, t = _rand(rng, 2, 6, 5, 4), _rand(rng, 2, 6, 5, 4)
    mask = rng.uniform(size=(2, 6, 5)).astype(np.float32) * (rng.uniform(size=(2, 6, 5)) > 0.5)
    # heatmap_detection_distiller.forward_train in NCHW, mask (B, 1, H, W):
    # (1 / mask.sum()) * ((S * M - T * M) ** 2).sum()
    m = mask[:, None].astype(np.float64)
    want = (1 / m.sum()) * ((to_nchw(s) * m - to_nchw(t) * m) ** 2).sum()
    for mk in (mask, mask[..., None]):
        got = losses.masked_l2_loss(s, t, mk)
        assert got.dtype == jnp.float32 and got.shape == ()
        np.testing.assert_allclose(got * s.shape[-1], want, rtol=1e-5)   # per element: the released value / C


def test_focal_loss_matches_formula():
    rng = np.random.default_rng(6)
    ft, fs = _rand(rng, 3, 2, 7, 4), _rand(rng, 3, 2, 7, 4)
    w = rng.uniform(size=(2, 7)).astype(np.float32)
    d = ((ft.astype(np.float64) - fs) ** 2).sum(-1)
    np.testing.assert_allclose(losses.focal_loss(fs, ft, w), (w * d).sum() / (3 * 4 * w.sum()), rtol=1e-5)
    np.testing.assert_allclose(losses.focal_loss(fs, ft), d.sum() / (3 * 2 * 7 * 4), rtol=1e-5)


def test_focal_loss_nan_inputs_finite():
    rng = np.random.default_rng(7)
    ft, fs = _rand(rng, 2, 1, 5, 4), _rand(rng, 2, 1, 5, 4)
    ft[0, 0, 1, 2] = np.nan
    fs[1, 0, 3, :] = np.nan
    got = losses.focal_loss(fs, ft)
    assert np.isfinite(got)
    want = ((np.nan_to_num(ft).astype(np.float64) - np.nan_to_num(fs)) ** 2).sum() / (2 * 5 * 4)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    grad = jax.grad(losses.focal_loss)(jnp.asarray(fs), jnp.asarray(ft))
    assert np.all(np.isfinite(grad))


def test_zero_where_it_should_be():
    rng = np.random.default_rng(8)
    x = _rand(rng, 2, 4, 5, 3)
    region = (rng.uniform(size=(2, 4, 5)) > 0.5).astype(np.float32)
    assert float(losses.generative_loss(x, x)) == 0.0
    assert float(losses.generative_loss(x, x, region, 'instance')) == 0.0
    assert float(losses.fitnet_loss(x, x)) == 0.0
    assert float(losses.masked_l2_loss(x, x, region)) == 0.0
    f = _rand(rng, 2, 2, 6, 3)
    assert float(losses.focal_loss(f, f, rng.uniform(size=(2, 6)))) == 0.0
    # Empty region / mask / weights: 0 and finite (also the gradient).
    y = _rand(rng, 2, 4, 5, 3)
    empty = np.zeros((2, 4, 5), np.float32)
    for fn in (lambda a: losses.generative_loss(a, y, empty, 'instance'), lambda a: losses.masked_l2_loss(a, y, empty)):
        val, grad = jax.value_and_grad(fn)(jnp.asarray(x))
        assert float(val) == 0.0 and np.all(np.isfinite(grad))
    g = _rand(rng, 2, 2, 6, 3)
    val, grad = jax.value_and_grad(losses.focal_loss)(jnp.asarray(g), jnp.asarray(f), jnp.zeros((2, 6)))
    assert float(val) == 0.0 and np.all(np.isfinite(grad))


def test_jit_and_bfloat16_inputs_give_float32_scalars():
    rng = np.random.default_rng(9)
    s, t = (jnp.asarray(_rand(rng, 2, 4, 5, 3), jnp.bfloat16) for _ in range(2))
    region = jnp.ones((2, 4, 5))
    outs = jax.jit(lambda a, b: (losses.generative_loss(a, b, region, 'instance'), losses.generative_loss(a, b),
                                 losses.cwd_loss(a, b), losses.fitnet_loss(a, b), losses.masked_l2_loss(a, b, region),
                                 losses.focal_loss(a, b)))(s, t)
    for o in outs:
        assert o.shape == () and o.dtype == jnp.float32 and np.isfinite(o)


def test_the_losses_are_the_public_face_with_one_argument_order():
    """``__all__`` lists the five losses, the package exports them, and each takes (apprentice, expert, ...)."""
    assert sorted(losses.__all__) == ['cwd_loss', 'fitnet_loss', 'focal_loss', 'generative_loss', 'masked_l2_loss']
    for name in losses.__all__:
        assert getattr(fd3d_jax.distill, name) is getattr(losses, name)
        assert name in fd3d_jax.distill.__all__
        assert list(inspect.signature(getattr(losses, name)).parameters)[:2] == ['apprentice', 'expert'], name


def test_docs_example():
    """The unit-testing example of docs/distillation.md runs as written (its one ``python`` block)."""
    doc = pathlib.Path(__file__).resolve().parents[2] / 'docs' / 'distillation.md'
    blocks = re.findall(r'```python\n(.*?)```', doc.read_text(), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(doc), 'exec'), {})
