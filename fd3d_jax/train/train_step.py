"""The pure training and evaluation steps (jit-compiled over a ``data`` mesh by ``compile_*``).

``train_step(state, expert_params, batch, rng) -> (state, metrics)``:
  apprentice forward (dropout on) -> detection loss (Hungarian matching, ``loss.matcher``; focal + L1 on every
  decoder layer) [+ distillation loss against the frozen expert] -> grads -> optax update.
``expert_params`` is None for plain detector training; otherwise the expert runs in inference mode
under ``stop_gradient`` and has no optimiser state (it is an argument, not part of the state).
``metrics['nonfinite']`` flags a non-finite loss or gradient norm; with ``config.train.nonfinite='skip'``
such a step leaves params and optimiser state unchanged and counts in ``state.skipped`` (the loop stops on
it under the default ``'stop'``).
"""
import functools

import jax
import jax.numpy as jnp
import optax

from fd3d_jax.data.device_input import prepare_images
from fd3d_jax.data_parallel import on_data_shards
from fd3d_jax.models.box_coder import decode_topk
from fd3d_jax.train import mesh as mesh_lib
from fd3d_jax.detection.losses import detection_loss
from fd3d_jax.train.state import TrainState, ema_decay_at, ema_update


def expert_forward(distiller, expert_params, batch):
    """The frozen expert's outputs on ``distiller.expert_batch(batch)``: inference mode, no gradient."""
    if expert_params is None:
        raise ValueError(f'{type(distiller).__name__} distillation needs the expert params')
    expert_params = jax.lax.stop_gradient(expert_params)
    out = distiller.expert.apply({'params': expert_params}, distiller.expert_batch(batch), deterministic=True)
    return jax.lax.stop_gradient(out)


def make_loss_fn(model, config, distiller=None, with_outputs=False):
    """``loss_fn(params, expert_params, batch, rng, expert_out=None) -> (loss, parts)``: the apprentice's
    detection loss [+ ``distiller.loss`` against the expert's outputs ``expert_out`` (default: computed
    here by ``expert_forward``)]. ``params = {'model': ..., 'distill': ...}``. ``with_outputs``: the aux
    output is ``(parts, apprentice outputs)``."""

    def loss_fn(params, expert_params, batch, rng, expert_out=None):
        drop_rng, distill_rng = jax.random.split(rng)
        out = model.apply({'params': params['model']}, batch, deterministic=False, rngs={'dropout': drop_rng})
        loss, parts = detection_loss(out, batch, config.loss)
        parts = dict(parts, loss_det=loss)
        if distiller is not None:
            if expert_out is None:
                expert_out = expert_forward(distiller, expert_params, batch)
            d_loss, d_parts = distiller.loss(params.get('distill'), jax.lax.stop_gradient(expert_params), out,
                                             expert_out, batch, distill_rng)
            loss = loss + d_loss
            parts.update(d_parts, loss_distill=d_loss)
        return loss, ((parts, out) if with_outputs else parts)

    return loss_fn


def diagnostic_step(step, log_every, num_steps=0):
    """Whether the step that ends at count ``step + 1`` is one the training loop logs (every ``log_every`` steps
    and the last of ``num_steps``): the steps that compute the diagnostics."""
    done = step + 1
    return (done % log_every == 0) | (done == num_steps)


def make_train_step(model, tx, config, lr_fn, distiller=None, num_steps=0):
    """Builds ``train_step`` (``lr_fn(step)`` is logged). ``distiller``: a ``fd3d_jax.distill.Distiller``, or
    None. The expert runs outside the differentiated function (it needs no gradient; inside, XLA compiles and
    keeps more: docs/benchmarks.md). With ``config.distill.log_grad_norms`` the metrics hold each term's gradient
    norm on the apprentice's shared features (``Distiller.feature_grad_norms``), computed (a ``lax.cond``) only on
    the steps the loop logs (``diagnostic_step`` with ``train.log_every`` and ``num_steps``) and NaN on the others,
    which the loop's window means leave out: the diagnostic runs a head forward and backward, a backward pass per
    term and a second matching (its share of a step is not measured)."""
    grad_norms = distiller is not None and config.distill.log_grad_norms
    loss_fn = make_loss_fn(model, config, distiller, with_outputs=grad_norms)

    skip = config.train.get('nonfinite', 'stop') == 'skip'
    ema_decay, ema_ramp = config.train.get('ema_decay', 0.0), config.train.get('ema_ramp_steps', 0)

    def train_step(state: TrainState, expert_params, batch, rng):
        batch = prepare_images(batch, config.data)   # raw uint8 images (data.device_normalize) -> normalised
        expert_out = None if distiller is None else expert_forward(distiller, expert_params, batch)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, expert_params, batch, rng,
                                                                         expert_out)
        if grad_norms:
            parts, out = parts
            distill_rng = jax.random.split(rng)[1]   # the masks of the loss

            def diagnose(_):
                return distiller.feature_grad_norms(state.params.get('distill'), state.params['model']['head'],
                                                    expert_params, jax.lax.stop_gradient(out), expert_out, batch,
                                                    distill_rng)

            skip_diagnosis = lambda _: jax.tree.map(  # noqa: E731
                lambda leaf: jnp.full(leaf.shape, jnp.nan, leaf.dtype), jax.eval_shape(diagnose, None))
            parts = dict(parts, **jax.lax.cond(diagnostic_step(state.step, config.train.log_every, num_steps),
                                               diagnose, skip_diagnosis, None))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = state.skipped
        if skip:  # keep the old params and optimiser state; the step (and the schedule) still advances
            keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            skipped = skipped + (~finite).astype(skipped.dtype)
        ema = state.ema
        if ema_decay:   # a skipped step leaves the average as it is
            decay = jnp.where(finite if skip else True, ema_decay_at(ema_decay, ema_ramp, state.step), 1.0)
            ema = ema_update(ema, params['model'], decay)
        metrics = dict(parts, loss=loss, lr=lr_fn(state.step), grad_norm=grad_norm,
                       nonfinite=(~finite).astype(jnp.float32), skipped_steps=skipped)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped,
                             ema=ema), metrics

    return train_step


def make_eval_step(model, config, input_fn=None):
    """``eval_step(params, batch, prev_bev) -> dict(boxes (B, M, 9), scores, labels, valid (B, M),
    sample_idx (B,), bev)``: last-layer NMS-free top-k decoding. A detector with a BEV carries ``bev`` to the next
    frame of its stream (``prev_bev``); one without ignores ``prev_bev`` and returns a placeholder of
    ``model.carried_shape``. ``input_fn``: applied to the batch first (e.g. ``Distiller.expert_batch``, the
    apprentice's batch as a distillation expert sees it)."""
    def eval_step(params, batch, prev_bev):
        batch = prepare_images(batch, config.data)
        if input_fn is not None:
            batch = input_fn(batch)
        out = model.apply({'params': params}, batch, prev_bev=prev_bev, deterministic=True)
        decode = jax.vmap(functools.partial(decode_topk, max_num=config.model.max_num))
        # per device shard: XLA would gather the top-k candidates of every sample onto each device
        boxes, scores, labels, valid = on_data_shards(decode, out['cls_scores'][-1], out['bbox_preds'][-1])
        valid = valid & batch['valid'][:, None]
        bev = out['bev'] if model.has_bev else jnp.zeros(model.carried_shape(batch['img'].shape[0]), jnp.float32)
        return dict(boxes=boxes, scores=scores, labels=labels, valid=valid, sample_idx=batch['sample_idx'], bev=bev)

    return eval_step


def under_mesh(step, mesh):
    """``step`` traced under ``mesh`` (``jax.sharding.use_abstract_mesh``), so that the per-sample parts
    (``fd3d_jax.data_parallel.on_data_shards``: deformable attention, matching) run per device shard."""
    @functools.wraps(step)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(*args)
    return traced


def compile_train_step(train_step, mesh):
    """jit over ``mesh``: batch sharded on ``data``, state/expert/rng replicated, state donated."""
    rep, dat = mesh_lib.replicated(mesh), mesh_lib.data_sharded(mesh)
    return jax.jit(under_mesh(train_step, mesh), in_shardings=(rep, rep, dat, rep), out_shardings=(rep, rep),
                   donate_argnums=(0,))


def compile_eval_step(eval_step, mesh):
    rep, dat = mesh_lib.replicated(mesh), mesh_lib.data_sharded(mesh)
    return jax.jit(under_mesh(eval_step, mesh), in_shardings=(rep, dat, dat), out_shardings=dat)
