import numpy as np
import pytest
from pyquaternion import Quaternion

from fd3d_jax.data import geometry
from fd3d_jax.data import rig


def test_quaternions_match_pyquaternion():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        np.testing.assert_allclose(geometry.quat_to_matrix(q), Quaternion(q).rotation_matrix, atol=1e-12)
        back = geometry.matrix_to_quat(geometry.quat_to_matrix(q))
        np.testing.assert_allclose(back, q if q[0] >= 0 else -q, atol=1e-12)
    yaw = 2.5
    assert geometry.matrix_yaw(geometry.quat_to_matrix(geometry.yaw_to_quat(yaw))) == pytest.approx(yaw)
    assert Quaternion(geometry.yaw_to_quat(yaw)).yaw_pitch_roll[0] == pytest.approx(yaw)


def test_invert_transform():
    t = geometry.make_transform(geometry.yaw_to_quat(0.7), [1.0, -2.0, 3.0])
    np.testing.assert_allclose(geometry.invert_transform(t) @ t, np.eye(4), atol=1e-12)


def test_box_corners_and_transform_boxes():
    box = np.array([[1.0, 2.0, 0.5, 2.0, 4.0, 1.0, np.pi / 2]])  # w=2, l=4, heading +y
    corners = geometry.box_corners(box)[0]
    # the length runs along +y: the front-left bottom corner is at (x - w/2, y + l/2)
    np.testing.assert_allclose(corners[0], [0.0, 4.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(corners[4], [0.0, 4.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(corners.mean(0), box[0, :3], atol=1e-12)
    t = geometry.make_transform(geometry.yaw_to_quat(np.pi / 2), [10.0, 0.0, 0.0])
    moved, vel = geometry.transform_boxes(t, box, np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(moved[0, :3], [8.0, 1.0, 0.5], atol=1e-12)
    assert moved[0, 6] == pytest.approx(-np.pi)  # wrapped to [-pi, pi)
    np.testing.assert_allclose(vel[0], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(geometry.box_corners(moved)[0][[0, 4]],
                               geometry.transform_points(t, corners[[0, 4]]), atol=1e-12)


def test_lidar2img_projects_a_known_point():
    """A point 10 m straight ahead of CAM_FRONT lands on its principal point; 1 m to its right
    lands fx/10 pixels right of it. Worked by hand from the rig: LIDAR_TOP is at (0.943, 0, 1.84)
    in the ego frame with x right / y forward, CAM_FRONT at (1.70, 0.016, 1.51) looking along ego +x."""
    cam = rig.camera_rig(1600, 900)['CAM_FRONT']
    lidar = rig.lidar_calibration()['LIDAR_TOP']
    cam2ego = geometry.make_transform(cam['rotation'], cam['translation'])
    lidar2ego = geometry.make_transform(lidar['rotation'], lidar['translation'])
    sensor2lidar = geometry.invert_transform(lidar2ego) @ cam2ego
    ahead = np.array([-0.016, 1.70 + 10.0 - 0.943, 1.51 - 1.84])  # in the LiDAR frame
    right = ahead + [1.0, 0.0, 0.0]
    for scale in (1.0, 0.5):
        l2i = geometry.lidar2img(cam['intrinsic'], sensor2lidar, scale)
        uv, depth, mask = geometry.project_points(np.stack([ahead, right]), l2i, (900 * scale, 1600 * scale))
        np.testing.assert_allclose(uv[0], [816.3 * scale, 491.5 * scale], atol=1e-9)
        np.testing.assert_allclose(uv[1], [(816.3 + 126.64) * scale, 491.5 * scale], atol=1e-9)
        np.testing.assert_allclose(depth, [10.0, 10.0], atol=1e-9)
        assert mask.all()
    behind = np.array([0.0, -10.0, 0.0])
    assert not geometry.project_points(behind[None], l2i)[2][0]


def test_can_bus_vector_and_delta():
    e2g = geometry.make_transform(geometry.yaw_to_quat(-np.pi / 2), [100.0, 200.0, 0.0])
    cb = geometry.can_bus_vector(e2g, dict(accel=[1, 2, 3], rotation_rate=[4, 5, 6], vel=[7, 8, 9]))
    np.testing.assert_allclose(cb[:3], [100, 200, 0])
    np.testing.assert_allclose(cb[3:7], geometry.yaw_to_quat(-np.pi / 2) * np.sign(geometry.yaw_to_quat(-np.pi / 2)[0]))
    np.testing.assert_allclose(cb[7:16], np.arange(1, 10))
    assert cb[17] == pytest.approx(270.0)  # yaw mapped to [0, 360) degrees
    assert cb[16] == pytest.approx(np.radians(270.0))
    prev = cb.copy()
    prev[:3] -= [1.0, 2.0, 0.0]
    prev[17] -= 5.0
    d = geometry.can_bus_delta(cb, prev)
    np.testing.assert_allclose(d[:3], [1.0, 2.0, 0.0])
    assert d[17] == pytest.approx(5.0) and d[16] == pytest.approx(cb[16])
    first = geometry.can_bus_delta(cb, None)
    assert (first[:3] == 0).all() and first[17] == 0 and first[16] == cb[16]
