"""A workdir's own config (``W/config.json``) and the identity check of a run that resumes or evaluates ``W``.

``W/config.json`` is the config a run resolved at its launch (``loop.write_config``). This file is also a config
file: ``--config fd3d_jax/train/workdir.py:W`` loads that config again (what ``python -m fd3d_jax.eval --workdir W``
and ``python -m fd3d_jax.train --workdir W`` use when no ``--config`` is given), so that overrides apply on top of
what the run trained with instead of having to be typed again.
"""
import json
import os

import ml_collections

from fd3d_jax import storage
from fd3d_jax.distill.expert import ADDED_MODEL_KEYS
from fd3d_jax.errors import ConfigError

CONFIG_NAME = 'config.json'

# The keys that say what a workdir's checkpoints are: a model, the data it learns and how that data is made
# (classes, ranges, image scale, queue), the expert and the method whose modules are in the state. The other
# data keys say where the data lies, how fast it is read and which split is evaluated: a run on the same workdir
# may change them.
IDENTITY = ('model', 'expert.model', 'distill.method', 'data')
DATA_FREE_KEYS = ('dataroot', 'records_dir', 'can_bus_root', 'val_split', 'num_threads', 'num_workers', 'prefetch',
                  'device_prefetch', 'skip_bad_samples', 'device_normalize')
# What an evaluation may change besides: the table version and training split (the test set is another version).
EVAL_FREE_KEYS = ('version', 'train_split')
MAX_LINES = 10
NAMES = ('model.name', 'expert.model.name', 'distill.method')   # listed first when they differ


def _tuples(value):
    """JSON lists back to the tuples the config files use (``to_json_best_effort`` writes tuples as lists)."""
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def read_config(workdir):
    """``W/config.json`` as a ``ConfigDict`` (tuples restored); ``ConfigError`` naming the file when it is missing
    or not JSON. ``workdir``: local or a URL."""
    path = storage.as_path(workdir) / CONFIG_NAME
    if not path.exists():
        raise ConfigError(f'{path} not found: {workdir} is not a training workdir (pass --config)')
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f'{path} is not a JSON config ({e})') from None
    return ml_collections.ConfigDict(_tuples(saved))


def get_config(arg):
    """Config-file entry point: ``--config fd3d_jax/train/workdir.py:W`` is ``W``'s config."""
    if not arg:
        raise ConfigError('fd3d_jax/train/workdir.py needs the workdir after a colon: workdir.py:W')
    return read_config(arg)


def _flatten(tree, prefix=''):
    flat = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            flat.update(_flatten(value, name + '.'))
        else:
            flat[name] = value
    return flat


def _identity(config_json, free_data_keys):
    flat = _flatten(config_json)
    free = {f'data.{key}' for key in free_data_keys}
    return {key: value for key, value in flat.items()
            if key not in free and any(key == root or key.startswith(root + '.') for root in IDENTITY)}


# Identity keys added after workdirs were written, with the value that reproduces the code before them: a saved
# config without the key ran with that value.
ADDED_KEYS = {**{f'{section}.{key}': value for section in ('model', 'expert.model')
                 for key, value in ADDED_MODEL_KEYS.items()},
              'data.can_bus_from_poses': False}


def identity_differences(saved, config, free_data_keys=DATA_FREE_KEYS):
    """Lines ``key: saved value -> this value`` for each identity key (``IDENTITY`` less ``free_data_keys``)
    where ``config`` differs from ``saved`` (a workdir's config); both ``ConfigDict``s or JSON dicts."""
    as_json = lambda c: json.loads(c.to_json_best_effort()) if hasattr(c, 'to_json_best_effort') else c  # noqa: E731
    before, now = _identity(as_json(saved), free_data_keys), _identity(as_json(config), free_data_keys)
    before.update({key: value for key, value in ADDED_KEYS.items() if key not in before and key in now})
    missing = object()
    return [f'{key}: {before.get(key, missing)!r} -> {now.get(key, missing)!r}'.replace(repr(missing), '(absent)')
            for key in sorted(before.keys() | now.keys(), key=lambda k: (k not in NAMES, k))
            if before.get(key, missing) != now.get(key, missing)]


def check_identity(config, workdir, action='resume'):
    """Raises ``ConfigError`` when ``config`` is not the config of ``workdir``'s checkpoints: at most
    ``MAX_LINES`` differing keys, then a count. An ``action`` other than 'resume' (an evaluation) may also change
    the data version and training split (``EVAL_FREE_KEYS``). Nothing is read but ``W/config.json`` and nothing is written, so a
    refused run leaves the workdir as it was. A workdir without ``config.json`` (written by hand, or by a run that
    ended before it) is not checked."""
    path = storage.as_path(workdir) / CONFIG_NAME
    if not path.exists():
        return
    free = DATA_FREE_KEYS + (() if action == 'resume' else EVAL_FREE_KEYS)
    lines = identity_differences(read_config(workdir), config, free)
    if not lines:
        return
    shown = lines[:MAX_LINES] + ([f'... and {len(lines) - MAX_LINES} more'] if len(lines) > MAX_LINES else [])
    raise ConfigError(f'cannot {action} {workdir} with this config: its checkpoints are of another model or data '
                      f'({len(lines)} keys differ from {path}):\n  ' + '\n  '.join(shown)
                      + f'\nuse a new --workdir, or omit --config to {action} with the workdir\'s own config')


def flag_value(argv, name):
    """The value of the last ``--name=V`` / ``--name V`` of a command line ``argv`` (program name first), or None."""
    value = None
    for index, arg in enumerate(argv[1:], 1):
        if arg.startswith(f'--{name}='):
            value = arg.split('=', 1)[1]
        elif arg == f'--{name}' and index + 1 < len(argv):
            value = argv[index + 1]
    return value


def default_config_argv(argv):
    """``argv`` with ``--config=<this file>:W`` added when it names ``--workdir W`` (``--workdir=W`` or
    ``--workdir W``) but no ``--config``: a command on a workdir runs with the workdir's own config, and
    ``--config.a.b=v`` overrides apply on top of it. ``ConfigError`` when ``W/config.json`` does not exist."""
    if any(arg == '--config' or arg.startswith('--config=') for arg in argv):
        return argv
    workdir = flag_value(argv, 'workdir')
    if not workdir:
        return argv
    config_json = storage.as_path(workdir) / CONFIG_NAME
    if not config_json.exists():
        raise ConfigError(f'{config_json} not found: pass --config (a new run, or a workdir without its config)')
    return [argv[0], f'--config={os.path.abspath(__file__)}:{workdir}', *argv[1:]]
