"""FD3D: DETR3D-R101 (R101-DCN) -> DETR3D-R50, both at 1600x900 with the same FPN (levels pair 1:1).

No BEV: generative distillation on the FPN levels with projected query masks, focal distillation at
the expert queries' projected reference points (a reconstruction, see ``fd3d_jax/distill/focal.py``).
Arguments: ``:full``, ``:toy`` (detr3d_r101:toy with 48 channels -> detr3d_r50:toy with 32: aligned),
``:demo`` (detr3d_r101:demo, 96 channels and 6 decoder layers -> detr3d_r50:demo, 64 and 3).
"""
from configs import common, detr3d_r50, detr3d_r101


def get_config(arg='full'):
    common.check_arg('fd3d_detr3d_r101_to_r50', arg, ('full', 'toy', 'demo'))
    config = detr3d_r50.get_config(arg)
    config.expert = common.expert_config(detr3d_r101.get_config(arg))
    config.distill = common.distill_config('fd3d', expert_upsample=1)
    if arg == 'demo':   # from-scratch frozen-BN backbones: unbounded FPN scales (see the BEVFormer :demo pair)
        config.distill.feature_norm = 'both'
    return common.toy_distill(config) if arg == 'toy' else config
