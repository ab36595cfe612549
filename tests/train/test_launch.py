"""What a launch resolves and costs: per-device batch and the learning-rate rule (``mesh.launch_config``), the
diagnostics only on logged steps (``train_step.diagnostic_step``, ``loop._window_line``), ``train.profile``."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bevformer_tiny, fd3d_bevformer_base_to_tiny
from fd3d_jax.errors import ConfigError
from fd3d_jax.train import loop, mesh as mesh_lib
from fd3d_jax.train.profile import Profile
from fd3d_jax.train.train_step import diagnostic_step
from fd3d_jax.validate import validate


@pytest.mark.parametrize('module', [bevformer_tiny, fd3d_bevformer_base_to_tiny])
def test_a_full_config_runs_one_sample_per_device_at_the_linearly_scaled_lr(module):
    config = module.get_config('full')
    assert config.train.per_device_batch_size == 1 and config.optim.lr_scaling == 'linear'
    base_lr = config.optim.lr
    for devices, batch in ((8, 8), (32, 32), (1, 1)):
        resolved, line = mesh_lib.launch_config(config, devices)
        assert resolved.train.batch_size == batch
        np.testing.assert_allclose(resolved.optim.lr, base_lr * batch / 8, rtol=1e-12)
        assert f'global batch {batch} = 1 per device x {devices} devices' in line and 'linear scaling' in line
        again, _ = mesh_lib.launch_config(resolved, devices)          # W/config.json resolves to itself
        assert again.train.batch_size == batch and again.optim.lr == resolved.optim.lr
        assert resolved.train.per_device_batch_size == 0 and resolved.optim.lr_scaling == 'none'
    assert config.optim.lr == base_lr and config.train.per_device_batch_size == 1   # the input is not changed


def test_a_toy_config_keeps_its_global_batch_and_lr():
    config = bevformer_tiny.get_config('toy')
    resolved, line = mesh_lib.launch_config(config, 4)
    assert resolved.train.batch_size == config.train.batch_size and resolved.optim.lr == config.optim.lr
    assert 'not scaled' in line


def test_an_unknown_lr_rule_or_a_negative_per_device_batch_is_refused_naming_the_key():
    config = bevformer_tiny.get_config('toy')
    config.optim.lr_scaling = 'sqrt'
    with pytest.raises(ConfigError, match='optim.lr_scaling'):
        validate(config)
    config = bevformer_tiny.get_config('toy')
    config.train.per_device_batch_size = -1
    with pytest.raises(ConfigError, match='train.per_device_batch_size'):
        validate(config)


def test_diagnostics_run_on_the_logged_steps_and_their_window_mean_skips_the_others():
    # counts logged with log_every 3 and 7 steps: 3, 6 and the last, 7
    assert [s + 1 for s in range(7) if diagnostic_step(s, 3, 7)] == [3, 6, 7]
    assert [s + 1 for s in range(7) if diagnostic_step(jnp.int32(s), 3, 0)] == [3, 6]
    nan = float('nan')
    window = [dict(loss=np.float32(1.0), lr=0.1, skipped_steps=0, **{'grad_norm/focal/bev': np.float32(v)})
              for v in (nan, nan, 6.0)]
    mean = loop._window_line(window, 1.0, 3)
    assert mean['grad_norm/focal/bev'] == 6.0 and mean['loss'] == 1.0
    assert 'grad_norm/focal/bev' not in loop._window_line(window[:2], 1.0, 2)   # none computed (SIGTERM)


def test_profile_traces_the_steps_after_the_first(tmp_path):
    logged = []
    profile = Profile(tmp_path / 'profile', 1, 2, logged.append)
    step_fn = jax.jit(lambda x: x * 2)
    x = jnp.ones(3)
    for step in range(5):
        profile.before(step)
        x = step_fn(x)
        profile.after(step, x)
        assert profile.active == (step == 1)
    profile.close()
    assert logged == [f'profile of steps 2-3 written to {tmp_path / "profile"}']
    traces = [name for _, _, files in os.walk(tmp_path / 'profile') for name in files]
    assert any(name.endswith(('.xplane.pb', '.trace.json.gz')) for name in traces), traces
