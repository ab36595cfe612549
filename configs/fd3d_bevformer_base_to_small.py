"""FD3D: BEVFormer-base -> the paper's BEVFormer-small (R101-DCN, 450x800, 100x100 BEV).

The released distiller's recipe (``base_distill_small_with_pv-cwd_bev-l2-heatmap.py``): expert input =
apprentice images x2, queue of 4 frames. Arguments: ``:full``, ``:toy``. See
``fd3d_bevformer_base_to_tiny.py`` for the workflow.
"""
from configs import bevformer_base, bevformer_small, common


def get_config(arg='full'):
    common.check_arg('fd3d_bevformer_base_to_small', arg, ('full', 'toy'))
    config = bevformer_small.get_config('fd3d' if arg == 'full' else 'toy')
    if arg == 'full':
        config.data.queue_length = 4
    config.expert = common.expert_config(bevformer_base.get_config(arg))
    config.distill = common.distill_config('fd3d', expert_upsample=2,
                                            expert_bev_channels=config.expert.model.embed_dims)
    return common.toy_distill(config) if arg == 'toy' else config
