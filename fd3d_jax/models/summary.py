"""Parameter count, FLOPs and compiled peak memory of a config's detector (compile-only: works at
full size on a CPU).

    python -m fd3d_jax.models.summary --config configs/bevformer_base.py [--json]

Inference: one frame, batch 1 (BEVFormer with a previous BEV, as in ``video_test_mode``).
Training step: the whole queue (history without gradients), batch 1, forward + backward + an
AdamW update of all parameters, with a stand-in loss (sum of squared head outputs) until the
detection loss is used. Peak bytes = XLA's ``memory_analysis()``: arguments + outputs + temporaries
- aliased. GFLOPs: the jaxpr count with loop trip counts (``fd3d_jax.models.flops``); ``xla_gflops``
is XLA's ``cost_analysis`` (counts each loop body once); ``gmacs`` = multiply-accumulates of dots
and convolutions (what mmcv's counter calls FLOPs). The ResNet's repeated blocks are compiled as a loop, the form
GPUs and TPUs run (``accelerator_form``), unless the config sets ``model.backbone.repeated_blocks``.
"""
import json
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from ml_collections import config_flags

from fd3d_jax.models import build
from fd3d_jax.models.flops import count_flops
from fd3d_jax.models.inputs import batch_spec

config_flags.DEFINE_config_file('config', None, 'model config file')
flags.DEFINE_bool('json', False, 'print one JSON object')
FLAGS = flags.FLAGS


def peak_bytes(compiled):
    analysis = compiled.memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def accelerator_form(config):
    """A copy of ``config`` whose ResNet backbones (``model``, and ``expert.model`` of a distillation config) run
    their repeated blocks as a loop where ``repeated_blocks`` is 'auto': the default on GPUs and TPUs, while on the CPU
    the default unrolls them (``fd3d_jax.models.backbone``), which runs faster there and peaks higher. Memory figures
    measured on the CPU use this form to stand for an accelerator's."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for model in [config.model] + ([config.expert.model] if 'expert' in config else []):
            if 'backbone' in model and model.backbone.get('repeated_blocks', 'auto') == 'auto':
                model.backbone.repeated_blocks = 'loop'
    return config


def summarize(config):
    config = accelerator_form(config)
    model = build(config.model)
    rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
    infer_batch = batch_spec(config, 1, queue_length=1)
    train_batch = batch_spec(config, 1)
    params = jax.eval_shape(lambda b: model.init(rngs, b)['params'], infer_batch)
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    prev = jax.ShapeDtypeStruct(model.carried_shape(1), jnp.float32) if model.has_bev else None

    def infer(model_params, batch, prev_bev):
        out = model.apply({'params': model_params}, batch, prev_bev=prev_bev, deterministic=True)
        return out['cls_scores'][-1], out['bbox_preds'][-1]

    tx = optax.adamw(2e-4, weight_decay=0.01)
    opt_state = jax.eval_shape(tx.init, params)

    def train_step(model_params, opt, batch, rng):
        def loss_fn(model_params):
            out = model.apply({'params': model_params}, batch, deterministic=False, rngs={'dropout': rng})
            return jnp.mean(out['cls_scores'] ** 2) + jnp.mean(out['bbox_preds'] ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(model_params)
        updates, opt = tx.update(grads, opt, model_params)
        return optax.apply_updates(model_params, updates), opt, loss

    t0 = time.time()
    flops, macs = count_flops(infer, params, infer_batch, prev)
    infer_c = jax.jit(infer).lower(params, infer_batch, prev).compile()
    t1 = time.time()
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    train_c = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, train_batch, key).compile()
    t2 = time.time()
    cost = infer_c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(params=n_params, gflops=flops / 1e9, gmacs=macs / 1e9, xla_gflops=float(cost.get('flops', 0.0)) / 1e9,
                infer_peak_bytes=peak_bytes(infer_c), train_peak_bytes=peak_bytes(train_c),
                image_hw=list(train_batch['img'].shape[3:5]), queue_length=int(train_batch['img'].shape[1]),
                compile_seconds=dict(infer=round(t1 - t0, 1), train=round(t2 - t1, 1)))


def main(argv):
    del argv
    summary = summarize(FLAGS.config)
    if FLAGS.json:
        print(json.dumps(summary))
        return
    print(f"params            {summary['params'] / 1e6:10.2f} M")
    print(f"GFLOPs (infer)    {summary['gflops']:10.1f}   (GMACs {summary['gmacs']:.1f}; "
          f"XLA cost analysis {summary['xla_gflops']:.1f})")
    print(f"peak (infer)      {summary['infer_peak_bytes'] / 2**30:10.2f} GiB")
    print(f"peak (train step) {summary['train_peak_bytes'] / 2**30:10.2f} GiB   (queue {summary['queue_length']}, "
          f"image {summary['image_hw'][0]}x{summary['image_hw'][1]})")


if __name__ == '__main__':
    app.run(main)
