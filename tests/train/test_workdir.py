"""A workdir's identity and its own config, Ctrl-C and the compilation lines, as users run them: a config of
another model or data is refused before anything is written, ``eval --workdir W`` runs with ``W``'s config,
``--expert`` writes beside the apprentice's results, Ctrl-C saves the step (a second one stops at once)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from configs import bevformer_tiny, detr3d_r50
from fd3d_jax.errors import ConfigError
from fd3d_jax.train import workdir as workdir_lib
from fd3d_jax.train.checkpoint import Checkpointer
from fd3d_jax.train.loop import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')


def _run(module, *args, timeout=600):
    return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _data_args(data_cfg):
    return [f'--config.data.dataroot={data_cfg.dataroot}', f'--config.data.records_dir={data_cfg.records_dir}']


def _files(folder):
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getmtime(os.path.join(d, f)))
                  for d, _, names in os.walk(folder) for f in names)


def test_identity_lists_the_differing_model_and_data_keys_names_first(tmp_path):
    saved = detr3d_r50.get_config('toy')
    write_config(saved, tmp_path)
    same = detr3d_r50.get_config('toy')
    same.data.dataroot, same.data.num_workers, same.data.val_split = '/elsewhere', 3, 'mini_train'  # where/how fast
    same.train.num_steps, same.optim.lr = 999, 1.0   # training keys may change on resume
    workdir_lib.check_identity(same, tmp_path)
    other = bevformer_tiny.get_config('toy')
    with pytest.raises(ConfigError) as error:
        workdir_lib.check_identity(other, tmp_path)
    lines = str(error.value).splitlines()
    assert lines[1] == "  model.name: 'detr3d' -> 'bevformer'"   # the names first, then the other keys
    count = len(workdir_lib.identity_differences(saved, other))
    assert count > workdir_lib.MAX_LINES
    assert lines[1 + workdir_lib.MAX_LINES] == f'  ... and {count - workdir_lib.MAX_LINES} more'
    assert f'({count} keys differ from' in lines[0]
    scaled = detr3d_r50.get_config('toy')
    scaled.data.image_scale = 0.25   # what the model sees: part of the identity
    assert workdir_lib.identity_differences(saved, scaled) == [
        f'data.image_scale: {saved.data.image_scale!r} -> 0.25']
    workdir_lib.check_identity(other, tmp_path / 'new')   # no config.json: nothing to compare


def test_a_workdir_written_before_a_key_existed_keeps_its_identity():
    """A config.json without ``model.reproduce_can_bus_bug`` or ``data.can_bus_from_poses`` ran with the value that
    reproduces the code before them (False): it resumes under today's config, not under one with them True."""
    now = bevformer_tiny.get_config('toy')
    older = json.loads(now.to_json_best_effort())
    del older['model']['reproduce_can_bus_bug'], older['data']['can_bus_from_poses'], older['data']['can_bus_root']
    assert workdir_lib.identity_differences(older, now) == []
    now.model.reproduce_can_bus_bug = now.data.can_bus_from_poses = True
    assert workdir_lib.identity_differences(older, now) == [
        'data.can_bus_from_poses: False -> True', 'model.reproduce_can_bus_bug: False -> True']


def test_workdir_config_reads_back_as_the_config_it_was(tmp_path):
    config = bevformer_tiny.get_config('toy')
    write_config(config, tmp_path)
    read = workdir_lib.get_config(str(tmp_path))
    assert read.to_dict() == config.copy_and_resolve_references().to_dict()   # tuples, not lists
    assert workdir_lib.default_config_argv(['x', f'--workdir={tmp_path}', '--step=3']) == [
        'x', f'--config={workdir_lib.__file__}:{tmp_path}', f'--workdir={tmp_path}', '--step=3']
    given = ['x', '--config=configs/detr3d_r50.py:toy', '--workdir', str(tmp_path)]
    assert workdir_lib.default_config_argv(given) == given
    (tmp_path / 'config.json').write_text('{"model": ')
    with pytest.raises(ConfigError, match='config.json is not a JSON config'):
        workdir_lib.read_config(tmp_path)


def test_a_workdir_refuses_another_model_and_evaluates_with_its_own_config(data_cfg, tmp_path):
    """Trained 2 steps; ``train`` with another model stops before writing anything (``config.json`` untouched);
    ``eval --workdir W`` without ``--config`` evaluates with W's config and its overrides on top; the
    first-step compilation is announced and left out of steps/s."""
    workdir = str(tmp_path / 'run')
    res = _run('fd3d_jax.train', '--config=configs/detr3d_r50.py:toy', f'--workdir={workdir}', *_data_args(data_cfg),
               '--config.train.num_steps=2', '--config.train.log_every=1', '--config.train.eval_every=0')
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    compiled = [i for i, line in enumerate(lines)
                if re.fullmatch(r'compiled the train step in \d+\.\d s \(its first run included\)', line)]
    assert compiled and lines[compiled[0] - 1] == 'compiling the train step ...'
    steps = [line for line in lines if line.startswith('step ')]
    assert compiled[0] < lines.index(steps[0])
    # step 1's window is the compilation: no rate; step 2's rate is its own
    assert re.match(r'step +1/2 +loss +[\d.]+ +-- steps/s +elapsed +[\d.]+ min +ETA +--$', steps[0]), steps[0]
    assert re.match(r'step +2/2 +loss +[\d.]+ +[\d.]+ steps/s', steps[1]), steps[1]
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        logged = [json.loads(line) for line in f if '"loss"' in line]
    assert 'steps_per_second' not in logged[0] and logged[1]['steps_per_second'] > 0
    before = _files(workdir)
    res = _run('fd3d_jax.train', '--config=configs/bevformer_tiny.py:toy', f'--workdir={workdir}', *_data_args(data_cfg))
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert res.stderr.startswith(f'error: cannot resume {workdir} with this config')
    assert "model.name: 'detr3d' -> 'bevformer'" in res.stderr and 'more' in res.stderr
    assert _files(workdir) == before   # config.json and everything else untouched

    res = _run('fd3d_jax.eval', f'--workdir={workdir}', '--step=2', '--config.data.val_split=mini_train')
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'evaluating {workdir}/checkpoints/2' in res.stdout and 'evaluation on mini_train' in res.stdout
    with open(os.path.join(workdir, 'eval', 'step_2', 'results.json')) as f:
        assert len(json.load(f)['results']) > 0
    res = _run('fd3d_jax.eval', f'--workdir={tmp_path / "none"}')
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert res.stderr.strip() == f'error: {tmp_path / "none" / "config.json"} not found: pass --config (a new run, ' \
                                 f'or a workdir without its config)'


def _wait_for(proc, log_path, pattern, timeout=600):
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        with open(log_path) as f:
            if re.search(pattern, f.read(), re.M):
                return
        time.sleep(0.05)
    raise AssertionError(f'{pattern!r} not printed: {open(log_path).read()[-3000:]}')


@pytest.mark.slow
@pytest.mark.scaleout   # a reliability test of the CLI: `make test` runs it after the default suite
def test_ctrl_c_saves_the_step_and_a_second_stops_at_once(data_cfg, tmp_path):
    """One Ctrl-C (SIGINT to the whole process group, as a terminal sends it; two input worker processes):
    the step in flight finishes, is saved, one line, status 130. Two Ctrl-C while the first step compiles: the
    process ends at once (no waiting for the compilation), one line, status 130, nothing saved."""
    common = ['--config=configs/detr3d_r50.py:toy', *_data_args(data_cfg), '--config.train.num_steps=1000',
              '--config.train.log_every=1', '--config.train.checkpoint_every=1000']
    for presses in (1, 2):
        workdir, log_path = str(tmp_path / f'run{presses}'), str(tmp_path / f'log{presses}')
        workers = ['--config.data.num_workers=2'] if presses == 1 else []
        with open(log_path, 'w') as log:
            proc = subprocess.Popen([sys.executable, '-m', 'fd3d_jax.train', *common, *workers, f'--workdir={workdir}'],
                                    cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(proc, log_path, r'^step +2/' if presses == 1 else '^compiling the train step')
            os.killpg(proc.pid, signal.SIGINT)
            if presses == 2:
                time.sleep(0.3)
                sent = time.time()
                os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        with open(log_path) as f:
            out = f.read()
        assert proc.returncode == 130, out[-3000:]
        assert 'Traceback' not in out, out[-3000:]
        if presses == 1:
            saved = Checkpointer(workdir).latest_step()
            assert saved is not None and saved >= 2, out[-3000:]
            assert (f'Ctrl-C: saved {workdir}/checkpoints/{saved} and stopped; run the same command again to resume'
                    in out.splitlines())
        else:
            assert time.time() - sent < 5, 'the second Ctrl-C waited for the compilation'
            assert out.splitlines()[-1] == 'error: second Ctrl-C: stopped at once without saving; no checkpoint ' \
                                           'was saved', out[-3000:]
            assert not os.path.exists(os.path.join(workdir, 'checkpoints')) or not os.listdir(
                os.path.join(workdir, 'checkpoints'))


def test_an_evaluation_may_change_the_version_and_training_split(tmp_path):
    """The test set is another table version: ``eval --config.data.version=v1.0-test`` on a trained workdir is
    allowed; resuming training on another version is not."""
    write_config(detr3d_r50.get_config('toy'), tmp_path)
    test_set = detr3d_r50.get_config('toy')
    test_set.data.version, test_set.data.val_split = 'v1.0-test', 'test'
    workdir_lib.check_identity(test_set, tmp_path, 'evaluate')
    with pytest.raises(ConfigError, match="data.version: 'v1.0-mini' -> 'v1.0-test'"):
        workdir_lib.check_identity(test_set, tmp_path)
