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
    s, d = config.data.image_scale, config.data.pad_divisor
    h, w = int(raw_wh[1] * s), int(raw_wh[0] * s)
    return -(-h // d) * d, -(-w // d) * d


def batch_spec(config, batch_size=1, queue_length=None, raw_wh=None, expert_model=None):
    """``jax.ShapeDtypeStruct`` pytree of one batch: the common keys and the detector's own
    (``Detector.extra_batch_keys``); ``expert_model`` (a distillation expert's model config) adds the expert's
    own keys with the prefix ``expert_`` (the input pipeline's ``expert_bev``)."""
    t = config.data.queue_length if queue_length is None else queue_length
    n = config.model.num_cams
    h, w = image_hw(config, raw_wh)
    b, g = batch_size, config.data.max_gt
    spec = dict(img=((b, t, n, h, w, 3), jnp.float32), lidar2img=((b, t, n, 4, 4), jnp.float32),
                can_bus=((b, t, 18), jnp.float32), prev_bev_exists=((b, t), jnp.bool_),
                gt_boxes=((b, g, 9), jnp.float32), gt_labels=((b, g), jnp.int32), gt_mask=((b, g), jnp.bool_),
                sample_idx=((b,), jnp.int32), valid=((b,), jnp.bool_))
    for prefix, model_cfg in (('', config.model), ('expert_', expert_model)):
        if model_cfg is not None:
            spec.update({prefix + k: v for k, v in build(model_cfg).extra_batch_keys(b, t).items()})
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
            q = out[prefix + 'bev_rot_index'].shape[-1]
            out[prefix + 'bev_rot_index'][:] = np.arange(q, dtype=np.int32)
            out[prefix + 'bev_rot_valid'][:] = True
    out['valid'][:] = True
    return out
