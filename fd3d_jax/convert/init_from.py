"""``train.init_from``: start a detector's params from pretrained weights, after ``model.init`` and before the
optimiser, as the original recipes do (BEVFormer-tiny: torchvision's ImageNet ResNet-50 backbone; BEVFormer
small/base and DETR3D: ``load_from`` an FCOS3D R101-DCN detector checkpoint, which fills the backbone and neck).

``train.init_from`` is a comma-separated list of sources, applied in order (a later one overwrites an earlier
one where both load)::

    PATH.pth            a torchvision ResNet state dict (keys ``conv1.weight``, ``layer1.0...``, ``fc.*``):
                        into the backbone (``img_backbone.``);
                        an mmdet / mmdet3d detector checkpoint (FCOS3D: ``backbone.*``, ``neck.*``,
                        ``bbox_head.*``): backbone and neck, as the original's non-strict ``load_from`` takes them;
                        an official BEVFormer / DETR3D checkpoint (``img_backbone.*``, ``img_neck.*``,
                        ``pts_bbox_head.*``): every key it holds;
    DIR                 our params folder or training workdir (``fd3d_jax.params_io.load_params``): every leaf
                        whose path and shape match;
    SOURCE#SUBTREE      only our params under ``SUBTREE`` ('/'-separated, e.g. ``image_features/backbone``).

``.pth`` files are read with ``torch.load(weights_only=True)`` and mapped with the converter's plan
(``fd3d_jax.convert.mapping``: the same layouts as a whole-checkpoint conversion). Every loaded, missing,
unexpected and mis-shaped key is reported (``InitReport``). A source ends the run with one ``ConvertError`` naming
the file and the keys when it cannot be read, when nothing of it loads, when a key it loads has another shape
than ours, or when a backbone key has no place in our backbone (another depth): wrong architecture. Keys
outside what a source is for (a ResNet's ``fc``, FCOS3D's ``bbox_head`` and extra FPN outputs) are listed as
unexpected and skipped, as the original's non-strict loading skips them.

Not checked (no key tells): a caffe-style checkpoint into a pytorch-style ResNet or the reverse (the same keys,
another stride placement and input normalisation); the configs name which one the original loads.
"""
import dataclasses
import os
from typing import List, Tuple

import numpy as np
from flax import traverse_util

from fd3d_jax import params_io
from fd3d_jax.convert import mapping
from fd3d_jax.convert.convert import apply_entry, normalize_state_dict
from fd3d_jax.convert.mapping import Ignored
from fd3d_jax.convert.official_keys import official_shapes
from fd3d_jax.convert.torch_io import load_state_dict
from fd3d_jax.errors import CheckpointError, ConvertError

BACKBONE, NECK = 'img_backbone.', 'img_neck.'


@dataclasses.dataclass
class InitReport:
    """What one source did: ``kind`` (torchvision / detector / official / params) and key lists (official keys
    for ``.pth`` sources, our '/'-paths for params folders)."""
    source: str
    kind: str
    loaded: List[str] = dataclasses.field(default_factory=list)
    missing: List[str] = dataclasses.field(default_factory=list)
    unexpected: List[str] = dataclasses.field(default_factory=list)
    mismatched: List[str] = dataclasses.field(default_factory=list)
    ignored: List[str] = dataclasses.field(default_factory=list)

    def lines(self):
        """The log's lines: counts, then every key that did not load (the loaded ones by module)."""
        head = (f'init_from {self.source} ({self.kind}): {len(self.loaded)} loaded, {len(self.missing)} missing '
                f'(kept from init), {len(self.unexpected)} unexpected (skipped), {len(self.mismatched)} of another '
                f'shape, {len(self.ignored)} ignored')
        groups = {}
        for key in self.loaded:
            module = '.'.join(key.replace('/', '.').split('.')[:2])
            groups[module] = groups.get(module, 0) + 1
        return ([head, '  loaded: ' + ', '.join(f'{m} ({n})' for m, n in groups.items())]
                + [f'  missing: {k}' for k in self.missing] + [f'  unexpected: {k}' for k in self.unexpected]
                + [f'  shape: {k}' for k in self.mismatched])


def parse_sources(spec) -> List[Tuple[str, Tuple[str, ...]]]:
    """``'a.pth,b#image_features/backbone'`` -> ``[('a.pth', ()), ('b', ('image_features', 'backbone'))]``."""
    out = []
    for item in (s.strip() for s in str(spec or '').split(',')):
        if not item:
            continue
        path, _, subtree = item.partition('#')
        out.append((os.path.expanduser(path), tuple(p for p in subtree.split('/') if p)))
    return out


def rename_torch_keys(state_dict):
    """(kind, state dict under official key names, the official prefixes this source is for)."""
    sd = normalize_state_dict(state_dict)
    if 'conv1.weight' in sd and any(k.startswith('layer1.') for k in sd):   # its ImageNet classifier: skipped
        return 'torchvision', {(k if k.startswith('fc.') else BACKBONE + k): v for k, v in sd.items()}, (BACKBONE,)
    if any(k.startswith(('backbone.', 'neck.')) for k in sd):
        renamed = {}
        for key, value in sd.items():
            for mmdet, ours in (('backbone.', BACKBONE), ('neck.', NECK)):
                if key.startswith(mmdet):
                    key = ours + key[len(mmdet):]
                    break
            renamed[key] = value
        return 'detector', renamed, (BACKBONE, NECK)
    scope = tuple(sorted({k.split('.')[0] + '.' for k in sd}))
    return 'official', sd, scope


def _under(path, subtree):
    return tuple(path[:len(subtree)]) == tuple(subtree)


def load_torch_source(state_dict, params, model_cfg, source='state dict', subtree=()):
    """Fills ``params`` (our detector's params, nested dicts) from a torch state dict; returns (params, report).
    Raises ``ConvertError`` (naming ``source`` and the keys) on a wrong architecture (module docstring)."""
    kind, sd, scope = rename_torch_keys(state_dict)
    shapes, plan = official_shapes(model_cfg), mapping.plan(model_cfg)
    flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    report = InitReport(source, kind)
    for key, value in sd.items():
        entry = plan.get(key)
        if isinstance(entry, Ignored):
            report.ignored.append(key)
        elif entry is None:
            report.unexpected.append(f'{key} {tuple(np.shape(value))}')
        elif not all(_under(t.path, subtree) for t in entry):
            report.unexpected.append(f'{key} (outside {"/".join(subtree)})')
        elif tuple(np.shape(value)) != tuple(shapes[key]):
            report.mismatched.append(f'{key}: checkpoint {tuple(np.shape(value))}, ours {tuple(shapes[key])}')
        else:
            apply_entry(flat, entry, np.asarray(value, np.float32))
            report.loaded.append(key)
    report.missing = [key for key, entry in plan.items() if key.startswith(scope) and key not in sd
                      and not isinstance(entry, Ignored) and all(_under(t.path, subtree) for t in entry)]
    wrong_depth = [k for k in report.unexpected if k.startswith(BACKBONE) and kind != 'official']
    bad = report.mismatched + wrong_depth
    if bad or not report.loaded:
        why = 'nothing of it fits' if not report.loaded else f'{len(bad)} keys do not fit'
        raise ConvertError(f'init_from {source}: a {kind} checkpoint that does not fit {model_cfg.name} of this '
                           f'config ({why}): ' + '; '.join((bad or report.unexpected)[:8])
                           + (f' ... {len(bad) - 8} more' if len(bad) > 8 else ''))
    return traverse_util.unflatten_dict(flat), report


def load_params_source(source_params, params, source='params', subtree=()):
    """Copies every leaf of ``source_params`` (our layout) whose path and shape match into ``params``, under
    ``subtree``; returns (params, report). ``ConvertError`` when a leaf has another shape or nothing matches."""
    have = traverse_util.flatten_dict(dict(source_params))
    flat = dict(traverse_util.flatten_dict(dict(params)))
    report = InitReport(source, 'params')
    for path, value in have.items():
        name = '/'.join(path)
        if not _under(path, subtree):
            continue
        if path not in flat:
            report.unexpected.append(name)
        elif tuple(np.shape(value)) != tuple(np.shape(flat[path])):
            report.mismatched.append(f'{name}: source {tuple(np.shape(value))}, ours {tuple(np.shape(flat[path]))}')
        else:
            flat[path] = np.asarray(value, np.asarray(flat[path]).dtype)
            report.loaded.append(name)
    report.missing = ['/'.join(p) for p in flat if _under(p, subtree) and p not in have]
    if report.mismatched or not report.loaded:
        why = report.mismatched[:8] or [f'no leaf of {source} is under our {"/".join(subtree) or "params"}']
        raise ConvertError(f'init_from {source}: params that do not fit this model: ' + '; '.join(why))
    return traverse_util.unflatten_dict(flat), report


def apply_init_from(params, config) -> Tuple[dict, List[InitReport]]:
    """Applies every source of ``config.train.init_from`` to the detector ``params``, in order."""
    reports = []
    for path, subtree in parse_sources(config.train.get('init_from', '')):
        if not os.path.exists(path):
            raise ConvertError(f'init_from {path}: no such file or folder (config train.init_from)')
        if os.path.isdir(path):
            try:
                source_params = params_io.load_params(path)
            except CheckpointError as e:
                raise ConvertError(f'init_from {path}: {e}') from None
            params, report = load_params_source(source_params, params, path, subtree)
        else:
            params, report = load_torch_source(load_state_dict(path), params, config.model, path, subtree)
        reports.append(report)
    return params, reports


def missing_source_warning(config):
    """One warning line when a config names what the original starts from but ``train.init_from`` is empty."""
    original = config.train.get('init_from_original', '')
    if original and not config.train.get('init_from', ''):
        return (f'warning: train.init_from is empty: the original {config.model.name} recipe starts from '
                f'{original}; without it the frozen stem, stage 1 and every frozen BN statistic stay random '
                f'(--config.train.init_from=PATH)')
    return None
