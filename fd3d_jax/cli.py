"""Command-line plumbing of ``fd3d_jax.train`` and ``fd3d_jax.eval``: bad config overrides and known input
errors end the program with one ``error: ...`` line (exit status 1) that names the key, file or step,
instead of a traceback."""
import re
import sys

from absl import flags

from fd3d_jax.errors import USER_ERRORS


def parse_flags(argv):
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags)``); an unknown ``--config.a.b`` key is
    reported with the override that names it and ml_collections' suggestion; a value of the wrong type with
    absl's message (``flag --config.a.b=x: invalid literal ...``)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f'error: {e}')
    except (AttributeError, KeyError) as e:
        text = str(e).encode().decode('unicode_escape').strip('\'"')
        field = re.match(r"'?([^'\n]+)'?", text)
        overrides = [a for a in argv[1:] if a.startswith('--config.')]
        named = [a for a in overrides if field and field.group(1) in a.split('=')[0].split('.')]
        hint = text.split('\n', 1)[1].strip() if '\n' in text else ''
        sys.exit(f"error: unknown config key in {' '.join(named or overrides)}" + (f' ({hint})' if hint else ''))


def exit_on(fn, *args, errors=USER_ERRORS, **kwargs):
    """``fn(*args, **kwargs)``; an exception of one of ``errors`` (default: every ``fd3d_jax.errors`` error)
    exits with ``error: <message>``."""
    try:
        return fn(*args, **kwargs)
    except errors as e:
        sys.exit(f'error: {e}')
