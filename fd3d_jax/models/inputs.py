"""Abstract (or dummy) model inputs with the pipeline's shapes, for shape checks and summaries."""
import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data import rig
from fd3d_jax.models import build


def image_hw(config, raw_wh=None):
    """Padded (H, W) of the pipeline's images for raw images of ``raw_wh`` (default: the config's
    ``data.raw_image_wh``)."""
    raw_wh = raw_wh or config.data.raw_image_wh
    scale, divisor = config.data.image_scale, config.data.pad_divisor
    height, width = int(raw_wh[1] * scale), int(raw_wh[0] * scale)
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def batch_spec(config, batch_size=1, queue_length=None, raw_wh=None, expert_model=None):
    """``jax.ShapeDtypeStruct`` pytree of one batch: the common keys and the detector's own
    (``Detector.extra_batch_keys``); ``expert_model`` (a distillation expert's model config) adds the expert's
    own keys with the prefix ``expert_`` (the input pipeline's ``expert_bev``)."""
    num_frames = config.data.queue_length if queue_length is None else queue_length
    num_cams = config.model.num_cams
    height, width = image_hw(config, raw_wh)
    batch, max_gt = batch_size, config.data.max_gt
    spec = dict(img=((batch, num_frames, num_cams, height, width, 3), jnp.float32),
                lidar2img=((batch, num_frames, num_cams, 4, 4), jnp.float32),
                can_bus=((batch, num_frames, 18), jnp.float32), prev_bev_exists=((batch, num_frames), jnp.bool_),
                gt_boxes=((batch, max_gt, 9), jnp.float32), gt_labels=((batch, max_gt), jnp.int32),
                gt_mask=((batch, max_gt), jnp.bool_),
                sample_idx=((batch,), jnp.int32), valid=((batch,), jnp.bool_))
    for prefix, model_cfg in (('', config.model), ('expert_', expert_model)):
        if model_cfg is not None:
            spec.update({prefix + k: v for k, v in build(model_cfg).extra_batch_keys(batch, num_frames).items()})
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()}


def dummy_batch(config, batch_size=1, queue_length=None, raw_wh=None, seed=0, expert_model=None):
    """A concrete ``batch_spec`` batch: random images, the nuScenes-like rig's lidar2img (``fd3d_jax.data.rig``),
    identity BEV alignment."""
    spec = batch_spec(config, batch_size, queue_length, raw_wh, expert_model)
    rng = np.random.default_rng(seed)
    out = {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
    out['img'] = rng.normal(size=spec['img'].shape).astype(np.float32)
    cams = rig.camera_rig(*(raw_wh or config.data.raw_image_wh))
    lidar = rig.lidar_calibration()['LIDAR_TOP']
    lidar2ego = geometry.make_transform(lidar['rotation'], lidar['translation'])
    l2i = [geometry.lidar2img(c['intrinsic'], geometry.invert_transform(lidar2ego)
                              @ geometry.make_transform(c['rotation'], c['translation']), config.data.image_scale)
           for c in cams.values()]
    out['lidar2img'][:] = np.asarray(l2i, np.float32)
    for prefix in ('', 'expert_'):
        if prefix + 'bev_rot_index' in out:
            num_bev_queries = out[prefix + 'bev_rot_index'].shape[-1]
            out[prefix + 'bev_rot_index'][:] = np.arange(num_bev_queries, dtype=np.int32)
            out[prefix + 'bev_rot_valid'][:] = True
    out['valid'][:] = True
    return out
