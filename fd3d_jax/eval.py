"""Evaluates with the devkit's DetectionEval a training run's checkpoint, a params folder or a results file.

    python -m fd3d_jax.eval --workdir W [--step N] [--config.k=v]
        evaluates the latest (or step N) checkpoint of W with W's own config (``W/config.json``, the overrides on
        top) on ``config.data.val_split`` and writes ``W/eval/metrics_summary.json`` (``W/eval/step_N/`` with
        --step); ``--config configs/NAME.py[:ARG]`` instead of W's config must name the same model and data;
    python -m fd3d_jax.eval [--config PAIR.py[:ARG]] --expert --workdir W [--config.k=v]
        evaluates the pair's expert on the apprentice's val images as the distiller feeds them (upsampled,
        renormalised) and writes ``W/eval/expert/metrics_summary.json`` (the apprentice's results stay);
    python -m fd3d_jax.eval --params DIR [--config configs/NAME.py[:ARG]] [--out O] [--config.k=v]
        evaluates the params folder DIR (``fd3d_jax.convert --out DIR`` of an official checkpoint, or
        ``experiments/export_expert.py --out DIR``) with the config's detector at the config's own data settings
        (its image size: the model's native resolution) on ``config.data.val_split``, and writes
        ``O/results.json`` and ``O/metrics_summary.json`` (default O = ``DIR/eval``). Without --config, DIR's
        ``config.json`` (an exported folder's) is the config; a converted folder has none: name the config it was
        converted with. A distillation pair's config is refused: pass the expert's own config;
    python -m fd3d_jax.eval --results R.json --dataroot D --version V --split S --out O
        evaluates a nuScenes results JSON and writes ``O/metrics_summary.json``.

W, DIR, R and O may be URLs (``gs://bucket/run``; ``fd3d_jax.storage``): the devkit reads and writes local files, so
it evaluates in a local temporary folder whose files are then copied to ``W/eval`` or ``O``. D stays local.
"""
import contextlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fd3d_jax import nuscenes_metrics, params_io, storage
from fd3d_jax.cli import exit_on, parse_flags
from fd3d_jax.convert.checkpoint_files import REPORT as CONVERSION_REPORT
from fd3d_jax.errors import CheckpointError, ConfigError
from fd3d_jax.train import workdir as workdir_lib
from fd3d_jax.train.loop import Trainer, evaluate_checkpoint, evaluate_expert, evaluate_params, restore_model_params
from fd3d_jax.train.workdir import default_config_argv
from fd3d_jax.validate import validate

FLAGS = flags.FLAGS

PAIR_SECTIONS = ('expert', 'distill')   # a distillation pair's config: params['model'] is its apprentice
OWN_CONFIG = os.path.abspath(workdir_lib.__file__)   # ``--config=OWN_CONFIG:DIR`` is DIR/config.json


def _converted_with(params_dir):
    """The ``--config`` that ``fd3d_jax.convert`` converted ``params_dir`` with (its ``conversion.json``), or None
    (no report, or one that cannot be read: the name is only a hint in an error message)."""
    report = storage.as_path(params_dir) / CONVERSION_REPORT
    if not report.exists():
        return None
    try:
        return json.loads(report.read_text()).get('config') or None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def config_argv(argv):
    """``argv`` with the default config of its mode: ``--params DIR`` without ``--config`` takes DIR's own
    ``config.json`` (``--config=fd3d_jax/train/workdir.py:DIR``; an exported folder), or raises ``ConfigError``
    asking for ``--config`` (a converted folder has none); ``--workdir W`` takes W's (``default_config_argv``).
    ``--params`` beside ``--workdir`` is left for ``main`` to refuse."""
    params_dir = workdir_lib.flag_value(argv, 'params')
    if params_dir is None:
        return default_config_argv(argv)
    named_config = any(arg == '--config' or arg.startswith('--config=') for arg in argv)
    if named_config or workdir_lib.flag_value(argv, 'workdir'):
        return argv
    if not (storage.as_path(params_dir) / workdir_lib.CONFIG_NAME).exists():
        converted = _converted_with(params_dir)
        hint = f' (its {CONVERSION_REPORT}: converted with --config {converted})' if converted else ''
        raise ConfigError(f'{params_dir} has no {workdir_lib.CONFIG_NAME} (a converted checkpoint has none): pass '
                          f'--config configs/NAME.py[:ARG], the config of its model{hint}')
    return [argv[0], f'--config={OWN_CONFIG}:{params_dir}', *argv[1:]]


def is_pair(config):
    """Whether ``config`` is a distillation pair's (it has ``config.expert`` or ``config.distill``)."""
    return any(config.get(section) is not None for section in PAIR_SECTIONS)


def refuse_pair(config, config_name=''):
    """Raises ``ConfigError`` for a distillation pair's config: a params folder holds one detector, which is
    scored at its own config's resolution (a pair's expert on the apprentice's images is ``evaluate_expert``)."""
    if is_pair(config):
        raise ConfigError(f'{config_name or "the config"} is a distillation pair\'s (config.expert, config.distill): '
                          f'--params scores one detector at its own resolution; pass the expert\'s own config '
                          f'(e.g. configs/bevformer_base.py), or score a pair\'s expert on the apprentice\'s images '
                          f'with --expert --workdir W')


def detector_config(config):
    """``config`` without its pair sections (``PAIR_SECTIONS``): the config of its detector, ``config.model`` at
    ``config.data`` (a pair's apprentice)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for section in PAIR_SECTIONS:
            if section in config:
                del config[section]
    return config


def _detector_json(config):
    return json.loads(detector_config(config).to_json_best_effort())


def check_params_config(config, params_dir):
    """Raises ``ConfigError`` when ``params_dir`` has a ``config.json`` (an exported training run's) whose model or
    data (``workdir.IDENTITY`` less the keys an evaluation may change) differs from ``config``'s: the params would
    be scored on another model or input than they were trained on. A folder without ``config.json`` (converted)
    is not checked: its params are checked leaf by leaf when restored."""
    path = storage.as_path(params_dir) / workdir_lib.CONFIG_NAME
    if not path.exists():
        return
    saved = workdir_lib.read_config(params_dir)
    lines = workdir_lib.identity_differences(_detector_json(saved), _detector_json(config),
                                             workdir_lib.DATA_FREE_KEYS + workdir_lib.EVAL_FREE_KEYS)
    if lines:
        most = workdir_lib.MAX_LINES
        shown = lines[:most] + ([f'... and {len(lines) - most} more'] if len(lines) > most else [])
        raise ConfigError(f'cannot evaluate {params_dir} with this config: its params were trained with another '
                          f'model or data ({len(lines)} keys differ from {path}):\n  ' + '\n  '.join(shown)
                          + '\nomit --config to evaluate with its own config')


def evaluate_params_folder(config, params_dir, out=None, config_name='', log=print):
    """Evaluates the params folder ``params_dir`` (``DIR/params``: converted or exported) with ``config``'s
    detector at ``config.data``'s settings (``image_scale`` etc.: the model's native resolution) on
    ``config.data.val_split``; writes ``out/results.json`` and ``out/metrics_summary.json`` (default
    ``params_dir/eval``) and returns the summary (None for a split without annotations). ``config_name``: the
    ``--config`` spec, named in the errors. ``ConfigError`` for a distillation pair's config (its expert is
    scored on the apprentice's images by ``evaluate_expert``), ``CheckpointError`` for a folder without
    ``params/`` or params that do not fit ``config.model`` (every mismatch listed)."""
    refuse_pair(config, config_name)
    folder = storage.as_path(params_dir)
    if not (folder / params_io.PARAMS_DIR).is_dir():
        if (folder / 'checkpoints').is_dir():
            raise CheckpointError(f'{params_dir} is a training workdir (checkpoints/): evaluate it with --workdir')
        raise CheckpointError(f'{params_dir} holds no {params_io.PARAMS_DIR}/ folder (a params folder of '
                              f'fd3d_jax.convert or experiments/export_expert.py)')
    check_params_config(config, params_dir)
    trainer = Trainer(config, num_train_samples=1)
    try:
        params = restore_model_params(trainer, params_dir)
    except CheckpointError as error:
        converted = _converted_with(params_dir)
        if not converted:
            raise
        raise CheckpointError(f'{error}\n  ({params_dir}/{CONVERSION_REPORT}: converted with --config '
                              f'{converted})') from None
    out = folder / 'eval' if out is None else storage.as_path(out)
    log(f'evaluating {params_dir} with {config_name or "the config"} ({config.model.name}, '
        f'data.image_scale={config.data.get("image_scale")})')
    return evaluate_params(trainer, params, out, log=log)


def _params_mode():
    """``--params DIR``: refuses the other modes' flags, then evaluates (``evaluate_params_folder``)."""
    others = [f'--{name}' for name in ('workdir', 'expert', 'results', 'step') if getattr(FLAGS, name)]
    if others:
        sys.exit(f"error: --params evaluates a params folder on its own: drop {', '.join(others)}")
    data = [f'--{name}' for name in ('dataroot', 'version', 'split') if getattr(FLAGS, name)]
    if data:
        sys.exit(f"error: --params takes the data from the config: use --config.data.dataroot / "
                 f"--config.data.version / --config.data.val_split instead of {', '.join(data)}")
    config_name = FLAGS['config'].config_filename
    config = FLAGS.config
    if config_name.startswith(OWN_CONFIG + ':'):   # DIR's own config.json (config_argv)
        config_name = f'{storage.as_path(FLAGS.params) / workdir_lib.CONFIG_NAME}'
        if is_pair(config):   # an exported apprentice of a distillation run: params['model'] is config.model's
            config = detector_config(config)
            print(f'{config_name} is a distillation pair\'s: evaluating its apprentice (config.model, config.data)')
    exit_on(refuse_pair, config, config_name)
    logging.set_verbosity(logging.WARNING)
    exit_on(validate, config)
    summary = exit_on(evaluate_params_folder, config, FLAGS.params, FLAGS.out, config_name)
    out = FLAGS.out or str(storage.as_path(FLAGS.params) / 'eval')
    written = 'results.json and metrics_summary.json' if summary is not None else 'results.json'
    print(f'wrote {written} to {out}')


def define_flags():
    """The command line's flags, defined when the module runs as a program (``__main__``): importing it for
    ``evaluate_params_folder`` or ``config_argv`` defines none (other tools define ``--config`` as well)."""
    config_flags.DEFINE_config_file('config', None, 'config file (checkpoint and params modes)')
    flags.DEFINE_string('workdir', None, 'training folder with checkpoints/ (checkpoint mode)')
    flags.DEFINE_integer('step', None, 'checkpoint step (default: latest)')
    flags.DEFINE_bool('expert', False, 'with a distillation pair --config: evaluate its expert '
                      '(config.distill.expert_checkpoint) on the apprentice\'s images as the distiller feeds them, '
                      'writing --workdir/eval/metrics_summary.json')
    flags.DEFINE_string('params', None, 'params folder (DIR/params: fd3d_jax.convert --out, experiments/'
                        'export_expert.py --out) to evaluate at the config\'s own data settings (params mode)')
    flags.DEFINE_string('results', None, 'nuScenes results JSON (global frame)')
    flags.DEFINE_string('dataroot', None, 'nuScenes(-format) dataroot')
    flags.DEFINE_string('version', None, 'table version, e.g. v1.0-mini')
    flags.DEFINE_string('split', None, 'split name, e.g. mini_val')
    flags.DEFINE_string('out', None, 'output folder for metrics_summary.json (results and params modes)')


def main(argv):
    del argv
    if FLAGS.params:
        _params_mode()
        return
    if FLAGS.workdir or FLAGS.config:
        if not FLAGS.workdir:
            sys.exit('error: checkpoint mode needs --workdir (and --config unless the workdir has its config.json); '
                     '--params DIR evaluates a params folder')
        if FLAGS.out:
            sys.exit('error: --out goes with --results or --params (--workdir writes W/eval)')
        logging.set_verbosity(logging.WARNING)
        exit_on(validate, FLAGS.config)
        if FLAGS.expert:
            exit_on(evaluate_expert, FLAGS.config, FLAGS.workdir)
            return
        exit_on(evaluate_checkpoint, FLAGS.config, FLAGS.workdir, FLAGS.step)
        return
    if FLAGS.expert:
        sys.exit('error: --expert needs --workdir (and --config unless the workdir has its config.json)')
    missing = [n for n in ('results', 'dataroot', 'version', 'split', 'out') if not getattr(FLAGS, n)]
    if missing:
        sys.exit('error: missing flags: ' + ', '.join('--' + n for n in missing))
    if not storage.as_path(FLAGS.results).exists():
        sys.exit(f'error: results file not found: {FLAGS.results}')
    try:
        with contextlib.ExitStack() as stack:
            results = stack.enter_context(storage.local_file(FLAGS.results))
            out = stack.enter_context(storage.local_folder(FLAGS.out))
            summary = nuscenes_metrics.run_detection_eval(results, FLAGS.dataroot, FLAGS.version, FLAGS.split, out)
    except (ValueError, AssertionError) as e:
        sys.exit(f'error: {e}')
    print(nuscenes_metrics.format_metrics(summary))
    print(f"wrote {os.path.join(FLAGS.out, 'metrics_summary.json')}")


if __name__ == '__main__':
    define_flags()
    try:
        app.run(main, argv=exit_on(config_argv, sys.argv), flags_parser=parse_flags)
    except KeyboardInterrupt:
        print('Ctrl-C: evaluation stopped', file=sys.stderr)
        sys.exit(130)
