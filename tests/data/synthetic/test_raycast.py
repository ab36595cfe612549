import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data import rig
from fd3d_jax.data.synthetic import raycast, render


def test_ray_box_distance_axis_aligned_and_rotated():
    box = np.array([10.0, 0.0, 1.0, 2.0, 4.0, 2.0, 0.0])  # length 4 along x
    dirs = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    origin = np.array([0.0, 0.0, 1.0])
    t = raycast.ray_box_distance(origin, dirs, box)
    assert t[0] == 8.0 and t[1] == 8.0  # front face at x = 8
    assert np.isinf(t[2]) and np.isinf(t[3])
    rotated = box.copy()
    rotated[6] = np.pi / 2  # now 4 m along y, 2 m along x: front face at x = 9
    assert raycast.ray_box_distance(origin, dirs[:1], rotated)[0] == 9.0
    inside = raycast.ray_box_distance(box[:3], dirs[:1], box)
    assert np.isinf(inside[0])


def test_ground_distance():
    t = raycast.ground_distance(np.array([0.0, 0.0, 2.0]), np.array([[1.0, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    assert t[0] == 2.0 and np.isinf(t[1])


def test_lidar_window_culling_equals_brute_force():
    """The per-box azimuth/elevation windows must not change any return of the lidar."""
    rng = np.random.default_rng(3)
    boxes = []
    for _ in range(40):
        x, y = rng.uniform(-40, 40, 2)
        if np.hypot(x, y) < 4:
            continue
        w, l, h = rng.uniform(0.4, 3.0), rng.uniform(0.4, 12.0), rng.uniform(0.8, 4.0)
        boxes.append([x, y, h / 2, w, l, h, rng.uniform(-np.pi, np.pi)])
    boxes = np.asarray(boxes)
    labels = np.zeros(len(boxes), int)
    lidar2global = geometry.make_transform(geometry.yaw_to_quat(0.3), [0.5, -0.2, 1.84])
    points, counts = render.lidar_sweep(lidar2global, boxes, labels, np.random.default_rng(0))

    elev = np.radians(rig.LIDAR_ELEVATIONS_DEG)
    az = np.arange(rig.LIDAR_AZIMUTH_STEPS) * (2 * np.pi / rig.LIDAR_AZIMUTH_STEPS) - np.pi
    ring, az = np.meshgrid(np.arange(len(elev)), az, indexing='ij')
    e = elev[ring]
    dirs = np.stack([np.cos(e) * np.cos(az), np.cos(e) * np.sin(az), np.sin(e)], -1).reshape(-1, 3) @ lidar2global[:3, :3].T
    origin = lidar2global[:3, 3]
    t_all = np.stack([raycast.ground_distance(origin, dirs)] +
                     [raycast.ray_box_distance(origin, dirs, b) for b in boxes], 1)
    first = np.argmin(t_all, 1)
    hit = t_all.min(1) < rig.LIDAR_MAX_RANGE
    expected = np.bincount(first[hit & (first > 0)] - 1, minlength=len(boxes))
    np.testing.assert_array_equal(counts, expected)
    assert len(points) == hit.sum()
    assert counts.sum() > 100
