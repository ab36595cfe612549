"""DETR3D-R101: R101-DCN (caffe), FPN P3-P6 from C3-C5, 1600x900, 6 decoder layers. The FD3D expert.
Arguments: ``:full`` (official detr3d_res101_gridmask.py), ``:toy``, ``:demo`` (the expert of
``fd3d_detr3d_r101_to_r50.py:demo``: detr3d_r50:demo grown to two blocks per stage, 96 channels and
6 decoder layers). ``:demo`` trains from scratch, so it takes torchvision's RGB normalisation: caffe's
std 1 only matches the official caffe-pretrained weights, and with a from-scratch backbone (BatchNorm at
its identity initialisation, frozen) it feeds inputs ~58x larger into every conv."""
import ml_collections

from configs import common


def get_config(arg='full'):
    common.check_arg('detr3d_r101', arg, ('full', 'toy', 'demo'))
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = common.data_config(toy=arg in ('toy', 'demo'))
    config.data.update(common.CAFFE_NORM)
    config.data.image_scale = 1.0
    config.data.queue_length = 1
    config.model = common.detr3d_model()
    if arg == 'toy':
        config.data.image_scale = 0.5
        common.toy_backbone(config.model)
        # 48 channels (the toy apprentice detr3d_r50:toy has 32): fd3d_detr3d_r101_to_r50.py:toy aligns them
        config.model.neck.out_channels = config.model.embed_dims = 48
        config.model.ffn_dims = 96
    if arg == 'demo':
        common.demo_model(config)
        config.data.update(common.RGB_NORM)
        config.model.backbone.stage_blocks = (2, 2, 2, 2)
        config.model.neck.out_channels = config.model.embed_dims = 96
        config.model.ffn_dims = 192
        config.model.decoder_layers = 6
    config = common.add_training(config, toy=arg in ('toy', 'demo'))
    if arg == 'full':   # the original's load_from: backbone and neck of an FCOS3D R101-DCN detector
        config.train.init_from_original = 'ckpts/fcos3d.pth (FCOS3D R101-DCN)'
    return common.demo_training(config) if arg == 'demo' else config
