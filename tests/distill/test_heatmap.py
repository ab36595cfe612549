import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd3d_jax.distill import heatmap, losses

PC = (-8.0, -6.0, -5.0, 8.0, 6.0, 3.0)  # 12 x 20 grid below: cells 0.8 m (x) by 1.0 m (y)
GRID_HW = (12, 20)
OUT_HW = (19, 30)


def py_gaussian_radius(height, width, min_overlap):
    """CenterPoint / mmdet3d gaussian_radius, scalar Python."""
    b1, c1 = height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * 4 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def np_draw_heatmap_gaussian(heat, center, radius):
    """mmdet3d draw_heatmap_gaussian (with gaussian_2d) restated in numpy."""
    diameter = 2 * radius + 1
    m = (diameter - 1.0) / 2.0
    y, x = np.ogrid[-m:m + 1, -m:m + 1]
    gaussian = np.exp(-(x * x + y * y) / (2 * (diameter / 6) ** 2))
    gaussian[gaussian < np.finfo(gaussian.dtype).eps * gaussian.max()] = 0
    x, y = int(center[0]), int(center[1])
    height, width = heat.shape
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    window = heat[y - top:y + bottom, x - left:x + right]
    g = gaussian[radius - top:radius + bottom, radius - left:radius + right]
    if min(g.shape) > 0 and min(window.shape) > 0:
        np.maximum(window, g, out=window)


def np_gt_heatmap(boxes, valid, pc, grid_hw, out_hw, min_overlap=0.1, min_radius=2):
    """get_heatmaps_single + the distiller's nearest F.interpolate, looped."""
    gh, gw = grid_hw
    vx, vy = (pc[3] - pc[0]) / gw, (pc[4] - pc[1]) / gh
    out = []
    for b in range(len(boxes)):
        heat = np.zeros((gh, gw))
        for box, ok in zip(boxes[b], valid[b]):
            width, length = box[3] / vx, box[4] / vy
            if not ok or width <= 0 or length <= 0:
                continue
            radius = max(int(py_gaussian_radius(length, width, min_overlap)), min_radius)
            cx, cy = int((box[0] - pc[0]) / vx), int((box[1] - pc[1]) / vy)
            if not (0 <= cx < gw and 0 <= cy < gh):
                continue
            np_draw_heatmap_gaussian(heat, (cx, cy), radius)
        rows = [(i * gh) // out_hw[0] for i in range(out_hw[0])]
        cols = [(j * gw) // out_hw[1] for j in range(out_hw[1])]
        out.append(heat[np.ix_(rows, cols)])
    return np.stack(out)


def test_gaussian_radius_numpy_and_jnp():
    sizes = [(1.0, 1.0, 0.1), (5.6, 2.4, 0.1), (14.3, 3.1, 0.1), (2.2, 9.0, 0.5), (0.3, 0.2, 0.7)]
    want = np.array([py_gaussian_radius(*s) for s in sizes])
    h, w, o = (np.array(c) for c in zip(*sizes))
    np.testing.assert_allclose(heatmap.gaussian_radius(h, w, o), want, rtol=1e-12)
    got = jax.jit(heatmap.gaussian_radius)(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), o)
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    assert heatmap.gaussian_radius(5.6, 2.4, 0.1) == pytest.approx(want[1])


BOXES = [
    [[0.9, 0.3, 0.0, 6.5, 10.5, 1.5, 0.3],     # radius from the size (4)
     [2.1, 1.1, 0.0, 1.9, 4.2, 1.6, -1.0],     # overlaps the first: max
     [-7.7, 5.8, 0.0, 0.7, 0.8, 1.7, 0.0],     # corner cell (0, 11): window clipped
     [7.5, -5.5, 0.0, 7.0, 8.0, 3.0, 1.5],     # near the other corner, radius 3
     [3.3, -2.2, 0.0, 2.0, 4.0, 1.5, 0.0],     # invalid
     [9.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0]],     # centre off the grid: skipped
    [[-3.3, -1.7, 0.0, 0.0, 4.0, 1.5, 0.0],    # zero width: skipped
     [0.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0],
     [0.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0],
     [0.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0],
     [0.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0],
     [0.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0]],
]
VALID = [[1, 1, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0]]


def test_gt_heatmap_matches_loop():
    fn = jax.jit(functools.partial(heatmap.gt_heatmap, pc_range=PC, grid_hw=GRID_HW, out_hw=OUT_HW))
    got = np.asarray(fn(jnp.asarray(BOXES, jnp.float32), jnp.asarray(VALID, bool)))
    want = np_gt_heatmap(BOXES, VALID, PC, GRID_HW, OUT_HW)
    assert got.shape == (2, 19, 30) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert want[0].max() == 1 and np.all(want[1] == 0)
    # without resizing the two overlapping boxes give a max, not a sum
    raw = np.asarray(heatmap.gt_heatmap(jnp.asarray(BOXES, jnp.float32), jnp.asarray(VALID, bool), PC, GRID_HW, GRID_HW))
    np.testing.assert_allclose(raw, np_gt_heatmap(BOXES, VALID, PC, GRID_HW, GRID_HW), rtol=1e-6, atol=1e-7)
    assert raw[0, 11, 0] == 1 and raw.max() == 1


def test_gt_heatmap_release_sizes_and_empty():
    pc = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    boxes = [[[10.3, -20.7, 0.0, 1.9, 4.6, 1.7, 0.4], [-40.1, 33.3, 0.0, 8.1, 16.2, 3.4, 2.0],
              [0.2, 0.5, 0.0, 0.6, 0.7, 1.8, 0.0]]]
    got = np.asarray(heatmap.gt_heatmap(jnp.asarray(boxes, jnp.float32), jnp.ones((1, 3), bool), pc, (128, 128), (200, 200)))
    np.testing.assert_allclose(got, np_gt_heatmap(boxes, [[1, 1, 1]], pc, (128, 128), (200, 200)), rtol=1e-6, atol=1e-7)
    zero = heatmap.gt_heatmap(jnp.zeros((2, 0, 9)), jnp.zeros((2, 0), bool), pc, (128, 128), (200, 200))
    assert zero.shape == (2, 200, 200) and not np.asarray(zero).any()
    np.testing.assert_array_equal(heatmap.nearest_indices(128, 200), (np.arange(200) * 128) // 200)


@pytest.mark.parametrize('config_name', ['fd3d_bevformer_base_to_tiny:demo', 'fd3d_bevformer_base_to_tiny:toy',
                                         'fd3d_bevformer_base_to_small:full'])
def test_heatmap_bev_weight_is_the_released_strength_at_the_pairs_channels(config_name):
    """The weighted BEV term equals the released ``0.1 * sum (M S - M T)^2 / sum M`` (a per-cell sum over the
    expert's channels), whatever the pair's channel count: a weight converted at another count fails."""
    name, arg = config_name.split(':')
    config = importlib.import_module(f'configs.{name}').get_config(arg)
    channels = config.expert.model.embed_dims
    rng = np.random.default_rng(0)
    apprentice, expert = (rng.standard_normal((2, 6, 5, channels)).astype(np.float32) for _ in range(2))
    mask = rng.uniform(size=(2, 6, 5)).astype(np.float32) * (rng.uniform(size=(2, 6, 5)) > 0.4)
    weight = heatmap.HeatmapDistiller.weights(config.distill)['heatmap_bev']
    got = weight * float(losses.masked_l2_loss(apprentice, expert, mask))
    released = 0.1 * np.sum((mask[..., None] * apprentice - mask[..., None] * expert) ** 2) / np.sum(mask)
    np.testing.assert_allclose(got, released, rtol=1e-5)
