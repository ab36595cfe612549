"""BEVFormer-small: R101-DCN (C5, caffe), one FPN level, BEV 150x150, 3 encoder layers, 1280x720.

Arguments: ``:full`` (official bevformer_small.py), ``:fd3d`` (the FD3D paper's apprentice: BEV
100x100 at 450x800), ``:toy``.
"""
import ml_collections

from configs import common


def get_config(arg='full'):
    common.check_arg('bevformer_small', arg, ('full', 'fd3d', 'toy'))
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = common.data_config(toy=arg == 'toy')
    config.data.update(common.CAFFE_NORM)
    config.data.image_scale = 0.8
    config.data.queue_length = 3
    config.model = common.bevformer_model(
        bev_h=150, bev_w=150, num_levels=1, encoder_layers=3,
        backbone=common.resnet(101, 'caffe', (3,), dcn=True, remat=True), neck=common.fpn((2048,), 1))
    if arg == 'fd3d':
        config.data.image_scale = 0.5
        config.model.bev_h = config.model.bev_w = 100
    if arg == 'toy':
        common.toy_bevformer(config)
    config = common.add_training(config, toy=arg == 'toy')
    if arg in ('full', 'fd3d'):   # the original's load_from: backbone and neck of an FCOS3D R101-DCN detector
        common.as_original_bevformer(config)
        config.train.init_from_original = 'ckpts/r101_dcn_fcos3d_pretrain.pth (FCOS3D R101-DCN)'
    return config
