"""The training step on a device mesh, checkpoints, and the train/eval CLI (kill and resume)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs import bevformer_tiny, detr3d_r50
from fd3d_jax.data import pipeline
from fd3d_jax.train import loop
from fd3d_jax.train.checkpoint import Checkpointer
from fd3d_jax.train.metrics_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(module, data_cfg, **train):
    config = module.get_config('toy')
    queue = config.data.queue_length
    config.data = data_cfg.copy_and_resolve_references()
    config.data.queue_length = queue
    config.train.update(dict(batch_size=1, num_steps=4, checkpoint_every=2, log_every=1), **train)
    config.optim.warmup_iters = 2
    return config


def batches(config, recs, n):
    ds = pipeline.train_dataset(recs, config.data.dataroot, config.data, config.train.batch_size, config.seed,
                                bev=pipeline.bev_config(config.model))
    it = iter(ds)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize('module', [bevformer_tiny, detr3d_r50], ids=['bevformer_tiny', 'detr3d_r50'])
def test_train_step_learns_and_restores_exactly(module, data_cfg, train_records, tmp_path):
    config = small_config(module, data_cfg)
    b = batches(config, train_records, 3)
    trainer = loop.Trainer(config, len(train_records['samples']))
    m0 = jax.device_get(trainer.step(b[0]))
    assert {'loss', 'loss_cls', 'loss_bbox', 'd0.loss_cls', 'lr', 'grad_norm'} <= set(m0)
    assert np.isfinite(m0['loss']) and m0['num_pos'] > 0
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, trainer.state)
    ckpt.wait()
    m1 = jax.device_get(trainer.step(b[1]))
    m2 = jax.device_get(trainer.step(b[2]))

    fresh = loop.Trainer(config, len(train_records['samples']))
    fresh.state, _ = ckpt.restore(fresh.state)
    assert int(fresh.state.step) == 1
    r1 = jax.device_get(fresh.step(b[1]))
    r2 = jax.device_get(fresh.step(b[2]))
    for a, r in ((m1, r1), (m2, r2)):
        assert a['loss'] == r['loss'] and a['lr'] == r['lr']


MULTI_DEVICE = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from configs import bevformer_tiny
    from fd3d_jax.data import pipeline
    from fd3d_jax.train import loop, mesh
    config = bevformer_tiny.get_config('toy')
    config.data.update(json.loads(sys.argv[1]))
    config.data.queue_length = 2
    config.train.batch_size = 8
    recs = loop.load_split(config, config.data.train_split)
    batch = next(iter(pipeline.train_dataset(recs, config.data.dataroot, config.data, 8, 0,
                                             bev=pipeline.bev_config(config.model))))
    out = {}
    for n in (1, 8):
        trainer = loop.Trainer(config, len(recs['samples']), mesh=mesh.make_mesh(jax.devices()[:n]))
        m = jax.device_get([trainer.step(batch), trainer.step(batch)])
        out[n] = [[float(x['loss']), float(x['loss_cls']), float(x['loss_bbox'])] for x in m]
    print(json.dumps(out))
''')


def test_one_device_and_eight_devices_give_the_same_loss(data_cfg, train_records):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    data = dict(dataroot=data_cfg.dataroot, records_dir=data_cfg.records_dir)
    res = subprocess.run([sys.executable, '-c', MULTI_DEVICE, json.dumps(data)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # Two steps: the second also checks that the sharded update (clip, AdamW) matches.
    np.testing.assert_allclose(out['8'], out['1'], rtol=2e-5)


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_cli_killed_run_resumes_and_finishes(data_cfg, tmp_path):
    """SIGKILL after the first checkpoint; the restarted run continues from it and ends with the
    same losses as an uninterrupted run, a final checkpoint and a devkit evaluation."""
    common = ['--config=configs/detr3d_r50.py:toy', f'--config.data.dataroot={data_cfg.dataroot}',
              f'--config.data.records_dir={data_cfg.records_dir}', '--config.train.num_steps=6',
              '--config.train.checkpoint_every=2', '--config.train.log_every=1', '--config.optim.warmup_iters=2']
    full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
    proc = _cli(['-m', 'fd3d_jax.train', *common, f'--workdir={killed}'])
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(killed, 'checkpoints', '2')) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, 'eval', 'metrics_summary.json'))

    runs = [_cli(['-m', 'fd3d_jax.train', *common, f'--workdir={w}']) for w in (killed, full)]
    logs = [r.communicate(timeout=600)[0] for r in runs]
    for r, log in zip(runs, logs):
        assert r.returncode == 0, log[-3000:]
    assert 'resumed from' in logs[0]
    m_killed, m_full = (read_metrics(os.path.join(w, 'metrics.jsonl')) for w in (killed, full))
    steps = [m['step'] for m in m_killed if 'loss' in m]
    assert steps == list(range(1, 7))
    for a, b in zip(m_killed, m_full):
        if 'loss' in a:
            assert a['step'] == b['step'] and a['loss'] == pytest.approx(b['loss'], rel=1e-6)
    assert Checkpointer(killed).latest_step() == 6
    with open(os.path.join(killed, 'eval', 'metrics_summary.json')) as f:
        assert 0.0 <= json.load(f)['nd_score'] <= 1.0

    ev = _cli(['-m', 'fd3d_jax.eval', *common, f'--workdir={killed}', '--step=4'])
    log = ev.communicate(timeout=600)[0]
    assert ev.returncode == 0, log[-3000:]
    assert os.path.exists(os.path.join(killed, 'eval', 'step_4', 'metrics_summary.json'))
