import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data import rig
from fd3d_jax.models import spatial_cross_attention as sca_lib
from tests.models import numpy_reference as ref

PC = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
IMG_HW = (96, 160)


def rig_lidar2img(width=160, height=90):
    """(6, 4, 4) lidar2img of the synthetic nuScenes-like rig."""
    lidar = rig.lidar_calibration()['LIDAR_TOP']
    lidar2ego = geometry.make_transform(lidar['rotation'], lidar['translation'])
    return np.stack([geometry.lidar2img(c['intrinsic'], geometry.invert_transform(lidar2ego)
                                        @ geometry.make_transform(c['rotation'], c['translation']))
                     for c in rig.camera_rig(width, height).values()])


def randomize(params, seed=0, scale=0.3):
    """Random values for every leaf (init makes offsets/weights trivial)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [jnp.asarray(rng.normal(0, scale, x.shape), x.dtype) for x in leaves])


def test_pillar_reference_points():
    r = sca_lib.reference_points_3d(3, 4, 4, 8.0)
    assert r.shape == (4, 12, 3)
    np.testing.assert_allclose(r[:, 0, 2] * 8 - 5, [-4.5, -2.5 + 1 / 3, 0.5 - 1 / 3, 2.5], atol=1e-6)
    i, j = 2, 3
    np.testing.assert_allclose(r[1, i * 4 + j, :2], [(j + 0.5) / 4, (i + 0.5) / 3])
    np.testing.assert_allclose(sca_lib.reference_points_2d(3, 4), r[0, :, :2])


def test_point_sampling_matches_numpy_and_a_known_pixel():
    l2i = rig_lidar2img()
    r3d = sca_lib.reference_points_3d(8, 10, 4, 8.0)
    uv, mask = sca_lib.point_sampling(r3d, PC, jnp.asarray(l2i[None], jnp.float32), IMG_HW)
    want_uv, want_mask = ref.point_sampling(r3d.astype(np.float64), PC, l2i, IMG_HW)
    np.testing.assert_array_equal(np.asarray(mask[0]), want_mask)
    np.testing.assert_allclose(np.asarray(uv[0])[want_mask], want_uv[want_mask], rtol=1e-4, atol=1e-5)
    assert want_mask.any() and not want_mask.all()
    # A point 10 m straight ahead of CAM_FRONT (LiDAR frame: x right, y forward) lands on its
    # principal point (816.3, 491.5) * 0.1, normalised by the padded image; one behind it is masked.
    ahead = np.array([-0.016, 1.70 + 10.0 - 0.943, 1.51 - 1.84])
    behind = np.array([0.0, -20.0, 0.0])
    pts = (np.stack([ahead, behind]) - np.array(PC[:3])) / (np.array(PC[3:]) - np.array(PC[:3]))
    uv, mask = sca_lib.point_sampling(pts[:, None, :], PC, jnp.asarray(l2i[None, :1], jnp.float32), IMG_HW)
    np.testing.assert_allclose(np.asarray(uv[0, 0, 0, 0]), [81.63 / 160, 49.15 / 96], rtol=1e-5)
    assert mask.shape == (1, 1, 1, 2) and bool(mask[0, 0, 0, 0]) and not bool(mask[0, 0, 0, 1])


def test_dense_sca_equals_the_original_rebatching():
    c, m, p, d = 16, 2, 8, 4
    shapes = ((6, 10), (3, 5))
    s = sum(h * w for h, w in shapes)
    bev_h, bev_w = 8, 10
    rng = np.random.default_rng(0)
    l2i = rig_lidar2img()
    ref_cam, bev_mask = sca_lib.point_sampling(sca_lib.reference_points_3d(bev_h, bev_w, 4, 8.0), PC,
                                               jnp.asarray(l2i[None], jnp.float32), IMG_HW)
    bev_mask = bev_mask.at[:, 0].set(False)  # no CAM_FRONT hits: cells seen only by it are unhit
    query = rng.normal(size=(1, bev_h * bev_w, c)).astype(np.float32)
    feats = rng.normal(size=(1, 6, s, c)).astype(np.float32)
    module = sca_lib.SpatialCrossAttention(c, m, len(shapes), p, d, dropout=0.1)
    params = module.init(jax.random.PRNGKey(0), query, feats, shapes, ref_cam, bev_mask)['params']
    params = randomize(params)
    out, sampling = module.apply({'params': params}, query, feats, shapes, ref_cam, bev_mask)
    want = ref.sca_rebatch(jax.tree_util.tree_map(np.asarray, params), query[0].astype(np.float64),
                           feats[0].astype(np.float64), shapes, np.asarray(ref_cam[0], np.float64),
                           np.asarray(bev_mask[0]), m, p, d)
    np.testing.assert_allclose(np.asarray(out[0]), want, rtol=2e-4, atol=2e-4)
    hits = np.asarray(bev_mask[0]).any(-1).sum(0)
    assert (hits == 0).any() and (hits >= 2).any()  # covers unhit cells and the averaging
    assert sampling['sampling_locations'].shape == (1, 6, bev_h * bev_w, m, len(shapes), p, 2)


def test_sca_batch0_hits_quirk():
    """With ``sca_batch0_hits`` every batch element sums over element 0's hit lists and divides by its own hit
    count (the original: ``mask_per_img[0]`` picks the queries, ``count = bev_mask.sum(-1) > 0`` per element)."""
    c, shapes = 8, ((6, 10),)
    rng = np.random.default_rng(1)
    l2i = rig_lidar2img()
    l2i_b = np.stack([l2i, l2i[[0, 1, 2, 3, 5, 5]]])  # element 1: camera 5 in slot 4 too (other hits and counts)
    ref_cam, bev_mask = sca_lib.point_sampling(sca_lib.reference_points_3d(8, 10, 4, 8.0), PC, jnp.asarray(l2i_b, jnp.float32), IMG_HW)
    query = rng.normal(size=(2, 80, c)).astype(np.float32)
    feats = rng.normal(size=(2, 6, 60, c)).astype(np.float32)
    args = (query, feats, shapes, ref_cam, bev_mask)
    fixed = sca_lib.SpatialCrossAttention(c, 2, 1, 8, 4)
    quirk = sca_lib.SpatialCrossAttention(c, 2, 1, 8, 4, sca_batch0_hits=True)
    params = randomize(fixed.init(jax.random.PRNGKey(0), *args)['params'])
    a, _ = fixed.apply({'params': params}, *args)
    b, _ = quirk.apply({'params': params}, *args)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-6)
    assert not np.allclose(np.asarray(a[1]), np.asarray(b[1]))
    want = ref.sca_rebatch(jax.tree_util.tree_map(np.asarray, params), query[1].astype(np.float64),
                           feats[1].astype(np.float64), shapes, np.asarray(ref_cam[1], np.float64),
                           np.asarray(bev_mask[0]), 2, 8, 4, count_mask=np.asarray(bev_mask[1]))
    np.testing.assert_allclose(np.asarray(b[1]), want, rtol=2e-4, atol=2e-4)
    counts = np.asarray(bev_mask).any(-1).sum(1)                                   # (B, Q): the two differ
    assert (counts[0] != counts[1]).any()


def _two_element_inputs(seed=2, c=8):
    """A batch of two on the rig: element 0 without CAM_FRONT hits (unhit queries), element 1 with camera 5 in
    slot 4 too (queries hitting up to three cameras)."""
    rng = np.random.default_rng(seed)
    l2i = rig_lidar2img()
    l2i_b = np.stack([l2i, l2i[[0, 1, 2, 3, 5, 5]]])
    ref_cam, bev_mask = sca_lib.point_sampling(sca_lib.reference_points_3d(8, 10, 4, 8.0), PC,
                                               jnp.asarray(l2i_b, jnp.float32), IMG_HW)
    bev_mask = bev_mask.at[0, 0].set(False)
    shapes = ((6, 10), (3, 5))
    query = rng.normal(size=(2, 80, c)).astype(np.float32)
    feats = rng.normal(size=(2, 6, 75, c)).astype(np.float32)
    return query, feats, shapes, ref_cam, bev_mask


def test_sparse_sca_equals_dense_when_no_query_hits_more_than_k():
    """``max_cameras=K`` with every query hitting <= K cameras: the dense outputs and the gradients of params
    and image features, for each batch element (element 1's slots read its own cameras' features)."""
    query, feats, shapes, ref_cam, bev_mask = _two_element_inputs()
    hits = np.asarray(bev_mask).any(-1).sum(1)                                      # (B, Q)
    assert list(hits.max(1)) == [2, 3] and (hits == 0).any()
    dense = sca_lib.SpatialCrossAttention(8, 2, 2, 8, 4)
    params = randomize(dense.init(jax.random.PRNGKey(0), query, feats, shapes, ref_cam, bev_mask)['params'])

    def loss(module, p, f):
        out, _ = module.apply({'params': p}, query, f, shapes, ref_cam, bev_mask)
        return (out * jnp.linspace(-1, 1, out.size).reshape(out.shape)).sum(), out

    (_, want), want_grads = jax.value_and_grad(lambda p, f: loss(dense, p, f), (0, 1), has_aux=True)(params, feats)
    for k in (3, 4, 6):
        sparse = sca_lib.SpatialCrossAttention(8, 2, 2, 8, 4, max_cameras=k)
        (_, got), grads = jax.value_and_grad(lambda p, f: loss(sparse, p, f), (0, 1), has_aux=True)(params, feats)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=f'K={k}')
        for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=f'K={k}')
        _, aux = sparse.apply({'params': params}, query, feats, shapes, ref_cam, bev_mask)
        assert not np.asarray(aux['dropped']).any()


def test_sparse_sca_above_k_keeps_the_lowest_index_cameras_and_counts_the_rest():
    """K = 1 with queries hitting up to three cameras: each query averages over its lowest-index hit camera only
    (the numpy rebatching with the other hits removed), ``dropped`` counts the removed hits."""
    query, feats, shapes, ref_cam, bev_mask = _two_element_inputs()
    sparse = sca_lib.SpatialCrossAttention(8, 2, 2, 8, 4, max_cameras=1)
    params = randomize(sparse.init(jax.random.PRNGKey(0), query, feats, shapes, ref_cam, bev_mask)['params'])
    out, aux = sparse.apply({'params': params}, query, feats, shapes, ref_cam, bev_mask)
    hit = np.asarray(bev_mask).any(-1)                                               # (B, N, Q)
    first = hit & (np.cumsum(hit, 1) == 1)                                           # lowest-index hit camera
    np.testing.assert_array_equal(np.asarray(aux['dropped']), hit.sum(1) - first.sum(1))
    assert list(np.asarray(aux['dropped']).max(1)) == [1, 2]
    for b in range(2):
        kept_mask = np.asarray(bev_mask[b]) & first[b][..., None]
        want = ref.sca_rebatch(jax.tree_util.tree_map(np.asarray, params), query[b].astype(np.float64),
                               feats[b].astype(np.float64), shapes, np.asarray(ref_cam[b], np.float64), kept_mask, 2, 8, 4)
        np.testing.assert_allclose(np.asarray(out[b]), want, rtol=2e-4, atol=2e-4, err_msg=f'element {b}')
