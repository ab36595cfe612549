"""The frozen expert: its inputs, its checkpoint, and what the apprentice may take from it.

Released facts (``configs/distiller/base_distill_small_with_pv-cwd_bev-l2-heatmap.py`` of the
FocalDistiller codebase): the expert sees the apprentice's (0.5-scaled, padded) images bilinearly
upsampled x2 with ``lidar2img`` pre-multiplied by diag(2, 2, 1, 1) (``config.distill.expert_upsample``);
``duplicate_student_head=True`` loads the expert's head into the apprentice where shapes agree
(``config.distill.init_apprentice_head``). When the two models normalise images differently (the R50
apprentices use torchvision RGB, the R101 experts caffe BGR), the expert's images are renormalised
here; the padding (0 after the apprentice's normalisation) then holds the apprentice's mean in the
expert's normalisation instead of 0.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from fd3d_jax import params_io, storage
from fd3d_jax.data.device_input import prepare_images
from fd3d_jax.errors import CheckpointError, ExpertError

# Do not change the params or outputs: execution choices and training-only switches. ``sca_max_cameras`` (sparse
# spatial cross-attention) changes outputs only for BEV queries hitting more than K cameras, none at K >= 2 on
# the nuScenes rig: an expert trained dense may run sparse and the reverse. ``dtype`` (compute precision): params
# are float32 in either, and the distiller runs the expert in the apprentice's precision. ``repeated_blocks`` (the
# backbone's repeated blocks as a loop or unrolled) is the same computation either way.
IGNORED_MODEL_KEYS = ('remat', 'repeated_blocks', 'grid_mask', 'max_num', 'dropout', 'sca_max_cameras', 'dtype')
# Model keys added after experts were written, with the value that reproduces the code before them: a saved
# config without the key was trained with that value.
ADDED_MODEL_KEYS = {'prev_bev_batch0': False, 'reproduce_can_bus_bug': False}


def upsampled_lidar2img(lidar2img, upsample):
    """``lidar2img`` (..., 4, 4) of images upsampled ``upsample`` times: rows u and v scaled (diag(k, k, 1, 1) @)."""
    scale = jnp.asarray([upsample, upsample, 1.0, 1.0], lidar2img.dtype)
    return lidar2img * scale[:, None]


def expert_batch(batch, data_cfg, expert_cfg, upsample):
    """The apprentice's batch as the expert sees it: images renormalised (``expert_cfg.image_mean`` /
    ``image_std`` / ``to_rgb`` from the apprentice's ``data_cfg``) and upsampled ``upsample`` x
    (bilinear, half-pixel centres like ``F.interpolate(align_corners=False)``), ``lidar2img`` scaled,
    and the BEV alignment of the expert's grid (``expert_bev_*`` keys) in place of the apprentice's. Raw uint8
    images (``data.device_normalize``) are first prepared as the apprentice's (``prepare_images``, a no-op on
    prepared ones)."""
    batch = prepare_images(batch, data_cfg)
    img = batch['img']
    same_norm = (tuple(data_cfg.image_mean) == tuple(expert_cfg.image_mean)
                 and tuple(data_cfg.image_std) == tuple(expert_cfg.image_std)
                 and bool(data_cfg.to_rgb) == bool(expert_cfg.to_rgb))
    if not same_norm:
        raw = img * jnp.asarray(data_cfg.image_std, img.dtype) + jnp.asarray(data_cfg.image_mean, img.dtype)
        if bool(data_cfg.to_rgb) != bool(expert_cfg.to_rgb):
            raw = raw[..., ::-1]
        img = (raw - jnp.asarray(expert_cfg.image_mean, img.dtype)) / jnp.asarray(expert_cfg.image_std, img.dtype)
    out = dict(batch)
    for key in ('bev_shift', 'bev_rot_index', 'bev_rot_valid'):   # the expert's BEV grid (pipeline ``expert_bev``)
        if 'expert_' + key in batch:
            out[key] = batch['expert_' + key]
    if upsample != 1:
        factor = int(upsample)
        shape = img.shape[:-3] + (img.shape[-3] * factor, img.shape[-2] * factor, img.shape[-1])
        img = jax.image.resize(img, shape, 'bilinear')
        out['lidar2img'] = upsampled_lidar2img(batch['lidar2img'], factor)
    out['img'] = img
    return out


def _model_differences(saved, wanted, prefix='model'):
    diffs = []
    for key in sorted(set(saved) | set(wanted)):
        if key in IGNORED_MODEL_KEYS:
            continue
        saved_value, wanted_value = saved.get(key, ADDED_MODEL_KEYS.get(key)), wanted.get(key)
        if isinstance(saved_value, dict) and isinstance(wanted_value, dict):
            diffs += _model_differences(saved_value, wanted_value, f'{prefix}.{key}')
        elif json.dumps(saved_value) != json.dumps(_jsonable(wanted_value)):
            diffs.append(f'{prefix}.{key}: checkpoint {saved_value!r}, config {wanted_value!r}')
    return diffs


def _norm_differences(saved_data, expert_cfg):
    """The expert's training normalisation (``data.image_mean/image_std/to_rgb`` of its ``config.json``)
    against ``config.expert``'s, which ``expert_batch`` renormalises the apprentice's images to."""
    diffs = []
    for key in ('image_mean', 'image_std', 'to_rgb'):
        if (key in saved_data and key in expert_cfg
                and json.dumps(saved_data[key]) != json.dumps(_jsonable(expert_cfg[key]))):
            diffs.append(f'{key}: checkpoint data.{key} {saved_data[key]!r}, config.expert.{key} {expert_cfg[key]!r}')
    return diffs


def _jsonable(value):
    return json.loads(json.dumps(value, default=list)) if value is not None else None


def check_shapes(params, abstract, source):
    """Raises ``ExpertError`` listing missing, unexpected and mismatched leaves of ``params``
    (nested dicts) against ``abstract`` (the expert model's params, arrays or shape structs)."""
    lines, (missing, unexpected, wrong) = params_io.shape_mismatches(params, abstract)
    if lines:
        raise ExpertError(f'expert params in {source} do not fit config.expert.model ({missing} missing, '
                          f'{unexpected} unexpected, {wrong} of another shape):\n  {params_io.format_lines(lines)}')


def load_expert_params(path, expert_cfg, abstract):
    """The expert's params from ``path`` (``config.distill.expert_checkpoint``): a workdir of
    ``python -m fd3d_jax.train`` (its latest checkpoint's ``params['model']``; its ``config.json`` must
    describe the same model as ``expert_cfg.model`` and the same image normalisation) or a params folder written by
    ``fd3d_jax.params_io.save_params`` (e.g. by the converter); a local folder or a URL (``gs://``). Checked leaf
    by leaf against ``abstract`` (``ExpertError`` lists every mismatch)."""
    if not path:
        raise ExpertError('config.distill.expert_checkpoint is empty: give the workdir of a trained expert '
                          '(python -m fd3d_jax.train --config <expert config> --workdir W) or a converted '
                          'checkpoint')
    path = storage.as_path(path)
    if not path.is_dir():
        raise ExpertError(f'config.distill.expert_checkpoint={path} is not a directory')
    saved_cfg = path / 'config.json'
    if saved_cfg.exists():
        saved = json.loads(saved_cfg.read_text())
        diffs = _model_differences(saved.get('model', {}), _jsonable(expert_cfg.model.to_dict()))
        diffs += _norm_differences(saved.get('data', {}), expert_cfg)
        if diffs:
            raise ExpertError(f'the expert in {path} was trained with another model or image normalisation than '
                              f'config.expert:\n  ' + '\n  '.join(diffs))
    try:
        params = params_io.load_params(path)
    except CheckpointError as e:
        raise ExpertError(str(e)) from None
    check_shapes(params, abstract, path)
    return jax.tree_util.tree_map(lambda x, a: jnp.asarray(x, a.dtype), params, abstract)


def _copyable(head, source):
    """The paths of the flat ``head`` that exist in the flat ``source`` with the same shape (what is copied)."""
    return [path for path, leaf in head.items() if path in source and tuple(source[path].shape) == tuple(leaf.shape)]


def head_copy_summary(head, expert_head):
    """What ``init_head_from_expert`` copies, from shapes alone (arrays or shape structs): ``dict(leaves,
    copied_leaves, values, copied_values)`` of the apprentice's ``head``. An expert head of another width
    copies only the leaves whose shapes agree (e.g. a few biases), which the training log says."""
    head = traverse_util.flatten_dict(head)
    copied = _copyable(head, traverse_util.flatten_dict(expert_head))
    size = lambda leaf: int(np.prod(leaf.shape))  # noqa: E731
    return dict(leaves=len(head), copied_leaves=len(copied), values=sum(size(leaf) for leaf in head.values()),
                copied_values=sum(size(head[path]) for path in copied))


def init_head_from_expert(params, expert_params):
    """``duplicate_student_head``: every leaf of the apprentice's ``head`` whose path and shape exist in
    the expert's head takes the expert's value (non-strict, like ``load_state_dict(strict=False)``).
    Returns (new params, list of copied paths, list of kept paths)."""
    head = traverse_util.flatten_dict(params['head'])
    src = traverse_util.flatten_dict(expert_params['head'])
    matching = set(_copyable(head, src))
    copied, kept = [], []
    for path, leaf in head.items():
        if path in matching:
            head[path] = jnp.array(src[path], leaf.dtype)  # a copy: the state is donated, the expert is not
            copied.append('/'.join(path))
        else:
            kept.append('/'.join(path))
    return dict(params, head=traverse_util.unflatten_dict(head)), copied, kept
