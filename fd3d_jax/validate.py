"""``validate(config)``: every enum, switch, range and meaning check of a config, in one place, run once when a
command line tool starts (before any data is read or anything is compiled). Each failure raises ``ConfigError``
naming the config key, its value and what it may be. The code below it trusts the config: no check hides in traced
code. Checks that need the data or the devices (GT slots, batch size vs mesh) stay where those are known.

``check_against_default(default, config)`` runs before it on a config with command-line overrides: the type and
shape of every value must be those of the config file's own value (``default``), so the type checks are read off
the config's structure, not listed here.
"""
import numbers

from fd3d_jax.data.nuscenes_meta import CLASS_NAMES
from fd3d_jax.detection.matching import MATCHERS
from fd3d_jax.distill import METHODS
from fd3d_jax.distill.masks import SELECT_RULES
from fd3d_jax.errors import ConfigError
from fd3d_jax.models import DETECTORS, precision
from fd3d_jax.train.mesh import LR_SCALING

FEATURE_NORMS = ('none', 'expert', 'both')
MASK_MODES = ('zero', 'random')
GENERATIVE_AREAS = ('full', 'instance')
FOCAL_SOURCES = ('raw', 'generated')
FOCAL_QUERIES = ('all', 'selected')
NONFINITE = ('stop', 'skip')


def _alternatives(allowed):
    quoted = [repr(a) for a in allowed]
    return quoted[0] if len(quoted) == 1 else ', '.join(quoted[:-1]) + ' or ' + quoted[-1]


def _get(config, key):
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


def one_of(config, key, allowed):
    value = _get(config, key)
    if value not in allowed:
        raise ConfigError(f'config.{key} must be {_alternatives(allowed)}, got {value!r}')


def number(config, key, low=None, high=None, integer=False, low_open=False):
    """``config.<key>`` is a number (an integer with ``integer``) in [low, high] ((low, high] with
    ``low_open``)."""
    value = _get(config, key)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"config.{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = '' if low is None else f"{'>' if low_open else '>='} {low}"
        hi = '' if high is None else f'<= {high}'
        raise ConfigError(f"config.{key} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")


# Tuples whose length is free (their last key): one entry per backbone stage that feeds the neck. The length of
# every other tuple of numbers or switches is its default's; a tuple of strings (class names) may have any length.
ANY_LENGTH = ('out_indices', 'in_channels')
# One word per element kind of a default tuple, and the plural.
_KIND_WORDS = {bool: ('True or False', 'True/False values'), int: ('an integer', 'integers'),
               float: ('a number', 'numbers'), str: ('a string', 'strings')}


def _kind(value):
    """``bool``, ``int``, ``float``, ``str`` or None (no type to derive: None, or an unusual default)."""
    if isinstance(value, bool):
        return bool
    if isinstance(value, numbers.Integral):
        return int
    if isinstance(value, numbers.Real):
        return float
    return str if isinstance(value, str) else None


def _fits(kind, value):
    """``value`` may stand where the default is of ``kind`` (an int where a float is: it is a number)."""
    if kind is float:
        return _kind(value) in (int, float)
    return kind is None or _kind(value) is kind


def _element_kind(default):
    """The kind of a default tuple's elements: ``float`` when any is a float (``(1.0, 0.2)`` and ``(1, 0.2)``
    alike), else the first one's; None for an empty or mixed tuple."""
    kinds = {_kind(item) for item in default}
    if kinds <= {int, float} and float in kinds:
        return float
    return kinds.pop() if len(kinds) == 1 else None


def _tuple_against_default(name, default, value):
    """``value`` in place of the default tuple ``default`` at ``config.<name>``; returns it with ints made floats
    where the default has floats (as config_flags does for a single float)."""
    kind = _element_kind(default)
    words = _KIND_WORDS.get(kind, ('a value', 'values'))
    free_length = kind is str or not default or name.rsplit('.', 1)[-1] in ANY_LENGTH
    shape = f'a tuple of {words[1]}' if free_length else f'a tuple of {len(default)} {words[1]}'
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f'config.{name} must be {shape} like its default {default!r}, got {value!r}')
    if kind is not str and len(value) == 1 and isinstance(value[0], str) and value[0][:1] in '([':
        raise ConfigError(f'config.{name} must be {shape} like its default {default!r}, got the text '
                          f'{value[0]!r}: not a Python tuple (each element a literal: numbers, True/False, '
                          f'quoted strings)')
    if not free_length and len(value) != len(default):
        raise ConfigError(f'config.{name} must be {shape} like its default {default!r}, got {len(value)}: '
                          f'{tuple(value)!r}')
    for index, item in enumerate(value):
        if not _fits(kind, item):
            raise ConfigError(f'config.{name}[{index}] must be {words[0]} (config.{name} is {shape} like its '
                              f'default {default!r}), got {item!r}')
    return tuple(float(item) for item in value) if kind is float else tuple(value)


def check_against_default(default, config, prefix=''):
    """Raises ``ConfigError`` naming the key for the first value of ``config`` whose type or shape is not that of
    the same key of ``default`` (the config file's own config, before command-line overrides): a section must
    stay a section with the same keys; a number, a switch or a string its kind (an int is a number); a tuple a
    tuple of the same element kind and, unless it holds strings or its key is in ``ANY_LENGTH``, of the same
    length. A key whose default is None takes any value. Ints given in a tuple of floats become floats, in
    ``config``. ``prefix``: the key of ``default`` within the whole config. Returns ``config``."""
    for key, default_value in default.items():
        name = prefix + key
        if key not in config:
            raise ConfigError(f'config.{name} is missing: a command-line override replaced config.{prefix[:-1]} '
                              f'with a section without it')
        value = config[key]
        if hasattr(default_value, 'items'):
            if not hasattr(value, 'items'):
                raise ConfigError(f'config.{name} must be a section like its default (keys '
                                  f"{', '.join(default_value)}), got {value!r}")
            check_against_default(default_value, value, name + '.')
        elif isinstance(default_value, (tuple, list)):
            config[key] = _tuple_against_default(name, default_value, value)
        elif not _fits(_kind(default_value), value):
            words = _KIND_WORDS[_kind(default_value)]
            raise ConfigError(f'config.{name} must be {words[0]} like its default {default_value!r}, got {value!r}')
    extra = [key for key in config if key not in default]
    if extra:
        raise ConfigError(f'config.{prefix}{extra[0]} is not a key of the config file: a command-line override '
                          f'replaced config.{prefix[:-1]} with a section that has it')
    return config


def _class_names(config):
    """``data.class_names``: known nuScenes detection classes, each once; the detectors have one output per class."""
    names = config.data.class_names
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not names:
        raise ConfigError(f'config.data.class_names must be a non-empty tuple of class names, got {names!r}')
    if len(names) == 1 and isinstance(names[0], str) and names[0][:1] in '([' and ',' in names[0]:
        raise ConfigError(f'config.data.class_names is the one string {names[0]!r}: in a shell, quote the names '
                          f"and the tuple, e.g. --config.data.class_names=\"('car','pedestrian')\"")
    for name in names:
        if name not in CLASS_NAMES:
            raise ConfigError(f'config.data.class_names: {name!r} is not a nuScenes detection class; choose from '
                              f"{', '.join(CLASS_NAMES)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"config.data.class_names names {', '.join(repeated)} more than once")


def _num_classes(config, key):
    """``config.<key>.num_classes`` is the number of ``config.data.class_names`` (labels index those names)."""
    if 'data' in config and 'class_names' in config.data:
        count = len(config.data.class_names)
        if _get(config, key).num_classes != count:
            fix = (f'set --config.{key}.num_classes={count}' if key == 'model'
                   else 'an expert of other classes cannot teach these')
            raise ConfigError(f'config.{key}.num_classes={_get(config, key).num_classes} must be the number of '
                              f'config.data.class_names ({count}): {fix}')


def point_range(config, key):
    """``config.<key>`` is 6 numbers (x, y, z min, then x, y, z max) with min < max on each axis."""
    value = _get(config, key)
    if (not isinstance(value, (tuple, list)) or len(value) != 6
            or any(_kind(item) not in (int, float) for item in value)):
        raise ConfigError(f'config.{key} must be 6 numbers (x_min, y_min, z_min, x_max, y_max, z_max), '
                          f'got {value!r}')
    for axis, low, high in zip('xyz', value[:3], value[3:]):
        if not low < high:
            raise ConfigError(f'config.{key}: {axis}_min={low} must be < {axis}_max={high}, got {tuple(value)!r}')


def _stages(config, key):
    """``backbone.out_indices``: distinct ResNet stages 0..3, one ``neck.in_channels`` entry each."""
    model = _get(config, key)
    if 'backbone' not in model or 'out_indices' not in model.backbone:
        return
    stages = model.backbone.out_indices
    if not stages or any(_kind(s) is not int or not 0 <= s <= 3 for s in stages) or len(set(stages)) < len(stages):
        raise ConfigError(f'config.{key}.backbone.out_indices must be distinct ResNet stages 0..3, got {stages!r}')
    if 'neck' in model and 'in_channels' in model.neck and len(model.neck.in_channels) != len(stages):
        raise ConfigError(f'config.{key}.neck.in_channels={tuple(model.neck.in_channels)!r} must have one entry '
                          f'per config.{key}.backbone.out_indices={tuple(stages)!r}')


def _model(config, key):
    model = _get(config, key)
    one_of(config, f'{key}.name', tuple(DETECTORS))
    for field in ('embed_dims', 'num_heads', 'num_query', 'num_classes', 'decoder_layers', 'num_cams', 'num_levels'):
        if field in model:
            number(config, f'{key}.{field}', 1, integer=True)
    if model.embed_dims % model.num_heads:
        raise ConfigError(f'config.{key}.embed_dims={model.embed_dims} must be a multiple of '
                          f'config.{key}.num_heads={model.num_heads}')
    number(config, f'{key}.dropout', 0.0, 1.0)
    if 'pc_range' in model:
        point_range(config, f'{key}.pc_range')
    _stages(config, key)
    _num_classes(config, key)
    if 'dtype' in model:
        one_of(config, f'{key}.dtype', tuple(precision.DTYPES))
    if DETECTORS[model.name].has_bev:
        number(config, f'{key}.bev_h', 1, integer=True)
        number(config, f'{key}.bev_w', 1, integer=True)
        number(config, f'{key}.encoder_layers', 1, integer=True)
        if model.get('sca_max_cameras', 0):
            number(config, f'{key}.sca_max_cameras', 0, model.num_cams, integer=True)
            if model.get('sca_batch0_hits', False):
                raise ConfigError(f'config.{key}.sca_batch0_hits (a quirk of the dense original) needs '
                                  f'config.{key}.sca_max_cameras=0, got {model.sca_max_cameras}')


# Integer keys and their least value.
COUNTS = {'data.pad_divisor': 1, 'data.queue_length': 1, 'data.max_gt': 1, 'data.num_threads': 0, 'data.prefetch': 0,
          'data.num_workers': -1, 'data.device_prefetch': 0, 'train.batch_size': 1, 'train.eval_batch_size': 0,
          'train.num_steps': 0, 'train.epochs': 0, 'train.log_every': 1, 'train.checkpoint_every': 1,
          'train.keep_checkpoints': 1, 'train.eval_every': 0, 'train.per_device_batch_size': 0, 'train.profile': 0,
          'optim.warmup_iters': 0, 'optim.lr_base_batch': 1}


def _counts(config, section):
    for key, least in COUNTS.items():
        if key.startswith(section + '.'):
            number(config, key, least, integer=True)


def _data(config):
    number(config, 'data.image_scale', 0.0, low_open=True)
    if 'class_names' in config.data:
        _class_names(config)
    if 'point_cloud_range' in config.data:
        point_range(config, 'data.point_cloud_range')
    _counts(config, 'data')


def _training(config):
    one_of(config, 'train.nonfinite', NONFINITE)
    _counts(config, 'train')
    if 'ema_decay' in config.train:
        number(config, 'train.ema_decay', 0.0, 0.999999)
        number(config, 'train.ema_ramp_steps', 0, integer=True)
    if config.train.num_steps == 0 and config.train.epochs == 0:
        raise ConfigError('config.train.num_steps and config.train.epochs are both 0: set one of them')
    _counts(config, 'optim')
    number(config, 'optim.lr', 0.0, low_open=True)
    if 'lr_scaling' in config.optim:
        one_of(config, 'optim.lr_scaling', LR_SCALING)
    number(config, 'optim.weight_decay', 0.0)
    number(config, 'optim.backbone_lr_mult', 0.0)
    number(config, 'optim.grad_clip', 0.0)
    number(config, 'optim.warmup_ratio', 0.0, 1.0, low_open=True)
    number(config, 'optim.min_lr_ratio', 0.0, 1.0)
    for key in ('cls_weight', 'bbox_weight', 'focal_gamma'):
        number(config, f'loss.{key}', 0.0)
    number(config, 'loss.focal_alpha', 0.0, 1.0)
    if 'matcher' in config.loss:
        one_of(config, 'loss.matcher', MATCHERS)


def _distill(config):
    methods = ('none',) + tuple(METHODS)
    one_of(config, 'distill.method', methods)
    if config.distill.method == 'none' and not config.distill.init_apprentice_head:
        return
    _model(config, 'expert.model')
    apprentice, expert = config.model, config.expert.model
    if apprentice.name != expert.name:
        raise ConfigError(f'config.model.name={apprentice.name!r} and config.expert.model.name={expert.name!r}: '
                          f'apprentice and expert must be the same kind of detector')
    number(config, 'distill.expert_upsample', 1, integer=True)
    if DETECTORS[apprentice.name].has_bev:
        factor = expert.bev_h // apprentice.bev_h
        if (expert.bev_h != factor * apprentice.bev_h or expert.bev_w != factor * apprentice.bev_w
                or factor & (factor - 1)):
            raise ConfigError(f'the expert BEV {expert.bev_h}x{expert.bev_w} must be a power-of-two multiple of the '
                              f'apprentice BEV {apprentice.bev_h}x{apprentice.bev_w} (config.expert.model.bev_h/'
                              f'bev_w, config.model.bev_h/bev_w)')
    one_of(config, 'distill.feature_norm', FEATURE_NORMS)
    for key in ('fitnet.bev_weight', 'fitnet.pv_weight', 'mgd.weight', 'heatmap.bev_weight', 'heatmap.cwd_weight',
                'generative.bev_weight', 'generative.pv_weight', 'focal.weight',
                'head.loss_weight'):
        number(config, f'distill.{key}', 0.0)
    number(config, 'distill.heatmap.cwd_tau', 0.0, low_open=True)
    number(config, 'distill.mgd.ratio', 0.0, 1.0)
    one_of(config, 'distill.mask.select', SELECT_RULES)
    number(config, 'distill.mask.topk', 1, integer=True)
    number(config, 'distill.mask.score_thresh', 0.0)
    number(config, 'distill.mask.box_scale', 0.0, low_open=True)
    one_of(config, 'distill.mask.mode', MASK_MODES)
    number(config, 'distill.mask.random_ratio', 0.0, 1.0)
    one_of(config, 'distill.generative.area', GENERATIVE_AREAS)
    one_of(config, 'distill.focal.source', FOCAL_SOURCES)
    one_of(config, 'distill.focal.queries', FOCAL_QUERIES)


def validate(config):
    """Raises ``ConfigError`` (naming the key) for the first unusable value of ``config``; returns it
    otherwise. Works on detector, distillation-pair and data-only configs (sections it lacks are skipped)."""
    if 'data' in config:     # first: the model checks count its class names
        _data(config)
    if 'model' in config:
        _model(config, 'model')
    if 'train' in config:
        _training(config)
    if 'distill' in config:
        _distill(config)
    return config
