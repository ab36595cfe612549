"""BEVFormer-tiny: R50 (C5), one FPN level, BEV 50x50, 3 encoder layers, 800x450 input, queue 3.

Arguments: ``:full`` (official bevformer_tiny.py), ``:fd3d`` (the FD3D paper's apprentice: BEV
100x100 at 450x800), ``:toy`` (seconds on CPU, on the synthetic set), ``:demo`` (the toy grown to learn the synthetic
set in ~20 CPU minutes).
"""
import ml_collections

from configs import common


def get_config(arg='full'):
    common.check_arg('bevformer_tiny', arg, ('full', 'fd3d', 'toy', 'demo'))
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = common.data_config(toy=arg in ('toy', 'demo'))
    config.data.image_scale = 0.5
    config.data.queue_length = 3
    config.model = common.bevformer_model(
        bev_h=50, bev_w=50, num_levels=1, encoder_layers=3,
        backbone=common.resnet(50, 'pytorch', (3,)), neck=common.fpn((2048,), 1))
    if arg == 'fd3d':
        config.model.bev_h = config.model.bev_w = 100
    if arg == 'toy':
        common.toy_bevformer(config)
    if arg == 'demo':
        common.demo_bevformer(config)
    config = common.add_training(config, toy=arg in ('toy', 'demo'))
    if arg in ('full', 'fd3d'):   # the original's img_backbone init_cfg
        common.as_original_bevformer(config)
        config.train.init_from_original = "torchvision's ImageNet ResNet-50 (IMAGENET1K_V1, what mmcv's torchvision://resnet50 loads)"
    return common.demo_training(config, num_steps=2000) if arg == 'demo' else config
