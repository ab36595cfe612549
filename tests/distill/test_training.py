"""Distillation runs end to end: a toy expert's workdir -> ``train_and_evaluate`` of a pair config
(trains, checkpoints, logs ``distill/*``, evaluates with the devkit) -> ``fd3d_jax.eval`` of the run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bevformer_base, detr3d_r101, fd3d_bevformer_base_to_tiny, fd3d_detr3d_r101_to_r50
from fd3d_jax.data import pipeline, records
from fd3d_jax.distill import build_distillation
from fd3d_jax.distill import distiller as distiller_lib
from fd3d_jax.distill import expert as expert_lib
from fd3d_jax.errors import ExpertError
from fd3d_jax.train import loop
from fd3d_jax.train.checkpoint import Checkpointer
from fd3d_jax.train.metrics_writer import read_metrics

PAIRS = {'bevformer': (fd3d_bevformer_base_to_tiny, bevformer_base), 'detr3d': (fd3d_detr3d_r101_to_r50, detr3d_r101)}


def _with_data(config, data_cfg):
    queue = config.data.queue_length
    for key in ('image_mean', 'image_std', 'to_rgb', 'image_scale'):
        data_cfg = data_cfg.copy_and_resolve_references()
        data_cfg[key] = config.data[key]
    config.data = data_cfg
    config.data.queue_length = min(queue, 2)
    config.train.update(batch_size=1, num_steps=2, checkpoint_every=1, log_every=1)
    config.optim.warmup_iters = 1
    return config


@pytest.fixture(scope='module')
def experts(data_cfg, tmp_path_factory):
    """``experts[kind]``: workdir of a toy expert (its initial state saved as a checkpoint, with the
    run's config.json), made on first use."""
    class Experts(dict):
        def __missing__(self, kind):
            config = _with_data(PAIRS[kind][1].get_config('toy'), data_cfg)
            workdir = str(tmp_path_factory.mktemp(f'expert_{kind}'))
            trainer = loop.Trainer(config, num_train_samples=10)
            loop.write_config(config, workdir)
            ckpt = Checkpointer(workdir, async_save=False)
            ckpt.save(0, trainer.state)
            ckpt.close()
            self[kind] = workdir
            return workdir
    return Experts()


def _distill(kind, method, data_cfg, experts, workdir, **train):
    config = _with_data(PAIRS[kind][0].get_config('toy'), data_cfg)
    config.train.update(train)
    config.distill.method = method
    config.distill.expert_checkpoint = experts[kind]
    summary = loop.train_and_evaluate(config, workdir, log=lambda *a: None)
    assert 0.0 <= summary['nd_score'] <= 1.0
    metrics = [m for m in read_metrics(os.path.join(workdir, 'metrics.jsonl')) if 'loss' in m]
    logged = list(range(config.train.log_every, config.train.num_steps + 1, config.train.log_every))
    assert [m['step'] for m in metrics] == sorted(set(logged) | {config.train.num_steps})
    if method != 'none':   # the diagnostics of the logged steps (computed on those steps only)
        for m in metrics:
            norms = {k: v for k, v in m.items() if k.startswith('grad_norm/')}
            assert norms and all(np.isfinite(v) and v >= 0 for v in norms.values()), m
    terms = [k for k in metrics[0] if k.startswith('distill/')]
    assert terms, sorted(metrics[0])
    for m in metrics:
        for k in terms:
            assert np.isfinite(m[k]), (k, m)
        assert m['loss_distill'] > 0 and np.isclose(m['loss'], m['loss_det'] + m['loss_distill'], rtol=1e-4)
    assert sorted(Checkpointer(workdir).all_steps())[-1] == config.train.num_steps
    assert os.path.exists(os.path.join(workdir, 'eval', 'metrics_summary.json'))
    return config


def test_fd3d_distillation_trains_checkpoints_and_evaluates(data_cfg, experts, tmp_path):
    config = _distill('bevformer', 'fd3d', data_cfg, experts, str(tmp_path), num_steps=3, log_every=2)
    # the exported apprentice is params['model']: fd3d_jax.eval restores it without the generators
    summary = loop.evaluate_checkpoint(config, str(tmp_path), step=1, log=lambda *a: None)
    assert os.path.exists(tmp_path / 'eval' / 'step_1' / 'metrics_summary.json') and 'nd_score' in summary


def test_the_expert_is_evaluated_on_the_distillation_input(data_cfg, experts, tmp_path, monkeypatch):
    """``fd3d_jax.eval --expert``: the expert's detections on every val sample of the apprentice's data, its
    images passed through ``Distiller.expert_batch`` (x2 upsampled for the BEVFormer pair)."""
    config = _with_data(PAIRS['bevformer'][0].get_config('toy'), data_cfg)
    config.distill.expert_checkpoint = experts['bevformer']
    seen = []
    real = expert_lib.expert_batch

    def spy(batch, *args):
        out = real(batch, *args)
        seen.append((batch['img'].shape, out['img'].shape))
        return out
    monkeypatch.setattr(expert_lib, 'expert_batch', spy)
    monkeypatch.setattr(distiller_lib, 'expert_batch', spy)
    summary = loop.evaluate_expert(config, str(tmp_path), log=lambda *a: None)
    assert 0.0 <= summary['nd_score'] <= 1.0
    assert os.path.exists(tmp_path / 'eval' / 'expert' / 'metrics_summary.json')
    with open(tmp_path / 'eval' / 'expert' / 'results.json') as f:
        results = json.load(f)['results']
    val = records.get_records(config.data.dataroot, config.data.version, config.data.val_split, config.data.records_dir)
    assert set(results) == {s['token'] for s in val['samples']}
    apprentice_hw, expert_hw = seen[-1][0][-3:-1], seen[-1][1][-3:-1]
    assert expert_hw == (2 * apprentice_hw[0], 2 * apprentice_hw[1])


def test_expert_checkpoint_of_another_model_is_refused(data_cfg, tmp_path):
    other = tmp_path / 'other_expert'
    loop.write_config(_with_data(detr3d_r101.get_config('toy'), data_cfg), str(other))
    config = _with_data(fd3d_bevformer_base_to_tiny.get_config('toy'), data_cfg)
    config.distill.expert_checkpoint = str(other)
    with pytest.raises(ExpertError, match='another model'):
        loop.train_and_evaluate(config, str(tmp_path), log=lambda *a: None)


@pytest.mark.slow
@pytest.mark.parametrize('kind,method', [(k, m) for k in PAIRS for m in ('none', 'fitnet', 'mgd', 'heatmap', 'fd3d')
                                         if (k, m) != ('bevformer', 'fd3d')])
def test_every_method_trains_checkpoints_and_evaluates(kind, method, data_cfg, experts, tmp_path):
    if method == 'none':
        config = _with_data(PAIRS[kind][0].get_config('toy'), data_cfg)
        config.distill.method = 'none'
        config.distill.expert_checkpoint = experts[kind]
        loop.train_and_evaluate(config, str(tmp_path), log=lambda *a: None)
        m = read_metrics(os.path.join(str(tmp_path), 'metrics.jsonl'))[0]
        assert not any(k.startswith('distill/') for k in m)
        return
    _distill(kind, method, data_cfg, experts, str(tmp_path))


@pytest.mark.slow
def test_bfloat16_distillation_keeps_float32_state_and_the_float32_losses(data_cfg, experts, train_records):
    """``model.dtype='bfloat16'`` for apprentice, expert and FD3D modules: params, optimiser state and expert
    stay float32, and the first step's detection and distillation terms are within bfloat16 rounding (2 %) of
    float32's on the same batch; a wrong cast (a float16 path, a bfloat16 loss) would show here."""
    metrics = {}
    for dtype in ('float32', 'bfloat16'):
        config = _with_data(PAIRS['bevformer'][0].get_config('toy'), data_cfg)
        config.distill.expert_checkpoint = experts['bevformer']
        config.model.dtype = dtype
        distiller, expert_params = build_distillation(config)
        trainer = loop.Trainer(config, len(train_records['samples']), distiller=distiller, expert_params=expert_params)
        batch = next(iter(pipeline.train_dataset(train_records, config.data.dataroot, config.data, 1, config.seed,
                                                 bev=pipeline.bev_config(config.model),
                                                 expert_bev=pipeline.bev_config(config.expert.model))))
        metrics[dtype] = [jax.device_get(trainer.step(batch)) for _ in range(2)]
        assert trainer.distiller.expert.dtype == dtype
        floats = [x.dtype for x in jax.tree_util.tree_leaves((trainer.state.params, trainer.state.opt_state,
                                                              trainer.expert_params))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
        assert set(floats) == {jnp.dtype(jnp.float32)}
    first32, first16 = metrics['float32'][0], metrics['bfloat16'][0]
    terms = ['loss_det'] + [k for k in first32 if k.startswith('distill_unweighted/')]
    assert len(terms) >= 3, sorted(first32)
    for key in terms:
        assert abs(first16[key] - first32[key]) <= 2e-2 * abs(first32[key]) + 1e-6, (key, first16[key], first32[key])
    assert first16['loss'] != first32['loss']   # bfloat16 ran
    assert np.isfinite(metrics['bfloat16'][1]['loss'])
