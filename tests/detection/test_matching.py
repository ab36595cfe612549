import itertools

import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.detection import matching


def _np_focal_cost(logits, labels, weight=2.0, alpha=0.25, gamma=2.0, eps=1e-12):
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    neg = -np.log(1 - p + eps) * (1 - alpha) * p ** gamma
    pos = -np.log(p + eps) * alpha * (1 - p) ** gamma
    return weight * (pos - neg)[:, labels]


def _brute_force_cost(cost, mask):
    """Minimal total cost of a one-to-one matching of min(Q, #valid) pairs, by enumeration."""
    q = cost.shape[0]
    cols = np.flatnonzero(mask)
    if cols.size == 0:
        return 0.0
    if cols.size <= q:  # every GT gets a distinct query
        return min(sum(cost[r, c] for r, c in zip(rows, cols)) for rows in itertools.permutations(range(q), cols.size))
    return min(sum(cost[r, c] for r, c in enumerate(sel)) for sel in itertools.permutations(cols, q))


def _check_assignment(assigned, cost, mask):
    cols = np.flatnonzero(mask)
    hit = assigned[assigned >= 0]
    assert len(hit) == min(cost.shape[0], cols.size)
    assert len(set(hit.tolist())) == len(hit) and np.all(mask[hit])
    got = sum(cost[r, assigned[r]] for r in range(cost.shape[0]) if assigned[r] >= 0)
    np.testing.assert_allclose(got, _brute_force_cost(cost, mask), rtol=1e-6)


def test_focal_cost_vs_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 5, 4)).astype(np.float32)
    labels = np.array([[2, 0, 3, -1], [1, 1, -1, -1]], np.int32)
    got = np.asarray(matching.focal_cost(jnp.asarray(logits), jnp.asarray(labels)))
    assert got.shape == (2, 5, 4) and np.all(np.isfinite(got))
    for b, n in ((0, 3), (1, 2)):
        np.testing.assert_allclose(got[b, :, :n], _np_focal_cost(logits[b], labels[b, :n]), rtol=1e-5, atol=1e-6)
    single = matching.focal_cost(jnp.asarray(logits[0]), jnp.asarray(labels[0]), weight=1.0, alpha=0.5, gamma=1.0)
    np.testing.assert_allclose(np.asarray(single)[:, :3], _np_focal_cost(logits[0], labels[0, :3], 1.0, 0.5, 1.0),
                               rtol=1e-5, atol=1e-6)


def test_l1_cost_uses_first_8_entries():
    rng = np.random.default_rng(1)
    pred, gt = rng.normal(size=(2, 5, 10)), rng.normal(size=(2, 3, 10))
    got = np.asarray(matching.l1_cost(jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32)))
    want = 0.25 * np.abs(pred[:, :, None, :8] - gt[:, None, :, :8]).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(2)
    cases = [  # (Q, G, mask)
        (5, 3, [1, 1, 1]),
        (6, 4, [1, 0, 1, 1]),      # padding in the middle
        (4, 4, [1, 1, 1, 1]),
        (2, 4, [1, 1, 0, 1]),      # fewer queries than GT
        (5, 3, [0, 0, 0]),         # zero GT
    ]
    fn = jax.jit(matching.hungarian)
    for q, g, m in cases:
        mask = np.array([m, [1] * g], bool)
        cost = rng.normal(size=(2, q, g)).astype(np.float32)
        cost[:, :, ~mask[0]] = np.nan  # padded columns must never be looked at
        assigned = np.asarray(fn(jnp.asarray(cost), jnp.asarray(mask)))
        assert assigned.shape == (2, q) and assigned.dtype == np.int32
        for b in range(2):
            if not mask[b].any():
                assert np.all(assigned[b] == -1)
            _check_assignment(assigned[b], cost[b], mask[b])


def test_hungarian_non_finite_and_vmap():
    rng = np.random.default_rng(3)
    cost = rng.normal(size=(3, 2, 5, 3)).astype(np.float32)
    cost[0, 0, 1, 2] = np.inf
    cost[0, 1, 0, 0] = np.nan
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    got = np.asarray(jax.jit(jax.vmap(matching.hungarian, in_axes=(0, None)))(jnp.asarray(cost), jnp.asarray(mask)))
    for i in range(3):
        np.testing.assert_array_equal(got[i], np.asarray(matching.hungarian(jnp.asarray(cost[i]), jnp.asarray(mask))))
    assert got[0, 0, 1] != 2 and got[0, 1, 0] != 0  # non-finite pairs avoided
    _check_assignment(got[1, 0], cost[1, 0], mask[0])


def test_match_ignores_padded_rows():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 6, 3)).astype(np.float32)
    preds = rng.normal(size=(2, 6, 10)).astype(np.float32)
    boxes = np.zeros((2, 3, 9), np.float32)  # padded rows stay zero (log 0 in the code)
    boxes[0, :2] = np.concatenate([rng.normal(size=(2, 3)), rng.uniform(0.5, 3, (2, 3)), rng.normal(size=(2, 3))], 1)
    labels = np.array([[1, 2, -1], [-1, -1, -1]], np.int32)
    mask = labels >= 0
    assigned = np.asarray(jax.jit(matching.match)(logits, preds, boxes, labels, mask))
    assert np.all(assigned[1] == -1)
    b = boxes[0, :2]
    code = np.concatenate([b[:, :2], np.log(b[:, 3:5]), b[:, 2:3], np.log(b[:, 5:6]), np.sin(b[:, 6:7]),
                           np.cos(b[:, 6:7]), b[:, 7:]], 1)
    cost = _np_focal_cost(logits[0], labels[0, :2]) + 0.25 * np.abs(preds[0, :, None, :8] - code[None, :, :8]).sum(-1)
    _check_assignment(assigned[0], np.pad(cost, ((0, 0), (0, 1))), mask[0])


def test_auto_matcher_is_the_graph_one_on_accelerators_and_scipy_on_the_cpu(monkeypatch):
    assert matching.resolve_matcher('scipy') == 'scipy' and matching.resolve_matcher('jax') == 'jax'
    assert matching.resolve_matcher('auto') == 'scipy'                  # this CPU
    for backend in ('gpu', 'tpu'):
        monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
        assert matching.resolve_matcher('auto') == 'jax'
