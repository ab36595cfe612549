"""``python -m fd3d_jax.eval --params DIR``: a params folder (converted or exported) scored with its config's
detector at the config's own data settings. A toy BEVFormer trained two steps, taken to a ``.pth`` and back by
the converter, scores exactly as its training workdir (marked ``scaleout``: it trains and evaluates four times);
a params folder of another model or a distillation pair's config ends with one ``error:`` line."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import bevformer_tiny, detr3d_r50, fd3d_bevformer_base_to_tiny
from experiments.export_expert import export
from fd3d_jax import eval as eval_cli
from fd3d_jax.errors import CheckpointError, ConfigError
from fd3d_jax.models import build
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.params_io import save_params
from fd3d_jax.train import loop, workdir as workdir_lib
from fd3d_jax.train.checkpoint import Checkpointer
from fd3d_jax.train.state import init_params
from tests.train.test_train_step import batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'configs/bevformer_tiny.py:toy'
PAIR = 'configs/fd3d_bevformer_base_to_tiny.py:toy'
quiet = lambda *a, **k: None   # noqa: E731


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, '-m', 'fd3d_jax.eval', *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _data_flags(data_cfg):
    return [f'--config.data.dataroot={data_cfg.dataroot}', f'--config.data.records_dir={data_cfg.records_dir}']


def _toy(module, data_cfg):
    """The toy config as the command line makes it (``--config X.py:toy`` with the synthetic set's folders)."""
    config = module.get_config('toy')
    config.data.dataroot, config.data.records_dir = data_cfg.dataroot, data_cfg.records_dir
    return config


def _error_line(res):
    """The one ``error:`` line of a run that ended with exit status 1 and no traceback."""
    assert res.returncode == 1, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def _read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _scores(folder):
    """``metrics_summary.json`` of ``folder`` less its wall-clock ``eval_time``."""
    return {key: value for key, value in _read(folder, 'metrics_summary.json').items() if key != 'eval_time'}


def _zero_params(config):
    """Params of ``config.model`` (zeros: only the tree and shapes matter here)."""
    model = build(config.model)
    abstract = jax.eval_shape(lambda: init_params(model, dummy_batch(config, 1, queue_length=1,
                                                                     raw_wh=loop.INIT_IMAGE_WH), config.seed))
    return jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)


@pytest.mark.slow
@pytest.mark.scaleout
def test_a_params_folder_round_tripped_through_a_pth_scores_exactly_as_its_workdir(data_cfg, train_records,
                                                                                  tmp_path):
    """Trained two steps and evaluated from its workdir (``--workdir``'s ``evaluate_checkpoint``), converted to a
    ``.pth`` (``--to-torch``) and back (``--torch-checkpoint``, no ``config.json``): ``--params P --config`` gives
    the same detections, NDS and mAP bit for bit, in ``P/eval``. The folder exported by
    ``experiments/export_expert.py`` scores the same with its own ``config.json``."""
    pytest.importorskip('torch')
    from fd3d_jax.convert import checkpoint_files
    config = _toy(bevformer_tiny, data_cfg)
    config.train.update(num_steps=2, checkpoint_every=2, log_every=1, eval_every=0)
    workdir = str(tmp_path / 'run')
    trainer = loop.Trainer(config, len(train_records['samples']))
    for batch in batches(config, train_records, 2):
        trainer.step(batch)
    loop.write_config(config, workdir)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(2, trainer.state)
    ckpt.close()
    expected = loop.evaluate_checkpoint(config, workdir, log=quiet)
    reference = os.path.join(workdir, 'eval')
    detections = _read(reference, 'results.json')['results']
    assert sum(len(boxes) for boxes in detections.values()) > 0

    pth, converted = str(tmp_path / 'tiny.pth'), str(tmp_path / 'converted')
    checkpoint_files.to_torch(workdir, config, pth, config_name=TINY)
    checkpoint_files.to_flax(pth, config, converted, config_name=TINY)
    assert not os.path.exists(os.path.join(converted, 'config.json'))
    res = _cli('--params', converted, '--config', TINY, *_data_flags(data_cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    out = os.path.join(converted, 'eval')
    assert f'wrote results.json and metrics_summary.json to {out}' in res.stdout
    assert '| NDS | mAP |' in res.stdout
    summary = _read(out, 'metrics_summary.json')
    assert (summary['nd_score'], summary['mean_ap']) == (expected['nd_score'], expected['mean_ap'])
    assert _scores(out) == _scores(reference)   # every class's AP and TP error too
    assert _read(out, 'results.json')['results'] == detections

    exported = str(tmp_path / 'exported')
    export(workdir, exported)
    own = workdir_lib.read_config(exported)
    eval_cli.evaluate_params_folder(own, exported, log=quiet)
    assert _scores(os.path.join(exported, 'eval')) == _scores(reference)
    assert _read(os.path.join(exported, 'eval'), 'results.json')['results'] == detections


def test_params_of_another_model_and_a_pair_config_end_with_one_error_line(data_cfg, tmp_path):
    """DETR3D params evaluated as BEVFormer-tiny: the leaf listing of ``restore_model_params`` and the config the
    folder was converted with (its ``conversion.json``), exit status 1; a distillation pair's config and
    ``--params`` beside ``--workdir`` are refused before anything is loaded."""
    other = str(tmp_path / 'detr3d')
    save_params(_zero_params(_toy(detr3d_r50, data_cfg)), other)
    with open(os.path.join(other, 'conversion.json'), 'w') as f:
        json.dump({'config': 'configs/detr3d_r50.py:toy', 'model': 'detr3d'}, f)
    line = _error_line(res := _cli('--params', other, '--config', TINY, *_data_flags(data_cfg)))
    assert line == f'error: params in {other} do not fit config.model:', res.stderr[-3000:]
    assert '\n  missing: ' in res.stderr and ' more\n' in res.stderr, res.stderr[-3000:]
    assert f'({other}/conversion.json: converted with --config configs/detr3d_r50.py:toy)' in res.stderr
    assert not os.path.exists(os.path.join(other, 'eval'))

    line = _error_line(_cli('--params', other, '--config', PAIR, *_data_flags(data_cfg)))
    assert line.startswith(f"error: {PAIR} is a distillation pair's (config.expert, config.distill): --params "
                           "scores one detector") and 'pass the expert\'s own config' in line
    line = _error_line(_cli('--params', other, '--config', TINY, f'--workdir={tmp_path}'))
    assert line == 'error: --params evaluates a params folder on its own: drop --workdir'


def test_the_config_of_a_params_folder(data_cfg, tmp_path):
    """Without ``--config``: an exported folder's ``config.json`` (through ``fd3d_jax/train/workdir.py:DIR``), a
    converted folder's refusal naming the config of its ``conversion.json``. With it, an exported folder's params
    are scored only on the model and data they were trained on (the data paths and split may change)."""
    converted, exported = str(tmp_path / 'converted'), str(tmp_path / 'exported')
    os.makedirs(converted)
    with open(os.path.join(converted, 'conversion.json'), 'w') as f:
        json.dump({'config': 'configs/bevformer_base.py:full'}, f)
    with pytest.raises(ConfigError, match=rf'^{converted} has no config.json .*pass --config configs/NAME.py\[:ARG\]'
                                          rf'.*\(its conversion.json: converted with --config configs/bevformer_base'):
        eval_cli.config_argv(['eval', '--params', converted])
    assert eval_cli.config_argv(['eval', f'--params={converted}', '--config', TINY]) == \
        ['eval', f'--params={converted}', '--config', TINY]

    config = _toy(bevformer_tiny, data_cfg)
    loop.write_config(config, exported)
    split = '--config.data.val_split=mini_train'
    assert eval_cli.config_argv(['eval', '--params', exported, split]) == \
        ['eval', f'--config={eval_cli.OWN_CONFIG}:{exported}', '--params', exported, split]
    moved = config.copy_and_resolve_references()
    moved.data.dataroot, moved.data.val_split = str(tmp_path / 'elsewhere'), 'mini_train'
    eval_cli.check_params_config(moved, exported)   # where the data lies and which split: free
    rescaled = config.copy_and_resolve_references()
    rescaled.data.image_scale = 1.0
    with pytest.raises(ConfigError, match=rf'cannot evaluate {exported} with this config: its params were '
                                          r'trained with another model or data \(1 keys differ .*\n  '
                                          r'data.image_scale: 0.5 -> 1.0'):
        eval_cli.check_params_config(rescaled, exported)
    with pytest.raises(CheckpointError, match=f'{exported} holds no params/ folder'):
        eval_cli.evaluate_params_folder(config, exported)
    with pytest.raises(ConfigError, match='is a distillation pair'):
        eval_cli.evaluate_params_folder(_toy(fd3d_bevformer_base_to_tiny, data_cfg), exported)
