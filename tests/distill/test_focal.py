"""Focal features (distill/focal.py) against numpy restatements of the distill branch."""
import jax
import numpy as np

from fd3d_jax.distill.focal import bev_focal_features, pv_focal_features
from fd3d_jax.distill.losses import focal_loss
from tests.models import numpy_reference as ref


def _bev_case(seed=0, b=2, h=5, w=7, c=8, m=2, q=3, p=4, layers=2):
    rng = np.random.default_rng(seed)
    head = {f'layers_{l}': {'cross_attn': {'attn': {'value_proj': {
        'kernel': rng.normal(size=(c, c)).astype(np.float32), 'bias': rng.normal(size=(c,)).astype(np.float32)}}}}
        for l in range(layers)}
    sampling = []
    for _ in range(layers):
        loc = rng.uniform(-0.1, 1.1, size=(b, q, m, 1, p, 2)).astype(np.float32)
        wts = rng.dirichlet(np.ones(p), size=(b, q, m, 1)).astype(np.float32)
        sampling.append(dict(sampling_locations=loc, attention_weights=wts))
    bev_t = rng.normal(size=(b, h, w, c)).astype(np.float32)
    bev_s = rng.normal(size=(b, h, w, c)).astype(np.float32)
    return head, sampling, bev_t, bev_s, m


def test_bev_focal_features_match_the_distill_branch():
    head, sampling, bev_t, bev_s, m = _bev_case()
    fs, ft = bev_focal_features(head, sampling, bev_s, bev_t, m)
    b, h, w, c = bev_t.shape
    for l, smp in enumerate(sampling):
        vp = head[f'layers_{l}']['cross_attn']['attn']['value_proj']
        for feat, bev in ((ft, bev_t), (fs, bev_s)):
            for bi in range(b):
                value = ref.dense(bev[bi].reshape(h * w, c).astype(np.float64), vp).reshape(h * w, m, c // m)
                want = ref.msda(value, [(h, w)], smp['sampling_locations'][bi].astype(np.float64),
                                smp['attention_weights'][bi].astype(np.float64))
                np.testing.assert_allclose(np.asarray(feat[l, bi]), want, rtol=1e-4, atol=1e-4)


def test_focal_features_equal_for_identical_bevs_and_no_gradient_to_the_head():
    head, sampling, bev_t, _, m = _bev_case(1)
    fs, ft = bev_focal_features(head, sampling, bev_t, bev_t, m)
    np.testing.assert_array_equal(np.asarray(ft), np.asarray(fs))
    assert float(focal_loss(fs, ft)) == 0.0

    bev_s = bev_t + 0.1

    def loss(head, sampling, bev_s):
        return focal_loss(*bev_focal_features(head, sampling, bev_s, bev_t, m))

    g_head, g_smp, g_bev = jax.grad(loss, argnums=(0, 1, 2))(head, sampling, bev_s)
    # value_proj, locations and weights must get no gradient (else the loss could be zeroed by shrinking them)
    for leaf in jax.tree_util.tree_leaves((g_head, g_smp)):
        assert not np.any(np.asarray(leaf))
    assert np.abs(np.asarray(g_bev)).sum() > 0


def test_pv_focal_features_sum_projected_samples_over_shared_levels():
    rng = np.random.default_rng(2)
    b, n, q, c = 1, 2, 3, 4
    shapes = [(4, 6), (2, 3), (1, 2)]
    feats_t = [rng.normal(size=(b, n, hh, ww, c)).astype(np.float32) for hh, ww in shapes]
    feats_s = [rng.normal(size=(b, n, hh, ww, c)).astype(np.float32) for hh, ww in shapes]
    feats_s[2] = None                                          # the apprentice has no level of this size
    points = rng.uniform(0, 1, size=(b, n, q, 2)).astype(np.float32)
    weights = rng.uniform(0, 1, size=(b, q, n, 1, 3)).astype(np.float32)
    sampling = [dict(points=points, weights=weights, mask=np.ones((b, n, q), bool))]
    fs, ft = pv_focal_features(sampling, feats_s, feats_t)
    for feat, feats in ((ft, feats_t), (fs, feats_s)):
        want = np.zeros((q, c))
        for cam in range(n):
            for lvl in (0, 1):                                 # level 2 is left out of both sums
                hh, ww = shapes[lvl]
                for qi in range(q):
                    x, y = points[0, cam, qi]
                    want[qi] += weights[0, qi, cam, 0, lvl] * ref.bilinear_sample(
                        feats[lvl][0, cam].astype(np.float64), y * hh - 0.5, x * ww - 0.5)
        np.testing.assert_allclose(np.asarray(feat[0, 0]), want, rtol=1e-5, atol=1e-5)
    same_s, same_t = pv_focal_features(sampling, [feats_t[0], feats_t[1], None], feats_t)
    np.testing.assert_array_equal(np.asarray(same_t), np.asarray(same_s))
