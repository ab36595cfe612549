import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd3d_jax.data import geometry
from fd3d_jax.distill import masks

PC = (-10.0, -6.0, -5.0, 10.0, 6.0, 3.0)  # 8 x 10 grid below: cells 2.0 m (x) by 1.5 m (y)
BEV_HW = (8, 10)
IMG_HW = (64, 96)
FEAT_HWS = ((16, 24), (8, 12), (5, 7))  # strides 4, 8 and a non-integer (12.8, 13.71)
FACES = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7))


def _box(x, y, z, w, l, h, yaw_deg, vx=0.0, vy=0.0):
    return [x, y, z, w, l, h, np.deg2rad(yaw_deg), vx, vy]


def np_bev_mask(boxes, keep, hw, pc, scale=1.0):
    """Loop restatement: cell centre inside the CCW bottom-face polygon, or cell holds the centre."""
    h, w = hw
    dx, dy = (pc[3] - pc[0]) / w, (pc[4] - pc[1]) / h
    out = np.zeros((len(boxes), h, w), np.float32)
    for b in range(len(boxes)):
        for m, box in enumerate(boxes[b]):
            if not keep[b][m]:
                continue
            box = np.array(box[:7], np.float64)
            box[3:6] *= scale
            poly = geometry.box_corners(box[None])[0, :4, :2]
            edges = [(poly[k], poly[(k + 1) % 4] - poly[k]) for k in range(4)]
            for row in range(h):
                for col in range(w):
                    p = np.array([pc[0] + (col + 0.5) * dx, pc[1] + (row + 0.5) * dy])
                    inside = all(e[0] * (p - a)[1] - e[1] * (p - a)[0] >= 0 for a, e in edges)
                    centre = (col == np.floor((box[0] - pc[0]) / dx)) and (row == np.floor((box[1] - pc[1]) / dy))
                    out[b, row, col] = max(out[b, row, col], float(inside or centre))
    return out


BEV_BOXES = [
    [_box(1.3, 0.7, 0.1, 3.1, 5.3, 1.5, 0, 3.0, 1.0),   # axis-aligned, l along x
     _box(-5.1, -2.2, 0.0, 2.3, 6.2, 1.7, 30),          # rotated 30 deg
     _box(6.7, 2.1, 0.0, 1.7, 7.1, 1.6, 90),            # 90 deg: l along y
     _box(-7.7, 4.4, 0.0, 0.3, 0.4, 0.5, 17),           # smaller than a cell
     _box(0.2, -3.3, 0.0, 9.0, 9.0, 2.0, 0)],           # dropped by keep
    [_box(-3.3, 3.1, 0.0, 1.9, 4.4, 1.5, -60),
     _box(4.4, -4.1, 0.0, 2.1, 3.6, 1.5, 135),
     _box(30.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0),            # outside the grid
     _box(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0),
     _box(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)],
]
BEV_KEEP = [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]


@pytest.mark.parametrize('scale', [1.0, 1.5])
def test_bev_box_mask_matches_loop(scale):
    fn = jax.jit(functools.partial(masks.bev_box_mask, bev_hw=BEV_HW, pc_range=PC, box_scale=scale))
    got = np.asarray(fn(jnp.asarray(BEV_BOXES, jnp.float32), jnp.asarray(BEV_KEEP, jnp.float32)))
    want = np_bev_mask(BEV_BOXES, BEV_KEEP, BEV_HW, PC, scale)
    assert got.shape == (2, 8, 10) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert want[0].sum() > 0 and want[1].sum() > 0


def test_bev_box_mask_single_boxes():
    def one(box, scale=1.0):
        return np.asarray(masks.bev_box_mask(jnp.asarray([[box]], jnp.float32), jnp.ones((1, 1)), BEV_HW, PC, scale))[0]
    tiny = one(BEV_BOXES[0][3])
    assert tiny.sum() == 1 and tiny[int((4.4 + 6) // 1.5), int((-7.7 + 10) // 2)] == 1
    # 90 deg: the 7.1 m length runs along y (rows), the 1.7 m width along x (cols).
    rot = one(BEV_BOXES[0][2])
    rows, cols = np.nonzero(rot)
    assert np.ptp(rows) + 1 >= 4 and np.ptp(cols) + 1 == 1
    flat = one(_box(6.7, 2.1, 0.0, 1.7, 7.1, 1.6, 0))
    rows, cols = np.nonzero(flat)
    assert np.ptp(rows) + 1 == 1 and np.ptp(cols) + 1 >= 3
    assert one(BEV_BOXES[0][0], 1.5).sum() > one(BEV_BOXES[0][0]).sum()


def test_box_corners_matches_geometry():
    boxes = np.array(BEV_BOXES, np.float64)
    got = np.asarray(masks.box_corners(jnp.asarray(boxes, jnp.float32)))
    want = geometry.box_corners(boxes.reshape(-1, 9)).reshape(2, 5, 8, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def cam_rig():
    """(2, 4, 4): pinholes at the LiDAR origin looking along +x and -x (f = 50 px, 96 x 64 image)."""
    k = np.array([[50.0, 0, 48.0], [0, 50.0, 32.0], [0, 0, 1]])
    fwd = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])   # columns: camera x, y, z in the LiDAR frame
    back = np.diag([-1.0, -1.0, 1.0]) @ fwd
    return np.stack([geometry.lidar2img(k, geometry.make_transform(r, np.zeros(3))) for r in (fwd, back)])


def np_clipped_hull(box, l2i, eps=1e-5):
    """Sutherland-Hodgman clip of each face against depth > eps, then the pixel min/max (or None)."""
    corners = geometry.box_corners(np.asarray(box[:7], np.float64)[None])[0]
    cam = np.concatenate([corners, np.ones((8, 1))], 1) @ l2i.T
    pts = []
    for face in FACES:
        for a, b in zip(face, face[1:] + face[:1]):
            pa, pb = cam[a, :3], cam[b, :3]
            if pa[2] > eps:
                pts.append(pa[:2] / pa[2])
            if (pa[2] > eps) != (pb[2] > eps):
                q = pa + (eps - pa[2]) / (pb[2] - pa[2]) * (pb - pa)
                pts.append(q[:2] / eps)
    if not pts:
        return None
    pts = np.array(pts)
    return np.concatenate([pts.min(0), pts.max(0)])


def np_pv_mask(boxes, keep, l2i, img_hw, feat_hws, scale=1.0):
    img_h, img_w = img_hw
    outs = [np.zeros((len(boxes), l2i.shape[1], h, w), np.float32) for h, w in feat_hws]
    for b in range(len(boxes)):
        for n in range(l2i.shape[1]):
            for m, box in enumerate(boxes[b]):
                box = np.array(box[:7], np.float64)
                box[3:6] *= scale
                hull = np_clipped_hull(box, l2i[b, n])
                if not keep[b][m] or hull is None:
                    continue
                u0, v0 = max(hull[0], 0), max(hull[1], 0)
                u1, v1 = min(hull[2], img_w), min(hull[3], img_h)
                if u1 <= u0 or v1 <= v0:
                    continue
                for out, (h, w) in zip(outs, feat_hws):
                    sx, sy = img_w / w, img_h / h
                    for i in range(h):
                        for j in range(w):
                            if u0 < (j + 1) * sx and u1 >= j * sx and v0 < (i + 1) * sy and v1 >= i * sy:
                                out[b, n, i, j] = 1
    return outs


PV_BOXES = [
    [_box(12.3, 1.1, 0.2, 1.9, 4.3, 1.6, 20, 1.0, 2.0),  # in view of the front camera
     _box(0.53, -3.1, 0.05, 2.0, 4.1, 2.0, 0),           # straddles both cameras' image planes
     _box(10.2, -9.3, 0.1, 2.1, 2.2, 1.9, 10),           # partly off the right edge (front)
     _box(60.0, 0.31, 0.21, 0.1, 0.1, 0.1, 0)],          # tiny and far (front)
    [_box(-14.0, 2.3, 0.3, 2.0, 4.5, 1.7, 70),           # behind the front camera: back camera only
     _box(20.0, 40.0, 0.0, 2.0, 4.0, 1.5, 0),            # off both images
     _box(8.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0),              # dropped by keep
     _box(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)],
]
PV_KEEP = [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize('scale', [1.0, 1.5])
def test_pv_box_mask_matches_loop(scale):
    l2i = np.broadcast_to(cam_rig(), (2, 2, 4, 4))
    fn = jax.jit(functools.partial(masks.pv_box_mask, img_hw=IMG_HW, feat_hws=FEAT_HWS, box_scale=scale))
    got = fn(jnp.asarray(PV_BOXES, jnp.float32), jnp.asarray(PV_KEEP, jnp.float32), jnp.asarray(l2i, jnp.float32))
    want = np_pv_mask(PV_BOXES, PV_KEEP, l2i, IMG_HW, FEAT_HWS, scale)
    assert len(got) == 3
    for g, w, (h, wd) in zip(got, want, FEAT_HWS):
        assert g.shape == (2, 2, h, wd) and g.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(g), w)
    assert want[0][1, 1].sum() > 0 and want[0][1, 0].sum() == 0  # sample 1: only the back camera


def _single(box, cam, feat_hws=FEAT_HWS):
    l2i = jnp.asarray(cam_rig()[None, cam:cam + 1], jnp.float32)
    out = masks.pv_box_mask(jnp.asarray([[box]], jnp.float32), jnp.ones((1, 1)), l2i, IMG_HW, feat_hws)
    return [np.asarray(o)[0, 0] for o in out]


def test_pv_box_partly_behind_uses_the_near_plane_clip():
    box = PV_BOXES[0][1]
    # Front camera: the corners in front (depth 2.58) span u in [48 + 50 * 2.1 / 2.58, ...] ~ [88.7, ..]
    # and v ~ [11.7, 50.4]; the edges cut at the near plane run off to +u and both v borders, so the
    # clipped hull is u in [88.7, 96], v in [0, 64]: the last two stride-4 columns, every row.
    got = _single(box, 0)[0]
    want = np.zeros((16, 24))
    want[:, 22:] = 1
    np.testing.assert_array_equal(got, want)
    hull = np_clipped_hull(box, cam_rig()[0])
    corners = geometry.box_corners(np.asarray(box[:7])[None])[0]
    uv, _, front = geometry.project_points(corners, cam_rig()[0])
    naive = np.concatenate([uv[front].min(0), uv[front].max(0)])
    assert hull[1] < 0 and hull[3] > 64 and 10 < naive[1] < naive[3] < 54  # corners alone are wrong
    np.testing.assert_allclose(hull[0], naive[0])
    # The back camera's in-front half (depth <= 1.52, lateral <= -2.1) is at u <= 48 - 50 * 2.1 / 1.52 < 0,
    # and its near-plane cuts run off to -u: off the image.
    assert _single(box, 1)[0].sum() == 0


def test_pv_box_edge_cases():
    behind = _single(PV_BOXES[1][0], 0)
    assert all(m.sum() == 0 for m in behind)
    assert all(m.sum() > 0 for m in _single(PV_BOXES[1][0], 1))
    tiny = _single(PV_BOXES[0][3], 0)
    assert all(1 <= m.sum() <= 4 for m in tiny)
    off = _single(PV_BOXES[0][2], 0, ((64, 96),))[0]  # stride 1: the hull reaches the right border
    cols = np.nonzero(off.any(0))[0]
    assert cols.max() == 95 and 80 < cols.min() < 90


def test_select_queries():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 7, 3)).astype(np.float32)
    scores = (1 / (1 + np.exp(-logits.astype(np.float64)))).max(-1)
    for rule, kwargs, want in [
            ('score', dict(score_thresh=0.6), scores >= 0.6),
            ('topk', dict(topk=3), scores >= np.sort(scores, -1)[:, -3:-2]),
            ('topk', dict(topk=100), np.ones((2, 7), bool))]:
        fn = jax.jit(functools.partial(masks.select_queries, rule=rule, **kwargs))
        keep, got_scores = fn(jnp.asarray(logits))
        assert keep.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(keep), want.astype(np.float32))
        np.testing.assert_allclose(np.asarray(got_scores), scores, rtol=1e-6)
    assert 0 < (scores >= 0.6).sum() < 14
    matched = rng.uniform(size=(2, 7)) < 0.4
    fn = jax.jit(lambda x, m: masks.select_queries(x, 'gt', matched=m))
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(logits), jnp.asarray(matched))[0]), matched)
    with pytest.raises(ValueError, match='distill.mask.select'):
        masks.select_queries(jnp.asarray(logits), 'nearest')
    with pytest.raises(ValueError, match='distill.mask.select'):
        masks.select_queries(jnp.asarray(logits), 'gt')


def test_random_mask_ratio_and_shared_over_channels():
    mask = masks.random_mask(jax.random.PRNGKey(0), (4, 64, 64, 8), 0.65)
    assert mask.shape == (4, 64, 64, 1) and mask.dtype == jnp.float32
    mask = np.asarray(mask)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert abs((1 - mask).mean() - 0.65) < 0.02
    x = np.ones((4, 64, 64, 8), np.float32) * mask  # broadcast over C: every channel equal
    assert np.all(x == x[..., :1])
    # Leading camera axis; ratio 0 keeps everything, ratio 1 drops everything.
    shape = (2, 6, 8, 8, 4)
    assert masks.random_mask(jax.random.PRNGKey(1), shape, 0.5).shape == (2, 6, 8, 8, 1)
    assert np.all(masks.random_mask(jax.random.PRNGKey(2), shape, 0.0) == 1)
    assert np.all(masks.random_mask(jax.random.PRNGKey(2), shape, 1.0) == 0)
