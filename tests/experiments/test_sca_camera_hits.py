import numpy as np

from configs import bevformer_tiny
from experiments.sca_camera_hits import cameras_per_query
from fd3d_jax.models.inputs import dummy_batch, image_hw
from tests.models import numpy_reference as ref


def numpy_cameras_per_query(config):
    """The hit rule restated in numpy: pillar anchors at cell centres, z at ``linspace(0.5, Z - 0.5, D) / Z`` of
    the range's height Z (the original's ``get_reference_points``), through the numpy ``point_sampling``."""
    m = config.model
    ys, xs = np.meshgrid((np.arange(m.bev_h) + 0.5) / m.bev_h, (np.arange(m.bev_w) + 0.5) / m.bev_w, indexing='ij')
    z_range = m.pc_range[5] - m.pc_range[2]
    zs = np.linspace(0.5, z_range - 0.5, m.num_points_in_pillar) / z_range
    pts = np.stack(np.broadcast_arrays(xs[None], ys[None], zs[:, None, None]), -1).reshape(len(zs), -1, 3)
    lidar2img = np.asarray(dummy_batch(config, 1, queue_length=1)['lidar2img'][0, 0], np.float64)  # (N, 4, 4)
    _, hit = ref.point_sampling(pts, m.pc_range, lidar2img, image_hw(config))                     # (N, Q, D)
    return hit.any(-1).sum(0)


def test_cameras_per_query_matches_numpy_and_the_rig_needs_two():
    """Each query's camera count equals the numpy restatement (up to anchors on an image border: float32 vs
    float64), and on the nuScenes-like rig no BEV query of tiny's full BEV hits more than two cameras while the
    overlap zones hit exactly two (a sparse SCA with K = 2 is exact there)."""
    config = bevformer_tiny.get_config('full')
    got, want = cameras_per_query(config), numpy_cameras_per_query(config)
    assert got.shape == (config.model.bev_h * config.model.bev_w,)
    assert np.mean(got != want) < 0.002, np.flatnonzero(got != want)
    assert got.max() == 2 and 0.05 < np.mean(got == 2) < 0.3 and np.mean(got == 0) < 0.01
