"""Shared config parts. Model configs build on ``data_config``; every key can be overridden from
the command line (``--config.data.dataroot=...``)."""
import ml_collections

from fd3d_jax.data.nuscenes_meta import CLASS_NAMES, POINT_CLOUD_RANGE

# mmdet normalisations: torchvision RGB (tiny, R50) and caffe BGR (small/base/DETR3D, R101).
RGB_NORM = dict(image_mean=(123.675, 116.28, 103.53), image_std=(58.395, 57.12, 57.375), to_rgb=True)
CAFFE_NORM = dict(image_mean=(103.53, 116.28, 123.675), image_std=(1.0, 1.0, 1.0), to_rgb=False)


def data_config(toy=False):
    """The input pipeline. ``toy``: the embedded synthetic set (``make demo`` writes it)."""
    c = ml_collections.ConfigDict()
    c.dataroot = 'data/synthetic' if toy else 'data/nuscenes'
    c.version = 'v1.0-mini' if toy else 'v1.0-trainval'
    c.train_split = 'mini_train' if toy else 'train'
    c.val_split = 'mini_val' if toy else 'val'
    c.records_dir = ''                # '' = <dataroot>/fd3d_records
    c.class_names = CLASS_NAMES
    c.point_cloud_range = POINT_CLOUD_RANGE
    c.image_scale = 0.5               # RandomScaleImageMultiViewImage(scales=[s])
    c.pad_divisor = 32                # PadMultiViewImage(size_divisor=32)
    c.image_mean, c.image_std, c.to_rgb = RGB_NORM['image_mean'], RGB_NORM['image_std'], RGB_NORM['to_rgb']
    c.queue_length = 3                # BEVFormer temporal queue (frames per training sample)
    c.max_gt = 64 if toy else 256     # static number of GT slots (padded with a mask)
    c.use_valid_flag = True           # drop GT without lidar/radar points
    c.filter_empty_gt = True          # resample training queues with a GT-less frame
    c.num_threads = 2                 # grain read threads (image decoding)
    c.prefetch = 2                    # grain prefetch buffer (batches)
    return c
