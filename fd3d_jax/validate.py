"""``validate(config)``: every enum, switch and range check of a config, in one place, run once when a command
line tool starts (before any data is read or anything is compiled). Each failure raises ``ConfigError`` naming
the config key, its value and what it may be. The code below it trusts the config: no check hides in traced
code. Checks that need the data or the devices (GT slots, batch size vs mesh) stay where those are known.
"""
import numbers

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
    if 'model' in config:
        _model(config, 'model')
    if 'data' in config:
        _data(config)
    if 'train' in config:
        _training(config)
    if 'distill' in config:
        _distill(config)
    return config
