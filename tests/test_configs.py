import glob
import os

import pytest
from absl import flags
from ml_collections import config_flags

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


@pytest.mark.parametrize('name', ['bevformer_tiny', 'bevformer_base', 'detr3d_r50', 'detr3d_r101'])
def test_demo_configs_build(name):
    """The ``:demo`` sizes (README results) are consistent: the model initialises on their inputs."""
    import jax
    from fd3d_jax.models.build import build
    from fd3d_jax.models.inputs import batch_spec
    config = _parse(os.path.join(REPO, 'configs', f'{name}.py:demo'))
    model = build(config.model)
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(lambda b: model.init({'params': key, 'dropout': key}, b), batch_spec(config, 1))
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) > 0
    assert config.train.num_steps > 0 and not config.model.grid_mask and not config.data.photometric


@pytest.mark.parametrize('name', ['fd3d_bevformer_base_to_tiny', 'fd3d_detr3d_r101_to_r50'])
def test_demo_pairs_fit(name):
    """The ``:demo`` distillation pairs (experiments/distill_table.py) pair levels and BEVs."""
    from fd3d_jax.distill.distiller import Distiller
    config = _parse(os.path.join(REPO, 'configs', f'{name}.py:demo'))
    distiller = Distiller(config)  # eval_shape only: checks level pairing and the BEV factor
    assert distiller.pairs and config.distill.feature_norm == 'both'
