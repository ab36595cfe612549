"""Training and evaluation loops (host side): data -> sharded batches -> jit steps -> metrics,
checkpoints and devkit evaluation. ``python -m fd3d_jax.train`` / ``fd3d_jax.eval`` call these."""
import contextlib
import dataclasses
import functools
import json
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fd3d_jax import nuscenes_metrics, params_io, storage
from fd3d_jax.convert.init_from import apply_init_from, missing_source_warning
from fd3d_jax.data import pipeline, records
from fd3d_jax.detection.matching import resolve_matcher
from fd3d_jax.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from fd3d_jax.models import build
from fd3d_jax.models.inputs import batch_spec, dummy_batch
from fd3d_jax.distill import build_distillation
from fd3d_jax.distill.expert import head_copy_summary, init_head_from_expert
from fd3d_jax.train import mesh as mesh_lib
from fd3d_jax.train import optim
from fd3d_jax.train.checkpoint import Checkpointer
from fd3d_jax.train.metrics_writer import MetricsWriter, read_metrics
from fd3d_jax.train.preemption import Preemption
from fd3d_jax.train.prefetch import DevicePrefetcher, as_global_batch
from fd3d_jax.train.profile import Profile
from fd3d_jax.train.state import create_state, init_params, step_rng
from fd3d_jax.train.workdir import check_identity
from fd3d_jax.train.train_step import compile_eval_step, compile_train_step, make_eval_step, make_train_step


INIT_IMAGE_WH = (320, 180)  # camera image size of the dummy batch that initialises the params


def load_split(config, split):
    data_cfg = config.data
    return records.get_records(data_cfg.dataroot, data_cfg.version, split, data_cfg.records_dir,
                               can_bus_root=data_cfg.get('can_bus_root', ''),   # a workdir's older config lacks them
                               can_bus_from_poses=data_cfg.get('can_bus_from_poses', False))


def steps_per_epoch(config, num_samples):
    return max(1, num_samples // config.train.batch_size)


def init_train_params(config, model, distiller=None, expert_params=None, load_sources=None):
    """The initial params ``{'model': ...[, 'distill': ...]}`` of training ``model`` (under ``jax.eval_shape``,
    with abstract ``expert_params``, only their shapes). ``load_sources``: model params -> model params, the
    pretrained weights of ``train.init_from``, applied before the expert's head is copied."""
    params = dict(model=init_params(model, dummy_batch(config, 1, queue_length=1, raw_wh=INIT_IMAGE_WH), config.seed))
    if load_sources is not None:
        params['model'] = load_sources(params['model'])
    if expert_params is not None and config.get('distill') and config.distill.init_apprentice_head:
        params['model'], _, _ = init_head_from_expert(params['model'], expert_params)
    if distiller is not None:
        distill_params = distiller.init(jax.random.PRNGKey(config.seed + 2), expert_params)
        if distill_params:  # e.g. FitNet between equal grids and channels has none
            params['distill'] = distill_params
    return params


def training_parts(config, num_train_samples, distiller=None, expert_params=None, abstract=False):
    """What ``Trainer`` is made of: ``model``, ``steps_per_epoch``, ``num_steps``, ``tx``, ``schedule``, the
    initial ``state`` (not yet placed on a mesh), the pure ``train_step``, ``head_copy`` (what the
    apprentice's head took from the expert's, ``head_copy_summary``; None when it took nothing) and
    ``init_from`` (an ``InitReport`` per ``train.init_from`` source; none read when ``abstract``).
    ``abstract``: ``state`` as ``jax.ShapeDtypeStruct``s (``jax.eval_shape``: nothing is initialised,
    ``expert_params`` may be abstract too), for compile-only time and memory at full size."""
    model = build(config.model)
    per_epoch = steps_per_epoch(config, num_train_samples)
    num_steps = optim.num_train_steps(config.train, per_epoch)
    init_reports = []

    def load_sources(model_params):
        loaded, reports = apply_init_from(model_params, config)
        init_reports.extend(reports)
        return loaded

    init = functools.partial(init_train_params, config, model, distiller, load_sources=None if abstract else load_sources)
    params = jax.eval_shape(init, expert_params) if abstract else init(expert_params)
    tx, schedule = optim.make_optimizer(config, params, per_epoch, num_steps)
    make_state = functools.partial(create_state, tx=tx, seed=config.seed, ema=config.train.get('ema_decay', 0.0) > 0)
    state = jax.eval_shape(make_state, params) if abstract else make_state(params)
    head_copy = None
    if expert_params is not None and config.get('distill') and config.distill.init_apprentice_head:
        head_copy = head_copy_summary(params['model']['head'], expert_params['head'])
    return types.SimpleNamespace(model=model, steps_per_epoch=per_epoch, num_steps=num_steps, tx=tx,
                                 schedule=schedule, state=state, head_copy=head_copy, init_from=init_reports,
                                 train_step=make_train_step(model, tx, config, schedule, distiller, num_steps))


# Steps the host may dispatch before the oldest of them has finished (plus the batches data.device_prefetch sends
# ahead): without a bound the host ran up to train.log_every steps ahead, each holding its batch on the device.
MAX_STEPS_IN_FLIGHT = 2


def abstract_train_step(config, distiller=None, batch_size=None, mesh=None):
    """``(train_step, args)``: ``Trainer``'s jitted step for ``config`` (with ``distiller``: against its expert)
    and its arguments (state, expert params, batch, rng) as ``jax.ShapeDtypeStruct``s, nothing initialised:
    ``train_step.lower(*args).compile()`` gives compile time and memory at any size on any host.
    ``batch_size``: global, default one per device."""
    mesh = mesh or mesh_lib.make_mesh()
    expert_params = None if distiller is None else distiller.expert_abstract_params
    parts = training_parts(config, 1, distiller, expert_params, abstract=True)
    batch = batch_spec(config, batch_size or mesh.devices.size,
                       expert_model=None if distiller is None else distiller.expert_cfg)
    rng = jax.eval_shape(step_rng, parts.state.rng, 0)
    return compile_train_step(parts.train_step, mesh), (parts.state, expert_params, batch, rng)


class Trainer:
    """Everything ``train_step`` needs, built from a config: model, optimiser, mesh, state.

    ``distiller`` (a ``fd3d_jax.distill.Distiller``) and ``expert_params``: distillation from a
    frozen expert, with the distiller's own trainable params in ``params['distill']``. With
    ``config.distill.init_apprentice_head`` the apprentice's head starts from the expert's
    (``expert_params`` alone, without a distiller, does only that)."""

    def __init__(self, config, num_train_samples, mesh=None, distiller=None, expert_params=None):
        self.config = config
        self.mesh = mesh or mesh_lib.make_mesh()
        parts = training_parts(config, num_train_samples, distiller, expert_params)
        self.model, self.tx, self.schedule, self.head_copy = parts.model, parts.tx, parts.schedule, parts.head_copy
        self.init_from = parts.init_from
        self.steps_per_epoch, self.num_steps = parts.steps_per_epoch, parts.num_steps
        self.state = mesh_lib.replicate(parts.state, self.mesh)
        self.distiller = distiller
        self.expert_params = None if distiller is None else mesh_lib.replicate(expert_params, self.mesh)
        self.train_step = compile_train_step(parts.train_step, self.mesh)
        self.eval_step = compile_eval_step(make_eval_step(self.model, config), self.mesh)
        self.eval_compiled = False   # the first eval step compiles (``predict`` says so)

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, state):
        self._state = state
        self.host_step = int(jax.device_get(state.step))  # so that steps need not wait for the device

    def eval_params(self):
        """The detector params evaluated and exported: the moving average with ``train.ema_decay``, else the
        trained params."""
        return self._state.ema if self._state.ema is not None else self._state.params['model']

    def step(self, batch):
        """One training step on a process-local numpy batch (or one already sharded, ``DevicePrefetcher``);
        returns device metrics (dispatched asynchronously: nothing here waits for the previous step)."""
        rng = step_rng(self._state.rng, self.host_step)
        self._state, metrics = self.train_step(self._state, self.expert_params,
                                               as_global_batch(batch, self.mesh), rng)
        self.host_step += 1
        return metrics

    def wait(self):
        """Blocks until every dispatched step has run (each step's state is made from the one before, and its
        update from its loss and matching, so the last state is ready only when every step has run); raises the
        error of a step that failed."""
        jax.block_until_ready(self._state)


def _progress(step, num_steps, loss, rate, elapsed):
    """The progress line; ``rate`` None (a window of the first step alone, whose time is the compilation's):
    no steps/s and ETA yet."""
    if rate is None:
        return f'step {step:6d}/{num_steps}  loss {loss:8.4f}     -- steps/s  elapsed {elapsed / 60:5.1f} min  ETA    --'
    eta = (num_steps - step) / max(rate, 1e-9)
    return (f'step {step:6d}/{num_steps}  loss {loss:8.4f}  {rate:6.2f} steps/s  '
            f'elapsed {elapsed / 60:5.1f} min  ETA {eta / 60:5.1f} min')


def _compile_first_step(trainer, batch, pending, log):
    """Runs the run's first step with a line before and after its compilation (``jax.jit`` compiles on the first
    call; the step is waited for, since a backend may run a first call before it returns, so the seconds are the
    compilation's with tracing and the one step). Returns the time after it: steps/s and ETA count the steps
    after the first from there, leaving the compilation out."""
    log('compiling the train step ...')
    start = time.time()
    pending.append(trainer.step(batch))
    jax.block_until_ready(pending[-1])
    now = time.time()
    log(f'compiled the train step in {now - start:.1f} s (its first run included)')
    return now


def _truncate_metrics(path, last_step):
    """Drops metric lines written after the checkpoint a run resumes from (they are redone). ``path``: local or
    a URL."""
    path = storage.as_path(path)
    if not path.exists():
        return
    lines = [m for m in read_metrics(path) if m['step'] <= last_step]
    path.write_text(''.join(json.dumps(m) + '\n' for m in lines))


def write_json(workdir, name, value, **dumps):
    """``workdir/name`` holding ``json.dumps(value, **dumps)``; ``workdir``: local or a URL."""
    (storage.as_path(workdir) / name).write_text(json.dumps(value, **dumps))


def write_config(config, workdir):
    """``workdir/config.json`` (process 0); ``workdir``: local or a URL (``gs://bucket/run``)."""
    workdir = storage.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))


def check_finite(metrics, first_step, mode, last_checkpoint):
    """Raises ``TrainingError`` at the first step of ``metrics`` (host dicts of steps ``first_step, ...``) with a
    non-finite loss or gradient, unless ``mode`` (``config.train.nonfinite``) is ``'skip'``."""
    if mode == 'skip':
        return
    for offset, step_metrics in enumerate(metrics):
        if step_metrics['nonfinite']:
            kept = f'the last good checkpoint is {last_checkpoint}' if last_checkpoint else 'no checkpoint was saved'
            raise TrainingError(f"non-finite loss or gradient at step {first_step + offset} "
                                f"(loss {float(step_metrics['loss'])}, grad_norm {float(step_metrics['grad_norm'])}): "
                                f"stopped; {kept}. Set "
                                f"--config.train.nonfinite=skip to skip such steps instead")


def stop_training(trainer, data_iter, ckpt):
    """Stops what the training loop started, however it ends (its ``finally``): the input pipeline's read
    threads (``data_iter.close()``: queued reads are cancelled, a running one ends with its sample), the train
    steps dispatched but not yet run (waited for), and the asynchronous checkpoint writes (waited for: a started
    save ends complete on disk, never half-written).

    Why wait for the steps: ``Trainer.step`` only dispatches, so the device runs behind the host (up to
    ``train.log_every`` steps), and an error raised on the host (a sample that fails to load) leaves those steps
    running. Each calls back into Python (the Hungarian matching's ``jax.pure_callback``); one that does so while
    the interpreter shuts down cannot take the GIL and aborts the process (``Fatal Python error``, SIGABRT) after
    the ``error:`` line. A failed step's own error (``RuntimeError``) is not raised here: the run is ending with
    the error that stopped it, or has already fetched (and so raised) every step's result."""
    data_iter.close()
    try:
        ckpt.close()
    finally:
        with contextlib.suppress(RuntimeError):
            trainer.wait()


def _window_line(metrics, elapsed, num):
    """The logged means of a window of steps' metrics; the diagnostics (``grad_norm/...``, NaN on the steps that
    do not compute them: ``train_step.diagnostic_step``) are averaged over the steps that do, and left out of a
    window without one (a run stopped early by SIGTERM). ``steps_per_second`` is ``num`` steps over ``elapsed``
    seconds, absent when ``num`` is 0 (a window of the first step alone: its time is the compilation's)."""
    mean = {}
    for key in metrics[0]:
        if key in ('lr', 'skipped_steps'):
            continue
        values = np.asarray([m[key] for m in metrics])
        if key.startswith('grad_norm/'):
            values = values[~np.isnan(values)]
            if not values.size:
                continue
        mean[key] = float(np.mean(values))
    mean['lr'] = float(metrics[-1]['lr'])
    mean['skipped_steps'] = float(metrics[-1]['skipped_steps'])
    if num:
        mean['steps_per_second'] = num / max(elapsed, 1e-9)
    return mean


def train_and_evaluate(config, workdir, trainer=None, log=functools.partial(print, flush=True)):
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluates at
    ``train.eval_every`` and at the end. Returns the final ``metrics_summary`` (process 0; None on the others
    and when a SIGTERM stopped the run after saving a checkpoint). Raises ``TrainingError`` on a non-finite
    loss (``train.nonfinite='stop'``) after making sure that no checkpoint holds its update."""
    preemption = Preemption()   # from the start: a SIGTERM while compiling still ends with a checkpoint
    try:
        return _train_and_evaluate(config, workdir, trainer, log, preemption)
    except Interrupted:
        raise
    except KeyboardInterrupt:   # Ctrl-C outside the training loop: nothing in flight to save
        kept = f'the last checkpoint is {preemption.saved}' if preemption.saved else 'no checkpoint was saved'
        raise Interrupted(f'Ctrl-C: stopped; {kept}') from None
    finally:
        preemption.close()


def _train_and_evaluate(config, workdir, trainer, log, preemption):
    if jax.process_index() != 0:
        log = lambda *a, **k: None  # noqa: E731
    # per-device batch and lr scaling resolved for this launch (W/config.json holds the result)
    config, launch_line = mesh_lib.launch_config(config, jax.device_count() if trainer is None
                                                 else trainer.mesh.devices.size)
    check_identity(config, workdir)   # before anything is read or written
    data_cfg = config.data
    mode = config.train.nonfinite
    train_recs = load_split(config, data_cfg.train_split)
    if trainer is None:
        distiller, expert_params = build_distillation(config)
        trainer = Trainer(config, len(train_recs['samples']), distiller=distiller, expert_params=expert_params)
    mesh = trainer.mesh
    write_config(config, workdir)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    writer = MetricsWriter(workdir)
    expert_bev = pipeline.bev_config(config.expert.model) if trainer.distiller is not None else None
    local_batch = mesh_lib.process_batch_size(config.train.batch_size, mesh)
    ds = pipeline.train_dataset(train_recs, data_cfg.dataroot, data_cfg, local_batch, config.seed, jax.process_index(),
                                jax.process_count(), pipeline.bev_config(config.model), expert_bev)
    data_iter = DevicePrefetcher(iter(ds), mesh, data_cfg.get('device_prefetch', 2))  # batches sent ahead
    trainer.state, data_state, start, note = ckpt.restore_latest(trainer.state)   # the newest intact step
    if note:
        log(note)
    if start is not None:
        if data_state is not None:
            data_iter.set_state(data_state)
        log(f'resumed from {ckpt.directory}/{start}')
        preemption.saved = f'{ckpt.directory}/{start}'
    if jax.process_index() == 0:   # a run killed before its first checkpoint finished starts over: its lines go too
        _truncate_metrics(writer.path, start or 0)
    step = trainer.host_step
    num_steps = trainer.num_steps
    if trainer.head_copy is not None:
        copy = trainer.head_copy
        log(f"apprentice head from the expert's: {copy['copied_leaves']} of {copy['leaves']} leaves, "
            f"{copy['copied_values']:,} of {copy['values']:,} values copied (the others differ in shape)")
        if jax.process_index() == 0:
            write_json(workdir, 'head_from_expert.json', copy)
    if start is None:
        _log_init_from(trainer.init_from, config, workdir, log)
    cache_warning = compile_cache_warning(config)
    if cache_warning:
        log(cache_warning)
    log(f'training {config.model.name} for {num_steps} steps ({trainer.steps_per_epoch} steps/epoch, '
        f'global batch {config.train.batch_size}, {mesh.devices.size} devices on {jax.process_count()} '
        f'processes) in {workdir}')
    log(launch_line)
    profile = Profile(storage.as_path(workdir) / 'profile', step + 1, config.train.get('profile', 0), log)
    t0, t_rate, s_rate, s_log, pending = time.time(), time.time(), step, step, []
    saved = preemption.saved
    compiled = False
    preemption.training = True
    try:
        while step < num_steps:
            batch = next(data_iter)
            profile.before(step)
            if not compiled:   # steps/s counts the steps after the first, from the end of the first
                t_rate, s_rate = _compile_first_step(trainer, batch, pending, log), step + 1
                compiled = True
            else:
                pending.append(trainer.step(batch))
            profile.after(step, pending[-1])
            if len(pending) > MAX_STEPS_IN_FLIGHT:   # bounded run-ahead: each queued step holds its batch
                jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
            step += 1
            preempted = preemption.reached(step)
            if step % config.train.log_every == 0 or step == num_steps or preempted:
                metrics = jax.device_get(pending)
                check_finite(metrics, s_log + 1, mode, saved)
                now = time.time()
                mean = _window_line(metrics, now - t_rate, step - s_rate)
                writer.write(step, mean)
                log(_progress(step, num_steps, mean['loss'], mean.get('steps_per_second'), now - t0))
                t_rate, s_rate, s_log, pending = now, step, step, []
            if step % config.train.checkpoint_every == 0 or step == num_steps or preempted:
                pending = jax.device_get(pending)  # no checkpoint holds a non-finite update ('stop')
                check_finite(pending, s_log + 1, mode, saved)
                ckpt.save(step, trainer.state, data_iter.get_state())
                saved = preemption.saved = f'{ckpt.directory}/{step}'
            if preempted:
                stopped = f'{preemption.reason or "SIGTERM"}: saved {saved} and stopped; run the same command again to resume'
                break
            if config.train.eval_every and step % config.train.eval_every == 0 and step < num_steps:
                summary = evaluate_params(trainer, trainer.eval_params(), storage.as_path(workdir) / 'eval' / str(step),
                                          log=log)
                writer.write(step, _eval_scalars(summary))
    except BaseException:
        writer.close()
        raise
    finally:
        preemption.training = False
        profile.close()
        stop_training(trainer, data_iter, ckpt)   # an error or SIGTERM never loses a started save
    if step < num_steps:   # preempted
        writer.close()
        if preemption.reason == 'Ctrl-C':
            raise Interrupted(stopped)
        log(stopped)
        return None
    summary = evaluate_params(trainer, trainer.eval_params(), storage.as_path(workdir) / 'eval', log=log)
    writer.write(step, _eval_scalars(summary))
    writer.close()
    return summary


def compile_cache_warning(config, cache_dir=None):
    """One line when JAX's persistent compilation cache is on (``JAX_COMPILATION_CACHE_DIR``) but cannot hold
    this train step: JAX does not write executables that call back into Python, and ``loss.matcher='scipy'``
    is such a callback (``experiments/bench_compile_cache.py``). ``cache_dir``: default JAX's setting."""
    cache_dir = jax.config.jax_compilation_cache_dir if cache_dir is None else cache_dir
    if cache_dir and resolve_matcher(config.loss.matcher) == 'scipy':
        return (f'warning: the compilation cache cannot hold this train step: loss.matcher={config.loss.matcher} '
                'matches with scipy here, a call back into Python in every step (--config.loss.matcher=jax '
                'compiles it once per machine)')
    return None


def _log_init_from(reports, config, workdir, log):
    """The log lines of every ``train.init_from`` source (``workdir/init_from.json`` lists every key), or the
    warning of a config whose original recipe starts from pretrained weights that were not given."""
    warning = missing_source_warning(config)
    if warning:
        log(warning)
    for report in reports:
        for line in report.lines():
            log(line)
    if reports and jax.process_index() == 0:
        write_json(workdir, 'init_from.json', [dataclasses.asdict(r) for r in reports], indent=1)


def _eval_scalars(summary):
    if summary is None:
        return {}
    return {'eval/NDS': summary['nd_score'], 'eval/mAP': summary['mean_ap'],
            **{f'eval/{k}': v for k, v in summary['tp_errors'].items()}}


def eval_batch_size(config, num_devices):
    """The global evaluation batch: ``train.eval_batch_size``, or one sample per device when it is 0 (the
    default, so that any mesh works unset; scene streams are spread over the devices)."""
    batch_size = config.train.eval_batch_size or num_devices
    if batch_size % num_devices:
        raise ConfigError(f'config train.eval_batch_size={batch_size} must be a multiple of the '
                          f'{num_devices} devices of the mesh (0: one sample per device)')
    return batch_size


def predict(trainer, params, recs, log=None):
    """Runs ``eval_step`` over ``recs`` (scene streams carrying the previous BEV); returns
    {sample token: list of nuScenes result dicts} (gathered on every process). ``log``: a line before and after
    the eval step's compilation (its first call)."""
    config, mesh = trainer.config, trainer.mesh
    data_cfg = config.data
    batch_size = eval_batch_size(config, mesh.devices.size)
    local = batch_size // jax.process_count()
    ds = pipeline.eval_dataset(recs, data_cfg.dataroot, data_cfg, local, jax.process_index(), jax.process_count(),
                               pipeline.bev_config(config.model))
    prev = mesh_lib.shard_batch(np.zeros(trainer.model.carried_shape(local), np.float32), mesh)
    class_names = tuple(data_cfg.class_names)
    detections = {}
    for batch in DevicePrefetcher(iter(ds), mesh, data_cfg.get('device_prefetch', 2)):
        first = not trainer.eval_compiled
        if first and log:
            log('compiling the eval step ...')
            start = time.time()
        out = trainer.eval_step(params, batch, prev)
        trainer.eval_compiled = True
        if first and log:
            log(f'compiled the eval step in {time.time() - start:.1f} s')
        prev = out.pop('bev')
        host = jax.device_get(out) if jax.process_count() == 1 else multihost_utils.process_allgather(out, tiled=True)
        for row in range(host['boxes'].shape[0]):
            keep = host['valid'][row]
            if not keep.any():
                continue
            rec = recs['samples'][int(host['sample_idx'][row])]
            detections[rec['token']] = nuscenes_metrics.boxes_to_results(
                rec, host['boxes'][row][keep], host['scores'][row][keep], host['labels'][row][keep], class_names)
    return detections


def evaluate_params(trainer, params, out_dir, log=print):
    """Predicts the validation split and runs the devkit's DetectionEval; writes
    ``out_dir/results.json`` and ``out_dir/metrics_summary.json`` (process 0). A split without annotations
    (nuScenes ``test``) gets only ``results.json``, the submission file of the evaluation server (meta and results
    for every sample), and None."""
    config = trainer.config
    data_cfg = config.data
    val = load_split(config, data_cfg.val_split)
    start = time.time()
    detections = predict(trainer, params, val, log)
    if jax.process_index() != 0:
        return None
    with storage.local_folder(out_dir) as local_out:   # the devkit writes local files; copied to a URL after
        path = os.path.join(local_out, 'results.json')
        meta = config.get('submission')   # None in the config.json of a run older than the key
        meta = None if meta is None else meta.to_dict()
        nuscenes_metrics.write_results(nuscenes_metrics.results_json(val, detections, meta), path)
        annotated = nuscenes_metrics.has_annotations(val)
        if annotated:
            summary = nuscenes_metrics.run_detection_eval(path, data_cfg.dataroot, data_cfg.version,
                                                          data_cfg.val_split, local_out)
    if not annotated:
        log(f'{data_cfg.val_split} has no annotations ({len(val["samples"])} samples, {time.time() - start:.0f} s): '
            f'wrote the submission file {os.path.join(out_dir, "results.json")} (meta + results for every sample); '
            f'DetectionEval not run')
        return None
    log(f'evaluation on {data_cfg.val_split} ({len(val["samples"])} samples, {time.time() - start:.0f} s):\n'
        + nuscenes_metrics.format_metrics(summary))
    return summary


def restore_model_params(trainer, path, step=None):
    """``params['model']`` of ``path`` (a workdir's latest or ``step`` checkpoint, or a params folder),
    checked leaf by leaf against ``trainer``'s model (``CheckpointError`` lists mismatches), cast to its
    dtypes and replicated on its mesh."""
    abstract = trainer.state.params['model']
    params = params_io.load_params(path, step)
    lines, _ = params_io.shape_mismatches(params, abstract)
    if lines:
        source = path if step is None else f'{path} (step {step})'
        raise CheckpointError(f'params in {source} do not fit config.model:\n  {params_io.format_lines(lines)}')
    params = jax.tree_util.tree_map(lambda x, a: jnp.asarray(x, a.dtype), params, abstract)
    return mesh_lib.replicate(params, trainer.mesh)


EXPERT_EVAL = 'eval/expert'   # where ``evaluate_expert`` writes in a workdir


def evaluate_expert(config, workdir, log=print):
    """The expert of a distillation ``config`` (``config.distill.expert_checkpoint``) evaluated on the
    apprentice's validation images as the distiller feeds them (``Distiller.expert_batch``: renormalised to the
    expert's normalisation and upsampled ``distill.expert_upsample`` times, ``lidar2img`` scaled): what the
    expert knows on the input it distils from. Writes ``workdir/eval/expert/metrics_summary.json`` and
    ``results.json`` (beside, never over, the apprentice's ``workdir/eval/``); returns the summary."""
    check_identity(config, workdir, 'evaluate the expert of')
    distiller, expert_params = build_distillation(config)
    if distiller is None:
        raise ConfigError('config.distill.method is none: there is no expert to evaluate')
    expert_config = config.copy_and_resolve_references()
    expert_config.model = config.expert.model     # the apprentice's data, the expert's model and BEV grid
    trainer = Trainer(expert_config, num_train_samples=1)
    trainer.eval_step = compile_eval_step(make_eval_step(trainer.model, expert_config, distiller.expert_batch),
                                          trainer.mesh)
    log(f'evaluating the expert {config.distill.expert_checkpoint} on the distillation input')
    return evaluate_params(trainer, mesh_lib.replicate(expert_params, trainer.mesh),
                           storage.as_path(workdir) / EXPERT_EVAL, log=log)


def evaluate_checkpoint(config, workdir, step=None, log=print):
    """Restores a checkpoint of ``workdir`` and evaluates its detector; returns the summary. ``config`` must be
    the workdir's model and data (``workdir.check_identity``)."""
    check_identity(config, workdir, 'evaluate')
    trainer = Trainer(config, num_train_samples=1)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=False)
    named = step is not None
    step = ckpt.latest_step() if step is None else int(step)
    if step is None:
        raise CheckpointError(f'no checkpoint in {ckpt.directory}')
    ckpt.close()
    params = restore_model_params(trainer, workdir, step)
    out = storage.as_path(workdir) / (f'eval/step_{step}' if named else 'eval')
    log(f'evaluating {ckpt.directory}/{step}')
    return evaluate_params(trainer, params, out, log=log)
