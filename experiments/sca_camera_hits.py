"""How many cameras each BEV query of spatial cross-attention hits, per config: the ``K`` a sparse SCA needs.

    python experiments/sca_camera_hits.py [--configs bevformer_tiny:full bevformer_small:full ...] [--out]

For each config: the BEV pillars of its model (``pillar_points``: ``bev_h x bev_w`` queries, ``num_points_in_pillar``
anchors over the range's height) projected with the model's own ``point_sampling`` through the nuScenes-like rig
(``fd3d_jax.data.rig``, at the config's image scale and padded size, as ``dummy_batch``); a query hits a camera
when any of its anchors lands in front of it and inside its image (the ``bev_mask`` of the original). Prints the
histogram of cameras hit per query and its maximum ``K``: a sparse SCA with ``K`` camera slots per query is exact
for this rig. The rig is one vehicle's calibration; real nuScenes logs differ by a few centimetres and tenths of a
degree, so a margin on ``K`` (or the dataset's own calibrations) decides a production setting.
"""
import argparse

import numpy as np

from experiments import benchmark
from fd3d_jax.models import build
from fd3d_jax.models.inputs import dummy_batch, image_hw
from fd3d_jax.models.spatial_cross_attention import point_sampling

CONFIGS = ('bevformer_tiny:toy', 'bevformer_tiny:demo', 'bevformer_tiny:full', 'bevformer_small:full',
           'bevformer_base:full')


def cameras_per_query(config):
    """(Q,) int: the cameras each BEV query of ``config``'s model hits on the rig."""
    model = build(config.model)
    lidar2img = dummy_batch(config, 1, queue_length=1)['lidar2img'][:, 0]              # (1, N, 4, 4)
    _, bev_mask = point_sampling(model.pillar_points(), model.pc_range, lidar2img, image_hw(config))
    return np.asarray(bev_mask[0]).any(-1).sum(0)                                      # (N, Q, D) -> (Q,)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='*', default=list(CONFIGS), help='NAME:ARG of BEVFormer configs')
    parser.add_argument('--out', action='store_true', help='write experiments/results/sca_camera_hits.json')
    args = parser.parse_args(argv)
    result = {}
    print('config | BEV | queries hitting 0 / 1 / 2 / 3+ cameras | K (max)')
    for spec in args.configs:
        name, config = benchmark.load_config(spec)
        hits = cameras_per_query(config)
        histogram = np.bincount(hits, minlength=config.model.num_cams + 1).tolist()
        result[name] = dict(bev=[config.model.bev_h, config.model.bev_w], image_hw=list(image_hw(config)),
                            histogram=histogram, max_cameras=int(hits.max()))
        share = [f'{100 * c / hits.size:.1f} %' for c in histogram[:3] + [sum(histogram[3:])]]
        print(f"{name} | {config.model.bev_h}x{config.model.bev_w} | {' / '.join(share)} | {int(hits.max())}",
              flush=True)
    if args.out:
        benchmark.write_result('sca_camera_hits', dict(rig='fd3d_jax.data.rig', configs=result))
    return result


if __name__ == '__main__':
    main()
