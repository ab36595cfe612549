import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.models import box_coder

PC = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_normalize_denormalize_round_trip():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(-50, 50, (20, 3)), rng.uniform(0.3, 12, (20, 3)),
                            rng.uniform(-np.pi, np.pi, (20, 1)), rng.normal(size=(20, 2))], 1)
    code = np.asarray(box_coder.normalize_bbox(jnp.asarray(boxes)))
    want = np.concatenate([boxes[:, :2], np.log(boxes[:, 3:5]), boxes[:, 2:3], np.log(boxes[:, 5:6]),
                           np.sin(boxes[:, 6:7]), np.cos(boxes[:, 6:7]), boxes[:, 7:]], 1)
    np.testing.assert_allclose(code, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(box_coder.denormalize_bbox(jnp.asarray(code))), boxes, rtol=1e-4, atol=1e-4)


def test_inverse_sigmoid_clamps():
    x = jnp.array([-0.5, 0.0, 0.3, 1.0, 1.5])
    got = np.asarray(box_coder.inverse_sigmoid(x))
    np.testing.assert_allclose(got, [np.log(1e-5), np.log(1e-5), np.log(0.3 / 0.7), np.log(1 / 1e-5), np.log(1 / 1e-5)],
                               rtol=1e-5)


def test_decode_centers_and_refinement_with_stop_gradient():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(5, 10)).astype(np.float32)
    ref = rng.uniform(0.05, 0.95, (5, 3)).astype(np.float32)
    logit = np.log(ref / (1 - ref))
    code = np.asarray(box_coder.decode_centers(jnp.asarray(raw), jnp.asarray(ref), PC))
    np.testing.assert_allclose(code[:, 0], _sigmoid(raw[:, 0] + logit[:, 0]) * 102.4 - 51.2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(code[:, 1], _sigmoid(raw[:, 1] + logit[:, 1]) * 102.4 - 51.2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(code[:, 4], _sigmoid(raw[:, 4] + logit[:, 2]) * 8.0 - 5.0, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(code[:, [2, 3, 5, 6, 7, 8, 9]], raw[:, [2, 3, 5, 6, 7, 8, 9]])
    new = np.asarray(box_coder.refine_reference(jnp.asarray(raw), jnp.asarray(ref)))
    np.testing.assert_allclose(new, _sigmoid(raw[:, [0, 1, 4]] + logit), rtol=1e-5)
    g_raw, g_ref = jax.grad(lambda r, f: box_coder.refine_reference(r, f).sum(), argnums=(0, 1))(jnp.asarray(raw), jnp.asarray(ref))
    assert not np.any(g_raw) and not np.any(g_ref)


def test_decode_topk_matches_numpy():
    rng = np.random.default_rng(2)
    nq, k, max_num = 12, 10, 20
    logits = rng.normal(size=(nq, k)).astype(np.float32)
    code = np.concatenate([rng.uniform(-70, 70, (nq, 2)), rng.normal(size=(nq, 2)), rng.uniform(-12, 12, (nq, 1)),
                           rng.normal(size=(nq, 5))], 1).astype(np.float32)
    boxes, scores, labels, valid = map(np.asarray, box_coder.decode_topk(jnp.asarray(logits), jnp.asarray(code), max_num))
    flat = _sigmoid(logits.astype(np.float64)).reshape(-1)
    order = np.argsort(-flat, kind='stable')[:max_num]
    np.testing.assert_allclose(scores, flat[order], rtol=1e-6)
    np.testing.assert_array_equal(labels, order % k)
    query = order // k
    np.testing.assert_allclose(boxes[:, :2], code[query, :2], rtol=1e-6)
    np.testing.assert_allclose(boxes[:, 2], code[query, 4], rtol=1e-6)  # gravity-centre z
    np.testing.assert_allclose(boxes[:, 3:6], np.exp(code[query][:, [2, 3, 5]]), rtol=1e-5)
    np.testing.assert_allclose(boxes[:, 6], np.arctan2(code[query, 6], code[query, 7]), rtol=1e-5, atol=1e-6)
    inside = (np.abs(code[query, :2]) <= 61.2).all(1) & (np.abs(code[query, 4]) <= 10)
    np.testing.assert_array_equal(valid, inside)
    assert not valid.all() and valid.any()
