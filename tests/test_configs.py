import glob
import importlib
import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from fd3d_jax.distill import make_distiller
from fd3d_jax.distill.expert import head_copy_summary
from fd3d_jax.errors import ConfigError
from fd3d_jax.models import build
from fd3d_jax.models.inputs import batch_spec
from fd3d_jax.validate import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(path, *overrides):
    argv = ['prog', f'--config={path}', *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_every_config_file_builds_and_overrides_from_the_command_line():
    files = [f for f in glob.glob(os.path.join(REPO, 'configs', '*.py')) if not f.endswith(('__init__.py', 'common.py'))]
    assert files
    for path in files:
        config = _parse(f'{path}:toy', '--config.data.dataroot=/somewhere', '--config.data.max_gt=7')
        assert config.data.dataroot == '/somewhere' and config.data.max_gt == 7
        assert {'seed', 'data'} <= set(config)
        for key in ('dataroot', 'version', 'train_split', 'val_split'):
            assert key in config.data
        if 'model' in config:  # trainable configs
            for key in ('batch_size', 'num_steps', 'checkpoint_every'):
                assert key in config.train
            assert {'lr', 'weight_decay', 'backbone_lr_mult', 'grad_clip'} <= set(config.optim)
            config = _parse(f'{path}:toy', '--config.train.num_steps=9', '--config.optim.lr=1e-3')
            assert config.train.num_steps == 9 and config.optim.lr == 1e-3


def test_bad_config_argument_and_key_are_reported():
    path = os.path.join(REPO, 'configs', 'data.py')
    with pytest.raises(Exception, match="takes one of :full, :toy"):
        _parse(f'{path}:huge')
    with pytest.raises(Exception, match='no_such_key'):
        _parse(f'{path}:toy', '--config.data.no_such_key=1')


def _abstract_variables(config):
    """The model's variables as shape structs (``jax.eval_shape``: nothing is computed)."""
    model, key = build(config.model), jax.random.PRNGKey(0)
    return jax.eval_shape(lambda b: model.init({'params': key, 'dropout': key}, b), batch_spec(config, 1))


@pytest.mark.parametrize('name', ['bevformer_tiny', 'bevformer_base', 'detr3d_r50', 'detr3d_r101'])
def test_demo_configs_build(name):
    """The ``:demo`` sizes (README results) are consistent: the model initialises on their inputs."""
    config = _parse(os.path.join(REPO, 'configs', f'{name}.py:demo'))
    params = _abstract_variables(config)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) > 0
    assert config.train.num_steps > 0 and not config.model.grid_mask and not config.data.photometric


@pytest.mark.parametrize('name', ['fd3d_bevformer_base_to_tiny', 'fd3d_detr3d_r101_to_r50'])
def test_demo_pairs_fit(name):
    """The ``:demo`` distillation pairs (experiments/distill_table.py) pair levels and BEVs."""
    config = _parse(os.path.join(REPO, 'configs', f'{name}.py:demo'))
    distiller = make_distiller(config)  # eval_shape only: checks level pairing and the BEV factor
    assert distiller.pairs and config.distill.feature_norm == 'both'
    # the expert-head-only baseline means the same in both tables: the whole head is copied
    summary = head_copy_summary(_abstract_variables(config)['params']['head'], distiller.expert_abstract_params['head'])
    assert summary['copied_leaves'] == summary['leaves'] and summary['copied_values'] == summary['values'], summary


ARGS = {'bevformer_tiny': ('full', 'fd3d', 'toy', 'demo'), 'bevformer_small': ('full', 'fd3d', 'toy'),
        'bevformer_base': ('full', 'toy', 'demo'), 'detr3d_r50': ('full', 'toy', 'demo'),
        'detr3d_r101': ('full', 'toy', 'demo'), 'data': ('full', 'toy'),
        'fd3d_bevformer_base_to_tiny': ('full', 'toy', 'demo'), 'fd3d_bevformer_base_to_small': ('full', 'toy'),
        'fd3d_detr3d_r101_to_r50': ('full', 'toy', 'demo')}


def test_every_shipped_config_validates():
    names = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, 'configs', '*.py'))} - {'__init__', 'common'}
    assert names == set(ARGS)
    for name, args in ARGS.items():
        for arg in args:
            assert validate(importlib.import_module(f'configs.{name}').get_config(arg))


@pytest.mark.parametrize('key, value, message', [
    ('distill.method', 'kd', r"config.distill.method must be 'none', 'fitnet', 'mgd', 'heatmap' or 'fd3d', got 'kd'"),
    ('distill.feature_norm', 'bn', r"config.distill.feature_norm must be 'none', 'expert' or 'both', got 'bn'"),
    ('distill.mask.mode', 'soft', r"config.distill.mask.mode must be 'zero' or 'random', got 'soft'"),
    ('distill.mask.select', 'all', r"config.distill.mask.select must be 'score', 'topk' or 'gt', got 'all'"),
    ('distill.focal.source', 'expert', r"config.distill.focal.source must be 'raw' or 'generated'"),
    ('distill.focal.queries', 'some', r"config.distill.focal.queries must be 'all' or 'selected'"),
    ('distill.generative.area', 'sum', r"config.distill.generative.area must be 'full' or 'instance'"),
    ('distill.focal.weight', -1.0, r'config.distill.focal.weight must be >= 0.0, got -1.0'),
    ('distill.mask.random_ratio', 1.5, r'config.distill.mask.random_ratio must be >= 0.0 and <= 1.0, got 1.5'),
    ('distill.mask.topk', 0, r'config.distill.mask.topk must be >= 1, got 0'),
    ('train.nonfinite', 'ignore', r"config.train.nonfinite must be 'stop' or 'skip', got 'ignore'"),
    ('train.batch_size', 0, r'config.train.batch_size must be >= 1, got 0'),
    ('optim.lr', 0.0, r'config.optim.lr must be > 0.0, got 0.0'),
    ('model.name', 'pointpillars', r"config.model.name must be 'bevformer' or 'detr3d', got 'pointpillars'"),
    ('model.sca_max_cameras', 7, r'config.model.sca_max_cameras must be >= 0 and <= 6, got 7'),
    ('model.sca_batch0_hits', True, None),
])
def test_validate_names_the_key(key, value, message):
    config = importlib.import_module('configs.fd3d_bevformer_base_to_tiny').get_config('toy')
    *path, last = key.split('.')
    node = config
    for part in path:
        node = node[part]
    node[last] = value
    if message is None:     # valid alone; with a sparse SCA it is not
        assert validate(config)
        config.model.sca_max_cameras = 2
        message = r'config.model.sca_batch0_hits .* needs config.model.sca_max_cameras=0, got 2'
    with pytest.raises(ConfigError, match=message):
        validate(config)
