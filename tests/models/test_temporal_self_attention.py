import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.models import spatial_cross_attention as sca_lib
from fd3d_jax.models import temporal_self_attention as tsa_lib
from tests.models import numpy_reference as ref
from tests.models.test_spatial_cross_attention import randomize

BEV_HW = (8, 10)


def _tsa_inputs(seed=0, c=16):
    rng = np.random.default_rng(seed)
    q = BEV_HW[0] * BEV_HW[1]
    query = rng.normal(size=(1, q, c)).astype(np.float32)
    pos = rng.normal(size=(1, q, c)).astype(np.float32)
    prev = rng.normal(size=(1, q, c)).astype(np.float32)
    return query, pos, prev


def test_tsa_matches_numpy_with_history_and_without():
    query, pos, prev = _tsa_inputs()
    ref2d = jnp.asarray(sca_lib.reference_points_2d(*BEV_HW))
    shift = jnp.asarray([[0.03, -0.05]], jnp.float32)
    module = tsa_lib.TemporalSelfAttention(16, num_heads=2, num_points=4)
    for exists in (True, False):
        hybrid = tsa_lib.hybrid_reference_points(ref2d, shift, jnp.asarray([exists]))
        value = np.stack([prev, query], 1) if exists else np.stack([query, query], 1)
        params = randomize(module.init(jax.random.PRNGKey(0), query, pos, value, hybrid, BEV_HW)['params'])
        out, sampling = module.apply({'params': params}, query, pos, value, hybrid, BEV_HW)
        want = ref.tsa(jax.tree_util.tree_map(np.asarray, params), query[0].astype(np.float64),
                       pos[0].astype(np.float64), value[0].astype(np.float64), np.asarray(hybrid[0], np.float64),
                       BEV_HW, 2, 4)
        np.testing.assert_allclose(np.asarray(out[0]), want, rtol=2e-4, atol=2e-4)
        expected_prev_ref = np.asarray(ref2d) + (np.asarray(shift[0]) if exists else 0.0)
        np.testing.assert_allclose(np.asarray(hybrid[0, 0]), expected_prev_ref, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(hybrid[0, 1]), np.asarray(ref2d))


def test_shift_bug_flag_shifts_both_halves():
    ref2d = jnp.asarray(sca_lib.reference_points_2d(*BEV_HW))
    shift = jnp.asarray([[0.1, 0.2]])
    h = tsa_lib.hybrid_reference_points(ref2d, shift, jnp.asarray([True]), reproduce_shift_bug=True)
    np.testing.assert_allclose(np.asarray(h[0, 1]), np.asarray(ref2d) + [0.1, 0.2], rtol=1e-6)


def test_rotation_is_an_exact_permutation():
    img = np.arange(64).reshape(8, 8)
    for angle, k in ((90.0, 1), (-90.0, -1), (180.0, 2), (0.0, 0)):
        idx, valid = geometry.bev_rotation_index(angle, (8, 8), (4, 4))
        assert valid.all()
        rotated = np.asarray(tsa_lib.rotate_bev(jnp.asarray(img.reshape(1, 64, 1)), jnp.asarray(idx[None]),
                                                jnp.asarray(valid[None])))[0, :, 0].reshape(8, 8)
        np.testing.assert_array_equal(rotated, np.rot90(img, k))  # counter-clockwise as displayed
    # Non-square 8x10 about its true centre: 180 degrees flips both axes.
    img = np.arange(80).reshape(8, 10)
    idx, valid = geometry.bev_rotation_index(180.0, (8, 10), (5, 4))
    np.testing.assert_array_equal(img.reshape(-1)[idx].reshape(8, 10), img[::-1, ::-1])
    # The original's fixed centre (100, 100) on a 50x50 BEV rotates about a point off the map:
    # most sources fall outside and read zeros.
    idx, valid = geometry.bev_rotation_index(30.0, (50, 50), (100, 100))
    assert valid.mean() < 0.5


def test_forward_motion_by_one_cell_shifts_samples_by_one_cell():
    """Ego moving one cell forward (any heading): the previous-BEV references move +1 cell in y,
    where the same world point was one cell ahead in the previous frame."""
    for yaw in (0.0, 1.0, -2.5):
        cb = np.zeros(18)
        cell = 102.4 / BEV_HW[0]
        cb[0], cb[1] = cell * np.cos(yaw), cell * np.sin(yaw)
        cb[16] = yaw % (2 * np.pi)
        shift = geometry.bev_shift(cb, BEV_HW)
        np.testing.assert_allclose(shift, [0.0, 1.0 / BEV_HW[0]], atol=1e-12)
    query, pos, _ = _tsa_inputs()
    ref2d = jnp.asarray(sca_lib.reference_points_2d(*BEV_HW))
    shift = jnp.asarray([[0.0, 1.0 / BEV_HW[0]]], jnp.float32)
    hybrid = tsa_lib.hybrid_reference_points(ref2d, shift, jnp.asarray([True]))
    module = tsa_lib.TemporalSelfAttention(16, num_heads=2, num_points=4)
    value = np.stack([query, query], 1)
    params = module.init(jax.random.PRNGKey(0), query, pos, value, hybrid, BEV_HW)['params']
    _, sampling = module.apply({'params': params}, query, pos, value, hybrid, BEV_HW)
    loc = np.asarray(sampling['sampling_locations'][0])  # (2, Q, M, 1, P, 2)
    # at init both queue halves get the same offsets: the difference is exactly one cell in y
    np.testing.assert_allclose(loc[0] - loc[1], np.broadcast_to([0.0, 1.0 / BEV_HW[0]], loc[0].shape), atol=1e-6)
