"""BEVFormer-base: R101-DCN (C3-C5, caffe), FPN P3-P6, BEV 200x200, 6 encoder layers, 1600x900,
queue 4. The FD3D expert. Arguments: ``:full`` (official bevformer_base.py), ``:toy``, ``:demo`` (the
expert of ``fd3d_bevformer_base_to_tiny.py:demo``: the demo BEVFormer with 3 encoder layers)."""
import ml_collections

from configs import common


def get_config(arg='full'):
    common.check_arg('bevformer_base', arg, ('full', 'toy', 'demo'))
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = common.data_config(toy=arg in ('toy', 'demo'))
    config.data.update(common.CAFFE_NORM)
    config.data.image_scale = 1.0
    config.data.queue_length = 4
    config.model = common.bevformer_model()
    # Not in the original (no with_cp): rematerialising the encoder/decoder layers costs ~6 encoder
    # forwards per step and takes the training-step peak from 28.6 GB to 18.2 GB (models/summary.py).
    config.model.remat = True
    if arg == 'toy':   # BEV 16x20: twice the toy apprentices' 8x10 (fd3d_bevformer_base_to_*.py:toy)
        common.toy_bevformer(config)
        config.model.bev_h, config.model.bev_w = 16, 20
        config.model.rotate_center = (10, 8)
    if arg == 'demo':
        common.demo_bevformer(config)
        config.model.encoder_layers = 3
    config = common.add_training(config, toy=arg in ('toy', 'demo'))
    if arg == 'full':   # the original's load_from: backbone and neck of an FCOS3D R101-DCN detector
        common.as_original_bevformer(config)
        config.train.init_from_original = 'ckpts/r101_dcn_fcos3d_pretrain.pth (FCOS3D R101-DCN)'
    return common.demo_training(config, num_steps=2000) if arg == 'demo' else config
