"""DETR3D-R50, the FD3D paper's apprentice: R50 at 1600x900 with DETR3D's neck and head.

The FD3D paper gives only "R50, 900x1600"; we take the torchvision-style R50 (pytorch style, RGB
normalisation, no DCN) of BEVFormer-tiny with DETR3D's FPN (C3-C5 -> P3-P6). Arguments: ``:full``,
``:toy``, ``:demo`` (the toy grown to learn the synthetic set in ~20 CPU minutes)."""
import ml_collections

from configs import common


def get_config(arg='full'):
    common.check_arg('detr3d_r50', arg, ('full', 'toy', 'demo'))
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = common.data_config(toy=arg in ('toy', 'demo'))
    config.data.image_scale = 1.0
    config.data.queue_length = 1
    config.model = common.detr3d_model(backbone=common.resnet(50, 'pytorch', (0, 1, 2, 3)))
    if arg == 'toy':
        config.data.image_scale = 0.5
        common.toy_backbone(config.model)
    if arg == 'demo':
        common.demo_model(config)
    config = common.add_training(config, toy=arg in ('toy', 'demo'))
    if arg == 'full':   # our choice, as BEVFormer-tiny's backbone (the FD3D paper names no initialisation)
        config.train.init_from_original = "torchvision's ImageNet ResNet-50 (IMAGENET1K_V1, what mmcv's torchvision://resnet50 loads)"
    return common.demo_training(config) if arg == 'demo' else config
