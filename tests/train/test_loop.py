"""The training loop as users run it: the CLI killed (SIGKILL) or preempted (SIGTERM) at a random step and
resumed bitwise, two processes against one, non-finite losses, and crash-safe checkpoints.

The CLI tests are marked ``scaleout`` (slow; ``make test`` runs them in a second pytest call)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import detr3d_r50
from fd3d_jax.errors import ConfigError
from fd3d_jax.train import loop
from fd3d_jax.train.checkpoint import Checkpointer
from fd3d_jax import storage
from fd3d_jax.convert.init_from import InitReport
from fd3d_jax.train.metrics_writer import MetricsWriter, read_metrics
from tests.fake_gcs import fake_gcs
from tests.train.test_train_step import batches, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
scaleout = [pytest.mark.slow, pytest.mark.scaleout]


def _cli(args, devices=1, **kw):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    return subprocess.Popen([sys.executable, '-m', 'fd3d_jax.train', *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _common(data_cfg, steps, **train):
    sets = dict(num_steps=steps, log_every=1, **train)
    return ['--config=configs/detr3d_r50.py:toy', f'--config.data.dataroot={data_cfg.dataroot}',
            f'--config.data.records_dir={data_cfg.records_dir}', '--config.optim.warmup_iters=2',
            *[f'--config.train.{k}={v}' for k, v in sets.items()]]


def _finish(proc, timeout=900):
    log = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, log[-3000:]
    return log


def _train_lines(workdir):
    """Metric lines of the training steps without the wall-clock rate."""
    lines = [m for m in read_metrics(os.path.join(workdir, 'metrics.jsonl')) if 'loss' in m]
    return [{k: v for k, v in m.items() if k != 'steps_per_second'} for m in lines]


def _wait_for_step(proc, workdir, step, timeout=600):
    path, deadline = os.path.join(workdir, 'metrics.jsonl'), time.time() + timeout
    while proc.poll() is None:
        if os.path.exists(path) and any(m['step'] >= step for m in read_metrics(path)):
            return
        assert time.time() < deadline, f'no step {step} in {path} after {timeout} s'
        time.sleep(0.05)
    raise AssertionError(f'training ended before step {step}: {proc.communicate()[0][-3000:]}')


@pytest.mark.slow
@pytest.mark.scaleout
def test_killed_or_preempted_at_a_random_step_resumes_bitwise(data_cfg, tmp_path):
    """SIGKILL (at any moment, even during an asynchronous save) loses at most the steps since the last
    checkpoint; SIGTERM saves the current step and exits with status 0. Resumed, both runs log exactly the
    metrics of an uninterrupted run (same data order, RNG and optimiser state) and end evaluated."""
    steps = 24
    kill_at, term_at = (int(x) for x in np.random.default_rng().integers(1, steps - 8, size=2))
    why = f'SIGKILL after step {kill_at}, SIGTERM after step {term_at}'
    common = _common(data_cfg, steps, checkpoint_every=3)
    full, killed, termed = (str(tmp_path / n) for n in ('full', 'killed', 'termed'))
    for w, at, sig in ((killed, kill_at, signal.SIGKILL), (termed, term_at, signal.SIGTERM)):
        proc = _cli([*common, f'--workdir={w}'])
        _wait_for_step(proc, w, at)
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait()
        else:
            log = _finish(proc)
    assert 'SIGTERM: saved' in log, (why, log[-2000:])
    latest = Checkpointer(termed).latest_step()
    assert latest == _train_lines(termed)[-1]['step'] >= term_at, why   # the step it stopped at
    for w in (killed, termed):
        assert not os.path.exists(os.path.join(w, 'eval', 'metrics_summary.json')), why

    runs = {w: _cli([*common, f'--workdir={w}']) for w in (full, killed, termed)}
    logs = {w: _finish(p) for w, p in runs.items()}
    assert f'resumed from {os.path.join(termed, "checkpoints")}/{latest}' in logs[termed], why
    expected = _train_lines(full)
    assert [m['step'] for m in expected] == list(range(1, steps + 1))
    for w in (killed, termed):
        assert _train_lines(w) == expected, why   # bitwise: every metric of every step
        assert Checkpointer(w).latest_step() == steps
        with open(os.path.join(w, 'eval', 'metrics_summary.json')) as f:
            assert 0.0 <= json.load(f)['nd_score'] <= 1.0

    ev = subprocess.run([sys.executable, '-m', 'fd3d_jax.eval', *common, f'--workdir={killed}', '--step=21'],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert os.path.exists(os.path.join(killed, 'eval', 'step_21', 'metrics_summary.json'))


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.scaleout
def test_two_processes_train_like_one_process(data_cfg, tmp_path):
    """2 processes x 2 CPU devices (``jax.distributed`` on loopback, one shared workdir) log the losses of 1
    process x 4 devices on the same global batches, save one checkpoint together and evaluate the same
    detections (gathered to process 0)."""
    common = _common(data_cfg, 3, batch_size=4, checkpoint_every=2)   # evaluation: one sample per device
    multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
    address = f'localhost:{_free_port()}'
    procs = [_cli([*common, f'--workdir={multi}', f'--coordinator_address={address}', '--num_processes=2',
                   f'--process_id={p}'], devices=2) for p in range(2)]
    logs = [_finish(p) for p in procs]
    assert 'on 2 processes' in logs[0] and 'training' not in logs[1]   # process 0 logs
    _finish(_cli([*common, f'--workdir={single}'], devices=4))
    a, b = _train_lines(multi), _train_lines(single)
    assert [m['step'] for m in a] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(y)], rtol=1e-6)
    assert Checkpointer(multi).all_steps() == [2, 3]
    res = [json.load(open(os.path.join(w, 'eval', 'results.json')))['results'] for w in (multi, single)]
    assert res[0].keys() == res[1].keys()
    for token in res[0]:
        assert len(res[0][token]) == len(res[1][token])
        for d0, d1 in zip(res[0][token], res[1][token]):
            np.testing.assert_allclose(d0['translation'] + [d0['detection_score']],
                                       d1['translation'] + [d1['detection_score']], rtol=1e-4, atol=1e-5)


def test_eval_batch_defaults_to_one_sample_per_device():
    """Unset (0), the evaluation batch is the mesh's device count, so ``train.batch_size=4`` on a 4-device host
    needs no other key; a set value that the devices do not divide names the key."""
    config = detr3d_r50.get_config('toy')
    assert config.train.eval_batch_size == 0
    assert [loop.eval_batch_size(config, n) for n in (1, 4, 8)] == [1, 4, 8]
    config.train.eval_batch_size = 6
    assert loop.eval_batch_size(config, 2) == 6
    with pytest.raises(ConfigError, match='train.eval_batch_size=6 must be a multiple of the 4 devices'):
        loop.eval_batch_size(config, 4)


def test_skip_mode_leaves_params_unchanged_and_counts_the_step(data_cfg, train_records):
    config = small_config(detr3d_r50, data_cfg, nonfinite='skip')
    good, bad = batches(config, train_records, 2)
    bad = dict(bad, img=np.full_like(bad['img'], np.nan))
    trainer = loop.Trainer(config, len(train_records['samples']))
    before = jax.device_get(trainer.state.params)
    m = jax.device_get(trainer.step(bad))
    assert m['nonfinite'] == 1 and m['skipped_steps'] == 1 and int(trainer.state.step) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(trainer.state.params), before)
    m = jax.device_get(trainer.step(good))
    assert m['nonfinite'] == 0 and m['skipped_steps'] == 1 and np.isfinite(m['loss'])
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), jax.device_get(trainer.state.params), before)
    assert any(jax.tree_util.tree_leaves(changed))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data_cfg, train_records, tmp_path):
    config = small_config(detr3d_r50, data_cfg, num_steps=6, checkpoint_every=1, log_every=4, eval_every=0)
    trainer = loop.Trainer(config, len(train_records['samples']))
    step = trainer.step

    def poisoned(batch):   # step 3 (state step 2) sees NaN images
        if trainer.host_step == 2:
            batch = dict(batch, img=np.full_like(batch['img'], np.nan))
        return step(batch)
    trainer.step = poisoned
    workdir = str(tmp_path / 'run')
    with pytest.raises(loop.TrainingError, match=r'non-finite loss or gradient at step 3 .*last good checkpoint '
                       rf'is {os.path.join(workdir, "checkpoints")}/2.*train\.nonfinite=skip'):
        loop.train_and_evaluate(config, workdir, trainer=trainer, log=lambda *a: None)
    ckpt = Checkpointer(workdir)
    assert ckpt.all_steps() == [1, 2]
    state, _ = ckpt.restore(trainer.state)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(state.params)))
    ckpt.close()


@pytest.mark.slow
@pytest.mark.scaleout
def test_a_run_killed_before_its_first_checkpoint_starts_over_with_its_metrics(data_cfg, train_records, tmp_path):
    """A SIGKILL before the first save finished leaves metric lines (the last one maybe cut short) and no
    checkpoint: the next run starts from step 0 and those lines do not stay in front of its own."""
    config = small_config(detr3d_r50, data_cfg, num_steps=2, checkpoint_every=2, log_every=1, eval_every=0)
    workdir = tmp_path / 'run'
    workdir.mkdir()
    stale = ''.join(json.dumps(dict(step=s, loss=1.0)) + '\n' for s in (1, 2, 3)) + '{"step": 4, "lo'
    (workdir / 'metrics.jsonl').write_text(stale)
    assert [m['step'] for m in read_metrics(str(workdir / 'metrics.jsonl'))] == [1, 2, 3]   # the cut line is left out
    trainer = loop.Trainer(config, len(train_records['samples']))
    loop.train_and_evaluate(config, str(workdir), trainer=trainer, log=lambda *a: None)
    lines = _train_lines(str(workdir))
    assert [m['step'] for m in lines] == [1, 2] and all(m['loss'] != 1.0 for m in lines)


CACHE_PROBE = """
import json, os, jax, jax.numpy as jnp, numpy as np
plain = jax.jit(lambda x: jnp.sin(x) @ x.T)
callback = jax.jit(lambda x: jax.pure_callback(lambda y: np.asarray(y) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype),
                                               jnp.cos(x)) @ x.T)
plain(jnp.ones((8, 8))).block_until_ready()
callback(jnp.ones((8, 8))).block_until_ready()
print(json.dumps(sorted(name.split('-')[0] for name in os.listdir(os.environ['JAX_COMPILATION_CACHE_DIR']))))
"""


def test_compile_cache_warning_only_when_a_cache_cannot_hold_the_step(tmp_path):
    """The warning's premise, in a child process with a persistent cache: JAX writes a plain jit to the cache
    but not one with a Python callback (as the scipy matcher's step); and the warning appears exactly for a
    cache folder with the scipy matcher."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    out = subprocess.run([sys.executable, '-c', CACHE_PROBE], env=env, capture_output=True, text=True, check=True)
    cached = json.loads(out.stdout.strip().splitlines()[-1])
    assert cached.count('jit__lambda') == 1, cached         # the plain one only
    config = detr3d_r50.get_config('toy')
    config.loss.matcher = 'scipy'
    assert 'matcher=jax' in loop.compile_cache_warning(config, str(tmp_path))
    assert loop.compile_cache_warning(config, '') is None
    config.loss.matcher = 'auto'                            # scipy on the CPU
    assert 'matcher=auto' in loop.compile_cache_warning(config, str(tmp_path))
    config.loss.matcher = 'jax'
    assert loop.compile_cache_warning(config, str(tmp_path)) is None


def test_config_json_files_and_metrics_of_a_bucket_workdir(tmp_path, monkeypatch):
    """A ``gs://`` workdir (``tests/fake_gcs.py``) gets ``config.json``, ``init_from.json``,
    ``head_from_expert.json`` and the metric lines of a resumed run cut back to its checkpoint, read back through
    the URL; nothing lands in ``<cwd>/gs:``."""
    monkeypatch.chdir(tmp_path)
    config = detr3d_r50.get_config('toy')
    report = InitReport(source='gs://b/r50', kind='params', loaded=['backbone/w'])
    with fake_gcs(tmp_path / 'bucket'):
        loop.write_config(config, 'gs://b/run')
        loop._log_init_from([report], config, 'gs://b/run', log=lambda *a: None)
        loop.write_json('gs://b/run', 'head_from_expert.json', {'copied_leaves': 3})
        writer = MetricsWriter('gs://b/run', tensorboard=False)
        for step in (1, 2, 3, 4):
            writer.write(step, {'loss': float(step)})
        loop._truncate_metrics(writer.path, 2)
        run = storage.as_path('gs://b/run')
        assert json.loads((run / 'config.json').read_text())['model']['name'] == config.model.name
        assert json.loads((run / 'init_from.json').read_text())[0]['loaded'] == ['backbone/w']
        assert json.loads((run / 'head_from_expert.json').read_text()) == {'copied_leaves': 3}
        assert [m['step'] for m in read_metrics('gs://b/run/metrics.jsonl')] == [1, 2]
    assert sorted(os.listdir(tmp_path / 'bucket' / 'b' / 'run')) == ['config.json', 'head_from_expert.json',
                                                                      'init_from.json', 'metrics.jsonl']
    assert not os.path.exists(tmp_path / 'gs:')
