"""The converter core on plain dicts of numpy arrays (no PyTorch needed).

``torch_to_flax(state_dict, config)``: an official state dict (``{key: array}``, optionally wrapped
as mmcv's ``{'state_dict': ..., 'meta': ...}``) -> our params pytree (nested dicts of float32 numpy
arrays, the tree of ``build(config.model).init(...)['params']``).
``flax_to_torch(params, config)``: the reverse, every official key (``official_keys``).
Both check everything first and raise one ``ConvertError`` naming every problem; both are exact
(transposes, reshapes and sign flips, ``mapping``): torch -> flax -> torch returns the same arrays
bit for bit (keys ``mapping`` ignores come back from ``fill``), flax -> torch -> flax too.

Input clean-up (``normalize_state_dict``): the ``state_dict`` wrapper of mmcv checkpoints, a
``module.`` prefix on every key (a wrapped model saved without unwrapping), and mmcv's legacy DCN
names ``<conv>_offset.{weight,bias}`` (``ModulatedDeformConv2dPack._load_from_state_dict`` for
checkpoints before its version 2) -> ``<conv>.conv_offset.*``. Half-precision tensors (e.g. a
checkpoint of the fp16 variant) are cast to our float32 exactly.
"""
import collections
import re
from typing import Dict, List, Mapping, Tuple

import jax
import numpy as np
from flax import traverse_util

from fd3d_jax.convert import mapping
from fd3d_jax.convert.mapping import Ignored
from fd3d_jax.convert.official_keys import official_shapes
from fd3d_jax.errors import ConvertError
from fd3d_jax.models import build
from fd3d_jax.models.box_coder import CODE_WEIGHTS
from fd3d_jax.models.inputs import dummy_batch

INIT_IMAGE_WH = (320, 180)   # any image size gives the same param shapes (as fd3d_jax.train.loop)


def abstract_params(config):
    """Our params as ``jax.ShapeDtypeStruct``s (``jax.eval_shape``: nothing is computed)."""
    model = build(config.model)
    batch = dummy_batch(config, 1, queue_length=1, raw_wh=INIT_IMAGE_WH)
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(lambda: model.init({'params': key, 'dropout': key}, batch))['params']


def _leaves(config, abstract=None) -> Dict[Tuple[str, ...], Tuple[Tuple[int, ...], np.dtype]]:
    abstract = abstract_params(config) if abstract is None else abstract
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in traverse_util.flatten_dict(abstract).items()}


def normalize_state_dict(state_dict) -> Dict[str, object]:
    """Unwraps ``{'state_dict': ...}``, strips a ``module.`` prefix shared by every key and renames
    legacy DCN offset keys (module docstring). Values are kept as given."""
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get('state_dict'), Mapping):
        state_dict = state_dict['state_dict']
    sd = dict(state_dict)
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    for key in list(sd):
        match = re.fullmatch(r'(.*\.conv\d+)_offset\.(weight|bias)', key)
        if match and f'{match[1]}.conv_offset.{match[2]}' not in sd:
            sd[f'{match[1]}.conv_offset.{match[2]}'] = sd.pop(key)
    return sd


def _checked_plan(config, leaves, convert_yaw):
    """The mapping plan, verified against our model: every official key maps (or is ignored), every
    target exists with the shape the mapping computes, every leaf (slice) is filled exactly once."""
    model_cfg = config.model
    shapes = official_shapes(model_cfg)
    plan = mapping.plan(model_cfg, convert_yaw)
    problems, seen = [], {}
    for key, entry in plan.items():
        if entry is None:
            problems.append(f'official key {key} {shapes[key]}: no mapping to our params')
            continue
        if isinstance(entry, Ignored):
            continue
        for target in entry:
            part = shapes[key] if target.rows is None else (target.rows[1] - target.rows[0],) + shapes[key][1:]
            if target.path not in leaves:
                problems.append(f'official key {key} -> {target.describe()}: our model has no such param')
                continue
            want = leaves[target.path][0] if target.index is None else leaves[target.path][0][1:]
            got = mapping.flax_shape(target, part)
            if target.index is not None and not 0 <= target.index < leaves[target.path][0][0]:
                problems.append(f'official key {key} -> {target.describe()}: index outside {leaves[target.path][0]}')
            elif tuple(got) != tuple(want):
                problems.append(f'official key {key} {shapes[key]} -> {target.describe()}: gives {tuple(got)}, '
                                f'our param is {tuple(want)}')
            if (target.path, target.index) in seen:
                problems.append(f'{target.describe()} filled by both {seen[(target.path, target.index)]} and {key}')
            seen[(target.path, target.index)] = key
    filled = collections.defaultdict(set)
    for path, index in seen:
        filled[path].add(index)
    for path, (shape, _) in leaves.items():
        # a leaf is filled whole (index None) or slice by slice along its stacked axis 0
        wanted = [None] if None in filled[path] or not filled[path] else range(shape[0])
        for index in wanted:
            if index not in filled[path]:
                problems.append(mapping.Target(path, 'copy', index).describe()
                                + f' {shape}: no official key fills it')
    if problems:
        raise ConvertError(f'the official {model_cfg.name} layout and our model disagree for this config '
                           f'({len(problems)} problems):\n  ' + '\n  '.join(problems), unmapped=problems)
    return shapes, plan


def _shape(array):
    return tuple(np.shape(array))


def torch_to_flax(state_dict, config, convert_yaw=True, abstract=None):
    """Official state dict -> our params (nested dicts of numpy arrays, dtypes of our params).

    ``config``: the full config of the model (``configs/NAME.py``'s ``get_config(arg)``);
    ``convert_yaw``: convert the reg branches' mmdet3d-0.x yaw code to ours (``mapping``).

    Raises ``ConvertError`` listing every checkpoint key with no place in the model, every model param
    left without a source (its missing key) and every shape mismatch. Ignored keys
    (``ignored_keys``) may be absent. ``abstract``: our abstract params if already at hand."""
    leaves = _leaves(config, abstract)
    shapes, plan = _checked_plan(config, leaves, convert_yaw)
    sd = normalize_state_dict(state_dict)
    unexpected = sorted(f'{k} {_shape(v)}' for k, v in sd.items() if k not in shapes)
    missing, mismatched = [], []
    for key, shape in shapes.items():
        entry = plan[key]
        if key not in sd:
            if not isinstance(entry, Ignored):
                missing.append(f"{key} {shape} -> {', '.join(t.describe() for t in entry)}")
        elif _shape(sd[key]) != shape:
            mismatched.append(f'{key}: checkpoint {_shape(sd[key])}, expected {shape}')
    _check_fit('the checkpoint does', config, unexpected, 'no place in the model', missing,
               'model param left without a source', mismatched)
    out = {path: np.empty(shape, dtype) for path, (shape, dtype) in leaves.items()}
    for key, entry in plan.items():
        if isinstance(entry, Ignored):
            continue
        apply_entry(out, entry, np.asarray(sd[key]))
    return traverse_util.unflatten_dict(out)


def apply_entry(flat, entry, tensor):
    """Writes one official ``tensor`` into ``flat`` ({our param path: writable numpy array}) at every
    ``Target`` of its plan ``entry`` (whole leaves, or slices of stacked leaves / rows of packed tensors)."""
    for target in entry:
        leaf = mapping.to_flax(target, tensor if target.rows is None else tensor[target.rows[0]:target.rows[1]])
        if target.index is None:
            flat[target.path][...] = leaf
        else:
            flat[target.path][target.index] = leaf


def _check_fit(what, config, unexpected, unexpected_why, missing, missing_why, mismatched):
    """``ConvertError`` listing every unexpected, missing and mis-shaped entry, if there is one."""
    if unexpected or missing or mismatched:
        lines = ([f'unexpected ({unexpected_why}): {k}' for k in unexpected]
                 + [f'missing ({missing_why}): {k}' for k in missing]
                 + [f'shape: {k}' for k in mismatched])
        raise ConvertError(f'{what} not fit {config.model.name} of this config'
                           f' ({len(unexpected)} unexpected, {len(missing)} missing, {len(mismatched)} '
                           f'of another shape):\n  ' + '\n  '.join(lines), unexpected, missing, mismatched)


def ignored_keys(state_dict, config, convert_yaw=True) -> Dict[str, str]:
    """Keys (and row ranges, ``key[a:b]``) of ``state_dict`` that ``torch_to_flax`` drops -> reason."""
    model_cfg = config.model
    shapes = official_shapes(model_cfg)
    plan = mapping.plan(model_cfg, convert_yaw)
    out = {}
    for key in normalize_state_dict(state_dict):
        entry = plan.get(key)
        if isinstance(entry, Ignored):
            out[key] = entry.reason
        elif entry:
            end = max((t.rows[1] for t in entry if t.rows), default=shapes[key][0])
            if end < shapes[key][0]:
                out[f'{key}[{end}:{shapes[key][0]}]'] = mapping.UNUSED_LEVEL_EMBEDS
    return out


def _default(key, shape, config):
    """Value written for an ignored key when ``fill`` does not have it."""
    if key.endswith('.num_batches_tracked'):
        return np.zeros(shape, np.int64)
    if key == 'pts_bbox_head.code_weights':
        weights = config.loss.code_weights if 'loss' in config else CODE_WEIGHTS
        return np.asarray(weights, np.float32).reshape(shape)
    return np.zeros(shape, np.float32)


def flax_to_torch(params, config, fill=None, convert_yaw=True, abstract=None) -> Dict[str, np.ndarray]:
    """Our params -> the official state dict (every key of ``official_shapes``, float32 / int64).

    What our model does not hold (``ignored_keys``: BN counters, ``code_weights``, unused
    ``level_embeds`` rows) comes from ``fill`` (a state dict, e.g. the checkpoint converted before),
    else BN counters 0, ``code_weights`` from ``config.loss.code_weights``, unused rows 0.
    Raises ``ConvertError`` listing missing, unexpected and mis-shaped params."""
    leaves = _leaves(config, abstract)
    shapes, plan = _checked_plan(config, leaves, convert_yaw)
    flat = traverse_util.flatten_dict(dict(params))
    missing = sorted('/'.join(k) + f' {leaves[k][0]}' for k in set(leaves) - set(flat))
    unexpected = sorted('/'.join(k) + f' {_shape(flat[k])}' for k in set(flat) - set(leaves))
    mismatched = sorted(f"{'/'.join(k)}: params {_shape(flat[k])}, expected {leaves[k][0]}"
                        for k in set(flat) & set(leaves) if _shape(flat[k]) != leaves[k][0])
    fill = normalize_state_dict(fill) if fill is not None else {}
    mismatched += [f'{k}: fill {_shape(fill[k])}, expected {shapes[k]}'
                   for k in shapes if k in fill and _shape(fill[k]) != shapes[k]]
    _check_fit('the params do', config, unexpected, 'not a param of this model', missing,
               'no value for this model param', mismatched)
    out = {}
    for key, shape in shapes.items():
        entry = plan[key]
        if isinstance(entry, Ignored):
            out[key] = np.array(fill[key]) if key in fill else _default(key, shape, config)
            continue
        if any(t.rows for t in entry):
            tensor = (np.array(fill[key], np.float32) if key in fill
                      else _default(key, shape, config))
        for target in entry:
            leaf = np.asarray(flat[target.path])
            leaf = leaf if target.index is None else leaf[target.index]
            part_shape = shape if target.rows is None else (target.rows[1] - target.rows[0],) + shape[1:]
            part = mapping.to_torch(target, leaf, part_shape).astype(np.float32, copy=False)
            if target.rows is None:
                tensor = part
            else:
                tensor[target.rows[0]:target.rows[1]] = part
        out[key] = tensor
    return out


def flat_paths(params) -> List[str]:
    """'a/b/c' names of a params tree's leaves (for messages and tests)."""
    return ['/'.join(k) for k in traverse_util.flatten_dict(dict(params))]


def summary(state_dict, params, config) -> Dict[str, object]:
    """Counts for the CLI: keys, converted keys, params leaves, parameter count, ignored keys."""
    ignored = ignored_keys(state_dict, config)
    sd = normalize_state_dict(state_dict)
    return dict(checkpoint_keys=len(sd), converted_keys=len(sd) - sum(k in sd for k in ignored),
                param_leaves=len(flat_paths(params)),
                parameters=int(sum(np.size(v) for v in traverse_util.flatten_dict(dict(params)).values())),
                ignored=ignored)

