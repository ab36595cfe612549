"""FD3D: BEVFormer-base (R101-DCN, 200x200 BEV) -> the paper's BEVFormer-tiny (R50, 450x800, 100x100 BEV).

The expert sees the apprentice's images upsampled x2 (the released distiller); tiny's single C5 level
(stride 32 at 480x800) pairs with base's stride-64 level (15x25). ``config.model``/``config.data`` are
the apprentice's; ``config.expert`` is the expert's model and normalisation; ``config.distill`` the method.
Arguments: ``:full``, ``:toy`` (bevformer_base:toy -> bevformer_tiny:toy: BEV 16x20 -> 8x10), ``:demo``
(bevformer_base:demo, BEV 32x32 at 320x192 -> bevformer_tiny:demo at half the image size with a 16x16 BEV).
Train the expert first (``python -m fd3d_jax.train --config configs/bevformer_base.py[:toy] --workdir E``)
and pass ``--config.distill.expert_checkpoint=E``.
"""
from configs import bevformer_base, bevformer_tiny, common


def get_config(arg='full'):
    common.check_arg('fd3d_bevformer_base_to_tiny', arg, ('full', 'toy', 'demo'))
    config = bevformer_tiny.get_config(dict(full='fd3d').get(arg, arg))
    if arg == 'demo':   # the paper's ratios: half the expert's image size and BEV resolution
        config.data.image_scale = 0.5
        config.model.bev_h = config.model.bev_w = 16
        config.model.rotate_center = (8, 8)
    config.expert = common.expert_config(bevformer_base.get_config(arg))
    config.distill = common.distill_config('fd3d', expert_upsample=2,
                                            expert_bev_channels=config.expert.model.embed_dims)
    if arg == 'demo':
        # from-scratch backbones with frozen BN have unbounded FPN scales (the demo expert's reach ~1e5:
        # generative PV loss 1.4e10 at step 150 without this): standardise both models' features
        config.distill.feature_norm = 'both'
    return common.toy_distill(config) if arg == 'toy' else config
