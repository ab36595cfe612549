"""Command-line plumbing of ``fd3d_jax.train``, ``fd3d_jax.eval`` and ``fd3d_jax.convert``: a bad config file,
config argument or override and the known input errors end the program with one ``error: ...`` line (exit
status 1) that names the file, key or step, instead of a traceback.

A config flag (``--config configs/NAME.py[:ARG]``) is loaded here once before absl parses the command line, so
that a missing file or an argument its ``get_config`` refuses is one line; after parsing, every value of the
overridden config is checked against that config file's own (``validate.check_against_default``: the types and
tuple lengths come from the config's structure), before anything is loaded or traced."""
import difflib
import importlib.util
import inspect
import os
import re
import sys

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from fd3d_jax.errors import USER_ERRORS, ConfigError
from fd3d_jax.validate import check_against_default


def _config_file_flags(flag_values):
    """The names of the ``config_flags.DEFINE_config_file`` flags."""
    return [name for name in flag_values if isinstance(flag_values[name].parser, ConfigFileFlagParser)]


def _named_configs(argv, names):
    """{flag name: its last ``--name=spec`` / ``--name spec`` value} on the command line ``argv``."""
    specs = {}
    for index, arg in enumerate(argv[1:], 1):
        match = re.match(r'^--?([^=.]+)(=(.*))?$', arg)
        if match and match.group(1) in names:
            if match.group(2) is not None:
                specs[match.group(1)] = match.group(3)
            elif index + 1 < len(argv):
                specs[match.group(1)] = argv[index + 1]
    return specs


def _no_such_file(path):
    folder, name = os.path.split(path)
    candidates = [f for f in os.listdir(folder or '.') if f.endswith('.py')] if os.path.isdir(folder or '.') else []
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f' (did you mean {os.path.join(folder, close[0])}?)' if close else ''
    return ConfigError(f'{path}: no such config file{hint}')


def load_config_file(spec):
    """The config of ``spec`` = ``PATH.py[:ARG]`` (``get_config(ARG)``, or ``get_config()`` without a colon), as
    ml_collections' config flag loads it. ``ConfigError`` naming ``spec`` when the file is missing, not Python, has
    no ``get_config`` taking that argument, or its ``get_config`` refuses the argument (its own message: a
    ``ValueError`` or one of ``fd3d_jax.errors``). Other errors of the file (a bug in it) keep their traceback."""
    path, colon, arg = spec.partition(':')
    args = (arg,) if colon else ()
    if not os.path.isfile(path):
        raise _no_such_file(path)
    module_spec = importlib.util.spec_from_file_location(f'config_file_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f'{path}: not a Python config file: {e.msg} (line {e.lineno})') from None
    get_config = getattr(module, 'get_config', None)
    if not callable(get_config):
        raise ConfigError(f'{path}: not a config file: it has no get_config()')
    try:
        inspect.signature(get_config).bind(*args)
    except TypeError:
        takes = 'an argument after a colon (PATH.py:ARG)' if not args else 'no argument (drop the colon)'
        raise ConfigError(f'{spec}: its get_config() takes {takes}') from None
    try:
        return get_config(*args)
    except (ValueError, *USER_ERRORS) as e:
        raise ConfigError(f'{spec}: {e}') from None


def parse_flags(argv):
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags)``). A config file named on the command line
    that is missing or refuses its ``:ARG`` ends with ``error: <spec>: ...``; an unknown ``--config.a.b`` key is
    reported with the override that names it and ml_collections' suggestion; a value absl cannot read with its
    message (``flag --config.a.b=x: invalid literal ...``); a value of another type or tuple length than the
    config file's own with the key (``check_against_default``)."""
    names = _config_file_flags(flags.FLAGS)
    defaults = {name: exit_on(load_config_file, spec) for name, spec in _named_configs(argv, names).items()}
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f'error: {e}')
    except (AttributeError, KeyError) as e:
        text = str(e).encode().decode('unicode_escape').strip('\'"')
        field = re.match(r"'?([^'\n]+)'?", text)
        overrides = [a for a in argv[1:] if a.startswith('--config.')]
        named = [a for a in overrides if field and field.group(1) in a.split('=')[0].split('.')]
        hint = text.split('\n', 1)[1].strip() if '\n' in text else ''
        sys.exit(f"error: unknown config key in {' '.join(named or overrides)}" + (f' ({hint})' if hint else ''))
    for name in names:
        flag = flags.FLAGS[name]
        if flag.value is None or not config_flags.get_override_values(flag):
            continue
        default = (defaults[name] if name in defaults
                   else exit_on(load_config_file, config_flags.get_config_filename(flag)))
        exit_on(check_against_default, default, flag.value)
    return remaining


def exit_on(fn, *args, errors=USER_ERRORS, **kwargs):
    """``fn(*args, **kwargs)``; an exception of one of ``errors`` (default: every ``fd3d_jax.errors`` error)
    exits with ``error: <message>``."""
    try:
        return fn(*args, **kwargs)
    except errors as e:
        sys.exit(f'error: {e}')
