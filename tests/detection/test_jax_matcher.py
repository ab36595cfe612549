"""The in-graph Hungarian matcher (``matching.hungarian_jax``, ``config.loss.matcher='jax'``) against scipy's
``linear_sum_assignment`` (``matching.hungarian`` / ``_assign_host``, float64).

Ties allow several optimal assignments, so the matchers are compared by objective, not by indices: the number
of non-finite pairs (NaN/+inf count +1, -inf -1: scipy's ``_BIG_COST`` makes that the first criterion) must be
equal, and the total of the finite costs equal within 1e-5 relative (of the sum of |cost| over scipy's pairs,
at least 1): the JAX matcher works in float32.
"""
import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fd3d_jax.detection import losses, matching
from fd3d_jax.errors import ConfigError
from fd3d_jax.validate import validate

RTOL = 1e-5


def _objective(cost, assigned):
    """(signed count of non-finite pairs, float64 sum of the finite ones, sum of |finite|) of one assignment
    ``assigned`` (Q,) of ``cost`` (Q, G)."""
    rows = np.flatnonzero(assigned >= 0)
    picked = cost[rows, assigned[rows]].astype(np.float64)
    finite = np.isfinite(picked)
    bad = int(np.sum(~finite & ~(picked == -np.inf)) - np.sum(picked == -np.inf))
    return bad, float(np.sum(picked[finite])), float(np.sum(np.abs(picked[finite])))


def _check(cost, mask, assigned):
    """The contract of ``hungarian`` and scipy's optimum, for one problem; returns scipy's finite total."""
    num_q, num_g = cost.shape
    assert assigned.shape == (num_q,) and assigned.dtype == np.int32
    hit = assigned[assigned >= 0]
    assert np.all(assigned >= -1) and np.all(hit < num_g)
    assert len(set(hit.tolist())) == len(hit), 'a GT matched twice'
    assert np.all(mask[hit]), 'a padded GT matched'
    assert len(hit) == min(num_q, int(mask.sum()))
    want = matching._assign_host(cost[None], mask[None])[0]
    got_bad, got_sum, _ = _objective(cost, assigned)
    want_bad, want_sum, scale = _objective(cost, want)
    assert got_bad == want_bad, (got_bad, want_bad)
    assert abs(got_sum - want_sum) <= RTOL * max(1.0, scale), (got_sum, want_sum)
    return want_sum


def _greedy_total(cost, mask):
    """Total of the greedy matching (cheapest remaining pair first): not optimal in general."""
    c = np.where(mask[None], cost.astype(np.float64), np.inf)
    total = 0.0
    for _ in range(min(cost.shape[0], int(mask.sum()))):
        q, g = np.unravel_index(np.argmin(c), c.shape)
        total += c[q, g]
        c[q, :], c[:, g] = np.inf, np.inf
    return total


def _masks(rng, n, num_g, p_valid=0.7):
    """(n, G) masks with padding anywhere (also in the middle); every 8th problem has no valid GT."""
    mask = rng.random((n, num_g)) < p_valid
    mask[::8] = False
    mask[1::8] = True
    return mask


def _random_set(seed=0, n=200):
    """{name: (cost (n, Q, G) float32, mask (n, G))}: 5 x n problems of fixed shapes."""
    rng = np.random.default_rng(seed)
    out = {}
    out['tall'] = (rng.normal(size=(n, 40, 8)), _masks(rng, n, 8))                 # Q >> G
    out['square'] = (rng.uniform(0, 10, (n, 8, 8)), _masks(rng, n, 8, 0.9))
    out['wide'] = (rng.normal(size=(n, 5, 9)), _masks(rng, n, 9, 0.8))             # more valid GT than queries
    out['ties'] = (rng.integers(0, 4, (n, 10, 7)), _masks(rng, n, 7))              # small integers: many ties
    cost = rng.uniform(0, 20, (n, 12, 6))
    kind = rng.random(cost.shape)
    cost[kind < 0.06] = np.inf
    cost[(kind >= 0.06) & (kind < 0.10)] = np.nan
    cost[(kind >= 0.10) & (kind < 0.12)] = -np.inf
    cost[2::8, :, 0] = np.nan                                                      # a whole column non-finite
    out['nonfinite'] = (cost, _masks(rng, n, 6))
    return {k: (c.astype(np.float32), m) for k, (c, m) in out.items()}


def test_equals_scipy_on_1000_random_problems():
    fn = jax.jit(matching.hungarian_jax)
    greedy_worse = checked = 0
    for name, (cost, mask) in _random_set().items():
        got = np.asarray(fn(jnp.asarray(cost), jnp.asarray(mask)))             # one vmapped batch per shape
        assert got.shape == cost.shape[:2]
        for c, m, a in zip(cost, mask, got):
            want = _check(c, m, a)
            checked += 1
            if not m.any():
                assert np.all(a == -1)
            if name != 'nonfinite' and m.any():
                greedy_worse += _greedy_total(c, m) > want + RTOL * max(1.0, abs(want))
    assert checked == 1000
    assert greedy_worse >= 100, greedy_worse      # the set tells an optimal matcher from a greedy one


def test_detection_sized_problem():
    """900 queries, 60 GT slots (45 valid, padding in the middle), costs of ``match`` on random inputs."""
    rng = np.random.default_rng(5)
    num_q, num_g, num_classes = 900, 60, 10
    logits = rng.normal(-2, 1.5, (2, num_q, num_classes)).astype(np.float32)
    preds = np.concatenate([rng.uniform(-50, 50, (2, num_q, 2)), rng.normal(0, 0.5, (2, num_q, 8))], -1)
    boxes = np.concatenate([rng.uniform(-50, 50, (2, num_g, 3)), rng.uniform(0.5, 5, (2, num_g, 3)),
                            rng.uniform(-3, 3, (2, num_g, 1)), rng.normal(size=(2, num_g, 2))], -1)
    mask = np.zeros((2, num_g), bool)
    mask[0, :45] = True
    mask[1, 10:55] = True
    labels = np.where(mask, rng.integers(0, num_classes, (2, num_g)), -1).astype(np.int32)
    args = (logits, preds.astype(np.float32), boxes.astype(np.float32), labels, mask)
    got = np.asarray(jax.jit(lambda *a: matching.match(*a, matcher='jax'))(*args))
    want = np.asarray(jax.jit(lambda *a: matching.match(*a, matcher='scipy'))(*args))
    np.testing.assert_array_equal(got, want)        # continuous random costs: the optimum is unique


def test_vmap_over_layers_and_jit_compiles_once():
    rng = np.random.default_rng(1)
    traces = []

    def fn(cost, mask):
        traces.append(1)
        return jax.vmap(matching.hungarian_jax, in_axes=(0, None))(cost, mask)   # layers share the GT

    fn, single = jax.jit(fn), jax.jit(matching.hungarian_jax)
    for _ in range(3):
        cost = rng.normal(size=(4, 3, 16, 6)).astype(np.float32)             # (L, B, Q, G)
        mask = _masks(rng, 3, 6)
        got = np.asarray(fn(jnp.asarray(cost), jnp.asarray(mask)))
        assert got.shape == (4, 3, 16)
        for layer in range(4):
            np.testing.assert_array_equal(got[layer], np.asarray(single(cost[layer], mask)))
            for b in range(3):
                _check(cost[layer, b], mask[b], got[layer, b])
    assert len(traces) == 1


def test_edge_shapes():
    fn = matching.hungarian_jax
    assert np.asarray(fn(jnp.zeros((2, 0, 3)), jnp.ones((2, 3), bool))).shape == (2, 0)
    np.testing.assert_array_equal(np.asarray(fn(jnp.zeros((2, 4, 0)), jnp.ones((2, 0), bool))), -1)
    one = np.asarray(fn(jnp.asarray([[[3.0], [1.0], [2.0]]]), jnp.asarray([[True]])))
    np.testing.assert_array_equal(one, [[-1, 0, -1]])
    same = np.asarray(fn(jnp.ones((1, 5, 5)), jnp.ones((1, 5), bool)))       # all tied: any permutation
    assert sorted(same[0].tolist()) == [0, 1, 2, 3, 4]
    nan = np.asarray(fn(jnp.full((1, 3, 2), jnp.nan), jnp.ones((1, 2), bool)))
    assert sorted(nan[0][nan[0] >= 0].tolist()) == [0, 1]


def _loss_problem(seed=7, layers=3, b=2, q=30, k=4, g=7):
    rng = np.random.default_rng(seed)
    outputs = {'cls_scores': jnp.asarray(rng.normal(-1, 2, (layers, b, q, k)), jnp.float32),
               'bbox_preds': jnp.asarray(rng.normal(size=(layers, b, q, 10)), jnp.float32)}
    boxes = np.concatenate([rng.normal(0, 2, (b, g, 3)), rng.uniform(0.5, 4, (b, g, 3)),
                            rng.uniform(-3, 3, (b, g, 1)), rng.normal(size=(b, g, 2))], -1).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 0]], bool)[:b]
    labels = np.where(mask, rng.integers(0, k, (b, g)), -1).astype(np.int32)
    boxes[~mask] = 0.0
    return outputs, {'gt_boxes': boxes, 'gt_labels': labels, 'gt_mask': mask}


def test_detection_loss_same_with_both_matchers():
    outputs, batch = _loss_problem()
    results = {}
    for matcher in matching.MATCHERS:
        cfg = ml_collections.ConfigDict(dict(cls_weight=2.0, bbox_weight=0.25, focal_alpha=0.25, focal_gamma=2.0,
                                             code_weights=(1.0,) * 8 + (0.2, 0.2), matcher=matcher))
        results[matcher] = jax.jit(jax.value_and_grad(lambda o, cfg=cfg: losses.detection_loss(o, batch, cfg),
                                                      has_aux=True))(outputs)
    (total_s, parts_s), grads_s = results['scipy']
    (total_j, parts_j), grads_j = results['jax']
    assert float(parts_s['num_pos']) == 5.0
    for key in parts_s:
        np.testing.assert_allclose(float(parts_j[key]), float(parts_s[key]), rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(float(total_j), float(total_s), rtol=1e-6)
    for leaf_j, leaf_s in zip(jax.tree.leaves(grads_j), jax.tree.leaves(grads_s)):
        np.testing.assert_allclose(np.asarray(leaf_j), np.asarray(leaf_s), rtol=1e-5, atol=1e-7)


def test_bad_matcher_names_the_key():
    with pytest.raises(ValueError, match='matcher'):
        matching.assign(jnp.zeros((1, 2, 2)), jnp.ones((1, 2), bool), 'auction')
    config = importlib.import_module('configs.detr3d_r50').get_config('toy')
    assert config.loss.matcher == 'auto'
    config.loss.matcher = 'jax'
    validate(config)
    config.loss.matcher = 'auction'
    with pytest.raises(ConfigError, match=r"config.loss.matcher must be 'auto', 'scipy' or 'jax', got 'auction'"):
        validate(config)


@pytest.mark.slow
@pytest.mark.parametrize('num_valid', [0, 10, 50, 100, 200])
def test_training_sizes_sweep(num_valid):
    """900 queries x 200 GT slots at the training sizes: random, rank-one-like (every GT prefers the same
    queries: long augmenting paths) and non-finite costs."""
    rng = np.random.default_rng(num_valid)
    n, num_q, num_g = 4, 900, 200
    mask = np.zeros((n, num_g), bool)
    for i in range(n):
        mask[i, rng.choice(num_g, num_valid, replace=False)] = True
    uniform = rng.uniform(0, 30, (n, num_q, num_g))
    rank_one = rng.uniform(0, 10, (n, num_q, 1)) + rng.uniform(0, 10, (n, 1, num_g)) + rng.normal(0, 0.1, uniform.shape)
    nonfinite = np.where(rng.random(uniform.shape) < 0.02, np.inf, uniform)
    nonfinite[:, :5] = np.nan
    fn = jax.jit(matching.hungarian_jax)
    for cost in (uniform, rank_one, nonfinite):
        cost = cost.astype(np.float32)
        got = np.asarray(fn(jnp.asarray(cost), jnp.asarray(mask)))
        for c, m, a in zip(cost, mask, got):
            _check(c, m, a)


def test_bench_matcher_smoke(tmp_path):
    from tests.experiments import load_script
    result = load_script('bench_matcher').main(['--boxes', '3', '--queries', '12', '--slots', '4', '--layers', '2',
                                                '--inputs', 'trained', '--iters', '1', '--warmup', '0',
                                                '--out', str(tmp_path)])
    with open(tmp_path / 'bench_matcher.json') as f:
        data = json.load(f)
    assert data['benchmark'] == 'bench_matcher' and 'machine' in data
    (row,) = data['rows']
    assert row['same'] and abs(row['cost_gap']) <= 1e-5 and row['matched'] == 2 * 3
    assert row == json.loads(json.dumps(result['rows'][0]))
    assert set(row['step']) == set(row['assign']) == {'jax', 'scipy'}
