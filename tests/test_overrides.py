"""Command-line config overrides are checked against the config file's own types and tuple lengths, and their
meaning (class names, point ranges, class counts) by ``validate``, before anything is loaded; a missing config file
or a refused ``:ARG`` is one ``error:`` line."""
import glob
import os
import re
import subprocess
import sys
import time

import ml_collections
import pytest

from fd3d_jax.cli import load_config_file
from fd3d_jax.errors import ConfigError
from fd3d_jax.validate import ANY_LENGTH, check_against_default, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'bevformer_tiny.py')


def _set(config, key, value):
    *path, last = key.split('.')
    node = config
    for part in path:
        node = node[part]
    node[last] = value
    return config


def _overridden(key, value, spec=f'{TINY}:toy'):
    return load_config_file(spec), _set(load_config_file(spec), key, value)


@pytest.mark.parametrize('key, value, message', [
    ('optim.betas', ('(0.9,abc)',), r"config.optim.betas must be a tuple of 2 numbers like its default "
                                    r"\(0.9, 0.999\), got the text '\(0.9,abc\)': not a Python tuple"),
    ('loss.code_weights', (1, 1, 1), r'config.loss.code_weights must be a tuple of 10 numbers .* got 3: \(1, 1, 1\)'),
    ('data.point_cloud_range', (1, 2, 3, 4, 5), r'config.data.point_cloud_range must be a tuple of 6 numbers'),
    ('model.rotate_center', (5.5, 4), r'config.model.rotate_center\[0\] must be an integer .* got 5.5'),
    ('model.backbone.dcn_stages', (1, 0, 0, 0), r'config.model.backbone.dcn_stages\[0\] must be True or False'),
    ('data.class_names', ('car', 3), r'config.data.class_names\[1\] must be a string'),
])
def test_an_override_of_another_type_or_length_than_the_default_names_the_key(key, value, message):
    default, config = _overridden(key, value)
    with pytest.raises(ConfigError, match=message):
        check_against_default(default, config)


@pytest.mark.parametrize('change, message', [
    (dict(depth='50'), r"config.model.backbone.depth must be an integer like its default 50, got '50'"),
    (dict(remat=0), r'config.model.backbone.remat must be True or False like its default False, got 0'),
    (dict(dcn_stages=False), r'config.model.backbone.dcn_stages must be a tuple of 4 True/False values like its '
                             r'default \(False, False, False, False\), got False'),
    (dict(depth=None), r'config.model.backbone.depth is missing: a command-line override replaced '
                       r'config.model.backbone'),
    (dict(strides=(1, 2)), r'config.model.backbone.strides is not a key of the config file'),
])
def test_a_section_given_whole_keeps_the_keys_and_types_of_the_default(change, message):
    """``--config.model.backbone="{...}"`` replaces the section: ml_collections checks none of its values.
    ``None`` in ``change``: that key left out."""
    default = load_config_file(f'{TINY}:toy')
    section = {key: value for key, value in {**default.model.backbone.to_dict(), **change}.items() if value is not None}
    config = _set(load_config_file(f'{TINY}:toy'), 'model.backbone', ml_collections.ConfigDict(section))
    with pytest.raises(ConfigError, match=message):
        check_against_default(default, config)


def test_overrides_of_the_default_type_pass_and_ints_become_floats_where_the_default_has_floats():
    default, config = _overridden('loss.code_weights', (1,) * 10)
    _set(config, 'model.backbone.out_indices', (1, 2, 3))      # one entry per stage fed to the neck: any length
    _set(config, 'model.neck.in_channels', (64, 128, 256))
    _set(config, 'data.class_names', ('car',))                # strings: any length
    assert check_against_default(default, config) is config
    assert config.loss.code_weights == (1.0,) * 10 and all(type(w) is float for w in config.loss.code_weights)
    default, config = _overridden('model.backbone.stage_blocks', (2, 2, 2, 2), f'{TINY}:full')
    assert check_against_default(default, config).model.backbone.stage_blocks == (2, 2, 2, 2)  # default None


def _tuple_keys(node, prefix=''):
    for key, value in node.items():
        if hasattr(value, 'items'):
            yield from _tuple_keys(value, f'{prefix}{key}.')
        elif isinstance(value, tuple) and value and not isinstance(value[0], str) and key not in ANY_LENGTH:
            yield prefix + key, value


def test_the_length_of_every_tuple_of_every_shipped_config_is_read_off_the_config():
    """No list of keys: each fixed-length tuple of every config file is checked, one element short."""
    files = sorted(set(glob.glob(os.path.join(ROOT, 'configs', '*.py'))) - {
        os.path.join(ROOT, 'configs', name) for name in ('__init__.py', 'common.py')})
    checked = set()
    for path in files:
        default = load_config_file(f'{path}:toy')
        for key, value in _tuple_keys(default):
            config = _set(load_config_file(f'{path}:toy'), key, value[:-1])
            with pytest.raises(ConfigError, match=rf'^config.{re.escape(key)} must be a tuple of {len(value)} '):
                check_against_default(default, config)
            checked.add(key)
    assert {'optim.betas', 'loss.code_weights', 'data.point_cloud_range', 'expert.model.pc_range'} <= checked


@pytest.mark.parametrize('key, value, message', [
    ('data.class_names', ('(car,pedestrian)',), r"config.data.class_names is the one string '\(car,pedestrian\)': "
                                                r"in a shell, quote the names and the tuple, e.g. "
                                                r"--config.data.class_names=\"\('car','pedestrian'\)\""),
    ('data.class_names', ('car', 'pedestrain'), r"config.data.class_names: 'pedestrain' is not a nuScenes "
                                                r"detection class; choose from car, truck, "),
    ('data.class_names', ('car', 'car'), r'config.data.class_names names car more than once'),
    ('data.class_names', (), r'config.data.class_names must be a non-empty tuple of class names, got \(\)'),
    ('data.class_names', ('car', 'pedestrian'), r'config.model.num_classes=10 must be the number of '
                                                r'config.data.class_names \(2\): set --config.model.num_classes=2'),
    ('data.point_cloud_range', (-50, -50, 3, 50, 50, -5), r'config.data.point_cloud_range: z_min=3 must be < '
                                                          r'z_max=-5'),
    ('data.point_cloud_range', (0, 0, 0, 1, 1), r'config.data.point_cloud_range must be 6 numbers'),
    ('model.pc_range', (-50, 50, -5, 50, -50, 3), r'config.model.pc_range: y_min=50 must be < y_max=-50'),
    ('model.backbone.out_indices', (2, 4), r'config.model.backbone.out_indices must be distinct ResNet stages 0..3'),
    ('model.backbone.out_indices', (1, 2, 3), r'config.model.neck.in_channels=\(128, 256\) must have one entry per '
                                              r'config.model.backbone.out_indices=\(1, 2, 3\)'),
])
def test_validate_checks_class_names_point_ranges_and_stages(key, value, message):
    config = _set(load_config_file(f'{TINY}:toy'), key, value)
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_validate_refuses_an_expert_of_other_classes():
    pair = os.path.join(ROOT, 'configs', 'fd3d_bevformer_base_to_tiny.py:toy')
    config = _set(_set(load_config_file(pair), 'data.class_names', ('car',)), 'model.num_classes', 1)
    with pytest.raises(ConfigError, match=r'config.expert.model.num_classes=10 must be the number of '
                                          r'config.data.class_names \(1\): an expert of other classes'):
        validate(config)


def test_a_config_file_that_cannot_be_loaded_names_the_file_and_argument(tmp_path):
    with pytest.raises(ConfigError, match=r'^configs/bevformer_tinny.py: no such config file \(did you mean '
                                          r'configs/bevformer_tiny.py\?\)$'):
        load_config_file('configs/bevformer_tinny.py')
    with pytest.raises(ConfigError, match=r"^configs/bevformer_tiny.py:toyy: configs/bevformer_tiny.py takes one "
                                          r"of :full, :fd3d, :toy, :demo, got ':toyy'$"):
        load_config_file('configs/bevformer_tiny.py:toyy')
    (tmp_path / 'broken.py').write_text('def get_config(:\n')
    with pytest.raises(ConfigError, match=rf'^{tmp_path}/broken.py: not a Python config file: .*\(line 1\)$'):
        load_config_file(f'{tmp_path}/broken.py')
    (tmp_path / 'plain.py').write_text('X = 1\n')
    with pytest.raises(ConfigError, match=r'plain.py: not a config file: it has no get_config\(\)$'):
        load_config_file(f'{tmp_path}/plain.py:toy')
    with pytest.raises(ConfigError, match=r'workdir.py: its get_config\(\) takes an argument after a colon'):
        load_config_file(os.path.join(ROOT, 'fd3d_jax', 'train', 'workdir.py'))


def _run(module, *args):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    start = time.time()
    res = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    return res, time.time() - start


CLI_CASES = [
    (('--config=configs/bevformer_tiny.py:toy', '--config.optim.betas=(0.9,abc)'),
     "error: config.optim.betas must be a tuple of 2 numbers like its default (0.9, 0.999), got the text "
     "'(0.9,abc)': not a Python tuple (each element a literal: numbers, True/False, quoted strings)"),
    (('--config=configs/bevformer_tiny.py:toy', '--config.data.class_names=(car,pedestrian)'),
     "error: config.data.class_names is the one string '(car,pedestrian)': in a shell, quote the names and the "
     "tuple, e.g. --config.data.class_names=\"('car','pedestrian')\""),
    (('--config=configs/bevformer_tiny.py:toyy',),
     "error: configs/bevformer_tiny.py:toyy: configs/bevformer_tiny.py takes one of :full, :fd3d, :toy, :demo, "
     "got ':toyy'"),
    (('--config', 'configs/bevformer_tinny.py'),
     'error: configs/bevformer_tinny.py: no such config file (did you mean configs/bevformer_tiny.py?)'),
    (('--config=configs/bevformer_tiny.py:toy', '--config.loss.code_weights=(1,1,1)'),
     'error: config.loss.code_weights must be a tuple of 10 numbers like its default (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, '
     '1.0, 1.0, 0.2, 0.2), got 3: (1, 1, 1)'),
    (('--config=configs/bevformer_tiny.py:toy', '--config.data.point_cloud_range=(1,2,3,4,5)'),
     'error: config.data.point_cloud_range must be a tuple of 6 numbers like its default (-51.2, -51.2, -5.0, 51.2, '
     '51.2, 3.0), got 5: (1, 2, 3, 4, 5)'),
    (('--config=configs/bevformer_tiny.py:toy', "--config.data.class_names=('car','pedestrain')"),
     "error: config.data.class_names: 'pedestrain' is not a nuScenes detection class; choose from car, truck, "
     'construction_vehicle, bus, trailer, barrier, motorcycle, bicycle, pedestrian, traffic_cone'),
]


@pytest.mark.parametrize('module, args, line', [('fd3d_jax.train', *case) for case in CLI_CASES]
                         + [('fd3d_jax.eval', *case) for case in CLI_CASES[:4:3]])
def test_bad_config_files_and_overrides_end_the_cli_with_one_line_before_anything_is_loaded(module, args, line,
                                                                                          tmp_path):
    workdir = tmp_path / 'run'
    res, seconds = _run(module, *args, f'--workdir={workdir}')
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert 'Traceback' not in res.stderr and 'Fatal Python error' not in res.stderr, res.stderr[-3000:]
    assert [text for text in res.stderr.splitlines() if text.startswith('error:')] == [line], res.stderr[-3000:]
    assert seconds < 10 and not workdir.exists()
