import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fd3d_jax.detection import losses, matching

CODE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)


def _cfg():
    return ml_collections.ConfigDict(dict(cls_weight=2.0, bbox_weight=0.25, focal_alpha=0.25, focal_gamma=2.0,
                                          code_weights=CODE_WEIGHTS))


def _np_focal(x, t, alpha=0.25, gamma=2.0):
    x = x.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    log_p, log_1mp = -np.logaddexp(0, -x), -np.logaddexp(0, x)
    return t * (-alpha * (1 - p) ** gamma * log_p) + (1 - t) * (-(1 - alpha) * p ** gamma * log_1mp)


def _np_code(b):
    return np.concatenate([b[..., :2], np.log(b[..., 3:5]), b[..., 2:3], np.log(b[..., 5:6]), np.sin(b[..., 6:7]),
                           np.cos(b[..., 6:7]), b[..., 7:]], -1)


def _random_boxes(rng, shape):
    return np.concatenate([rng.normal(0, 10, shape + (3,)), rng.uniform(0.5, 4, shape + (3,)),
                           rng.uniform(-3, 3, shape + (1,)), rng.normal(size=shape + (2,))], -1).astype(np.float32)


def _problem(seed=0, b=2, q=6, k=3, g=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (b, q, k)).astype(np.float32)
    preds = rng.normal(size=(b, q, 10)).astype(np.float32)
    boxes = _random_boxes(rng, (b, g))
    labels = rng.integers(0, k, (b, g)).astype(np.int32)
    labels[1, 2:] = -1
    boxes[1, 2:] = 0
    return logits, preds, boxes, labels, labels >= 0


def test_sigmoid_focal_loss_vs_numpy():
    x = np.array([[-30.0, -3.0, -0.5, 0.0], [0.7, 2.0, 15.0, 40.0]], np.float32)
    t = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], np.float32)
    got = np.asarray(losses.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(t)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _np_focal(x, t), rtol=1e-5, atol=1e-7)
    got = np.asarray(losses.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(t), alpha=0.5, gamma=1.0))
    np.testing.assert_allclose(got, _np_focal(x, t, 0.5, 1.0), rtol=1e-5, atol=1e-7)


def test_layer_loss_vs_numpy():
    logits, preds, boxes, labels, mask = _problem()
    assigned = np.array([[3, -1, 0, -1, 1, -1], [-1, 1, -1, -1, 0, -1]], np.int32)
    loss_cls, loss_bbox, num_pos = losses.layer_loss(logits, preds, assigned, boxes, labels, mask, _cfg())
    matched = assigned >= 0
    idx = np.maximum(assigned, 0)
    onehot = np.eye(3)[np.take_along_axis(labels, idx, 1)] * matched[..., None]
    target = _np_code(np.take_along_axis(boxes, idx[..., None], 1))
    l1 = (np.abs(preds - target) * np.array(CODE_WEIGHTS) * matched[..., None]).sum()
    assert float(num_pos) == 5.0
    np.testing.assert_allclose(float(loss_cls), 2.0 * _np_focal(logits, onehot).sum() / 5, rtol=1e-5)
    np.testing.assert_allclose(float(loss_bbox), 0.25 * l1 / 5, rtol=1e-5)


def test_non_finite_rows_dropped_with_finite_grads():
    logits, preds, boxes, labels, mask = _problem(1)
    boxes[0, 0, 7] = np.nan                      # matched GT with a NaN velocity
    boxes[0, 1, 3] = 0.0                         # matched GT with w = 0 (log 0)
    assigned = np.array([[0, 1, 2, -1, -1, -1], [-1, 2, 0, -1, -1, -1]], np.int32)  # (1, 1): a padded GT

    def f(lg, pr):
        lc, lb, n = losses.layer_loss(lg, pr, assigned, boxes, labels, mask, _cfg())
        return lc + lb, (lb, n)

    (_, (loss_bbox, num_pos)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(logits, preds)
    assert float(num_pos) == 4.0                 # padded GT not counted; NaN rows still count
    want = (np.abs(preds[0, 2] - _np_code(boxes[0, 2])) * CODE_WEIGHTS).sum() \
        + (np.abs(preds[1, 2] - _np_code(boxes[1, 0])) * CODE_WEIGHTS).sum()
    np.testing.assert_allclose(float(loss_bbox), 0.25 * want / 4, rtol=1e-5)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[1])[0, :2], 0.0)  # dropped rows: no box gradient


def test_zero_gt_sample():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (1, 5, 3)).astype(np.float32)
    preds = rng.normal(size=(1, 5, 10)).astype(np.float32)
    boxes, labels = np.zeros((1, 3, 9), np.float32), np.full((1, 3), -1, np.int32)
    assigned = matching.match(logits, preds, boxes, labels, labels >= 0)
    np.testing.assert_array_equal(np.asarray(assigned), -1)
    loss_cls, loss_bbox, num_pos = losses.layer_loss(logits, preds, assigned, boxes, labels, labels >= 0, _cfg())
    assert float(num_pos) == 0.0 and float(loss_bbox) == 0.0
    np.testing.assert_allclose(float(loss_cls), 2.0 * _np_focal(logits, np.zeros_like(logits)).sum(), rtol=1e-5)


def test_detection_loss_jit_two_layers():
    logits, preds, boxes, labels, mask = _problem(3)
    outputs = {'cls_scores': jnp.stack([logits, logits[:, ::-1]]), 'bbox_preds': jnp.stack([preds, -preds])}
    batch = {'gt_boxes': boxes, 'gt_labels': labels, 'gt_mask': mask}
    cfg = _cfg()
    total, parts = jax.jit(lambda o, b: losses.detection_loss(o, b, cfg))(outputs, batch)
    assert set(parts) == {'loss_cls', 'loss_bbox', 'd0.loss_cls', 'd0.loss_bbox', 'num_pos'}
    assert all(np.shape(v) == () for v in parts.values())
    want = 0.0
    for i, prefix in enumerate(('d0.', '')):
        c, p = outputs['cls_scores'][i], outputs['bbox_preds'][i]
        assigned = matching.match(c, p, boxes, labels, mask)
        lc, lb, n = losses.layer_loss(c, p, assigned, boxes, labels, mask, cfg)
        np.testing.assert_allclose(float(parts[prefix + 'loss_cls']), float(lc), rtol=1e-5)
        np.testing.assert_allclose(float(parts[prefix + 'loss_bbox']), float(lb), rtol=1e-5)
        want += float(lc) + float(lb)
    assert float(parts['num_pos']) == float(n) == 6.0
    np.testing.assert_allclose(float(total), want, rtol=1e-5)

    grads = jax.jit(jax.grad(lambda o: losses.detection_loss(o, batch, cfg)[0]))(outputs)
    assert all(np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
