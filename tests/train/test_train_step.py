"""The training step on a device mesh and its checkpoints (the CLI, resume and multi-process: test_loop.py)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import bevformer_tiny, detr3d_r50
from fd3d_jax import params_io
from fd3d_jax.data import pipeline
from fd3d_jax.train import loop
from fd3d_jax.train.checkpoint import Checkpointer

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


def test_ema_follows_its_formula_resumes_exactly_and_is_what_is_evaluated(data_cfg, train_records, tmp_path):
    """``train.ema_decay``: after each step ``ema = d_t ema + (1 - d_t) params`` with the ramp
    ``d_t = decay (1 - exp(-(t + 1) / ramp))`` (numpy restatement over the params of every step); it is
    checkpointed and resumed bit for bit; ``eval_params`` and a workdir's ``load_params`` give it, not the params."""
    decay, ramp = 0.9, 3
    config = small_config(detr3d_r50, data_cfg, ema_decay=decay, ema_ramp_steps=ramp)
    b = batches(config, train_records, 3)
    trainer = loop.Trainer(config, len(train_records['samples']))
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))])  # noqa: E731
    want = flat(trainer.state.params['model']).astype(np.float64)
    np.testing.assert_array_equal(flat(trainer.state.ema), want)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    for t, batch in enumerate(b):
        trainer.step(batch)
        d = decay * (1 - np.exp(-(t + 1) / ramp))
        want = d * want + (1 - d) * flat(trainer.state.params['model'])
        np.testing.assert_allclose(flat(trainer.state.ema), want, rtol=1e-5, atol=1e-7)
        if t == 0:
            ckpt.save(1, trainer.state)
            ckpt.wait()
    assert not np.allclose(flat(trainer.state.ema), flat(trainer.state.params['model']))
    assert flat(trainer.eval_params()).tolist() == flat(trainer.state.ema).tolist()
    fresh = loop.Trainer(config, len(train_records['samples']))
    fresh.state, _ = ckpt.restore(fresh.state)
    for batch in b[1:]:
        fresh.step(batch)
    assert flat(fresh.state.ema).tolist() == flat(trainer.state.ema).tolist()
    ckpt.save(3, fresh.state)
    ckpt.wait()
    np.testing.assert_array_equal(flat(params_io.load_params(str(tmp_path))), flat(fresh.state.ema))
    off = loop.Trainer(small_config(detr3d_r50, data_cfg), len(train_records['samples']))
    assert off.state.ema is None and off.eval_params() is off.state.params['model']


def test_raw_uint8_images_prepared_in_the_step_give_the_host_pipelines_loss(data_cfg, train_records):
    """``data.device_normalize``: the pipeline sends raw uint8 images and their photometric draws, the jitted
    step distorts, normalises, resizes and pads them; the step's loss is the host-prepared batch's up to float
    rounding (it differs when the step skips the preparation: float32 0-255 images)."""
    losses = {}
    for on_device in (False, True):
        config = small_config(bevformer_tiny, data_cfg)
        config.data.device_normalize = on_device
        batch = batches(config, train_records, 1)[0]
        assert (batch['img'].dtype == np.uint8) == on_device
        trainer = loop.Trainer(config, len(train_records['samples']))
        losses[on_device] = float(jax.device_get(trainer.step(batch))['loss'])
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
