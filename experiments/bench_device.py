"""Every accelerator figure of the project in one command, inside a time budget (``make bench-device``).

    python -m experiments.bench_device [--budget-s 480] [--out-dir experiments/results] [--toy]
        [--figures msda inference train] [--models bevformer_tiny bevformer_small bevformer_base]
        [--dtypes float32 bfloat16] [--keep-existing]

The figures, run in this order, each one entry of the result (``figures``, keyed by its id):

* ``msda/<shape>``: the deformable-attention core at the BEVFormer shapes (``bench_msda.run_shape``: tiny_sca,
  tiny_tsa, base_tsa, base_sca, every query), forward and forward+backward of the production core and of the
  direct reference, with XLA's compiled memory; an implementation whose compiled peak exceeds half the device's
  memory is skipped by ``run_shape`` and says so. JAX only: torch's CPU time is not a device figure.
* ``inference/<config>/<dtype>``: batch-1 frames/s with bench_inference.py's protocol (``time_frames``: one
  compiling call, warm-up frames, timed frames) on dummy full-size inputs (``dummy_inputs``) and random params,
  in float32 and bfloat16 (``config.model.dtype``), beside PyTorch's published FPS of the same model
  (``bench_inference.PUBLISHED``: 15.9 / 5.1 / 2.4 on an RTX 3090 for tiny / small / base).
* ``train/<config>/<dtype>``: the train step (``bench_sca.compare_variants``) with dense and with sparse spatial
  cross-attention (``model.sca_max_cameras`` 0 and 2; 2 is exact on the nuScenes rig, docs/benchmarks.md),
  interleaved: the median of a few steps after the compile, the compile seconds and XLA's compiled peak bytes
  (``benchmark.memory``), beside PyTorch's published training memory (``bench_memory.PYTORCH_TRAIN_GB``,
  nvidia-smi: not the same definition). The float32 inference trainer of a model is reused as its dense
  float32 train trainer (and so for bfloat16), so its initialisation is not paid twice.

Each inference and train entry records what really ran: the built module's ``dtype`` and ``sca_max_cameras``,
and of the compiled program the number of bfloat16- and float32-valued HLO instructions and a fingerprint.

Budget: before each figure its seconds are estimated from the figures measured so far in this run (the same
kind and model in the other precision; else the same kind scaled by ``COST_WEIGHT``; a train figure from its
model's inference times ``TRAIN_OVER_INFERENCE``; the first figure of a kind has no estimate and runs while any
budget is left). A figure that would end past the budget is skipped and recorded as skipped with the estimate
and what was left. A running figure is not interrupted: a run can end past the budget by one estimate's error.
A figure that fails (out of memory, a compile error) is recorded as failed with a one-line reason, and the run
goes on. ``--figures``, ``--models``, ``--dtypes`` select; the others are recorded as not selected.

Result: ``<out-dir>/bench_device_<backend>.json`` (``bench_device_toy_<backend>.json`` with ``--toy``) via
``benchmark.write_result`` (machine, versions, commit), rewritten after every figure; figures not yet reached
are ``pending``, so a run killed on the way still shows where it was. ``--keep-existing``: figures measured
(``ok``) in that file on the same device are kept, with their own date and commit, and not run again, so that a
second call fills in what a first one skipped.

``--toy``: the ``:toy`` config of each detector, 2 timed frames, 2 timed steps, the ``tiny_test`` MSDA shape, and
XLA's ``jax_disable_most_optimizations`` (the toy programs are all compile): a check that the command runs on a
CPU in a few minutes, whose figures measure nothing.
"""
import argparse
import gc
import hashlib
import json
import os
import time

import jax
import numpy as np

from experiments import bench_inference, bench_memory, bench_msda, bench_sca, benchmark
from fd3d_jax.models import deformable_attention
from fd3d_jax.train import loop
from fd3d_jax.train import mesh as mesh_lib

FAMILIES = ('bevformer_tiny', 'bevformer_small', 'bevformer_base')
TRAIN_FAMILIES = ('bevformer_tiny', 'bevformer_base')
DTYPES = ('float32', 'bfloat16')
KINDS = ('msda', 'inference', 'train')
MSDA_SHAPES = ('tiny_sca', 'tiny_tsa', 'base_tsa', 'base_sca')
SPARSE_SLOTS = 2
VARIANTS = {'dense': 0, f'sparse_{SPARSE_SLOTS}': SPARSE_SLOTS}
# Planning guesses, not measurements: a model's figure cost relative to tiny's (compile time grows with the layers
# and the backbone: small and base have ResNet-101-DCN, base 6 encoder layers), and a train figure (2 compiles of
# the whole step, 1 more init) over its model's inference figure (1 init, 1 forward compile): 3.8-4.7 on the toy
# configs on the CPU.
COST_WEIGHT = {'bevformer_tiny': 1.0, 'bevformer_small': 1.5, 'bevformer_base': 2.0}
TRAIN_OVER_INFERENCE = 4.0
SETTINGS = {
    'full': dict(size='full', frames=30, warmup=5, step_iters=5, step_warmup=1, msda_shapes=MSDA_SHAPES,
                 msda_iters=5, msda_warmup=1),
    'toy': dict(size='toy', frames=2, warmup=1, step_iters=2, step_warmup=0, msda_shapes=('tiny_test',),
                msda_iters=1, msda_warmup=0),
}


def figure_id(kind, subject, dtype=None, size='full'):
    """``msda/<shape>``, ``inference/<family>:<size>/<dtype>``, ``train/<family>:<size>/<dtype>``."""
    return f'{kind}/{subject}' if kind == 'msda' else f'{kind}/{subject}:{size}/{dtype}'


def plan(settings):
    """Every figure, in the order run: MSDA shapes, inference (float32 for every model, then bfloat16), train
    steps (the same order): ``{id: entry}`` with status ``pending``."""
    size = settings['size']
    figures = [dict(kind='msda', subject=shape, dtype=None) for shape in settings['msda_shapes']]
    figures += [dict(kind='inference', subject=family, dtype=dtype) for dtype in DTYPES for family in FAMILIES]
    figures += [dict(kind='train', subject=family, dtype=dtype) for dtype in DTYPES for family in TRAIN_FAMILIES]
    out = {}
    for fig in figures:
        if fig['kind'] != 'msda':
            fig['config'] = f"{fig['subject']}:{size}"
        out[figure_id(fig['kind'], fig['subject'], fig['dtype'], size)] = dict(fig, status='pending')
    return out


def one_line(error, limit=300):
    """``Type: first line of the message``, at most ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]


def program_record(compiled):
    """What a compiled executable computes in: its HLO instructions with a bfloat16 / float32 value, and a
    fingerprint of its text (two programs that differ, e.g. dense and sparse SCA, have different ones)."""
    text = compiled.as_text()
    return dict(bf16_values=text.count('= bf16['), f32_values=text.count('= f32['),
                fingerprint=hashlib.sha256(text.encode()).hexdigest()[:16])


def device_memory_limit():
    """Half of the device allocator's ``bytes_limit`` where the backend reports it (GPUs, TPUs), else half of the
    host's memory (``bench_msda``'s rule on a CPU): what ``run_shape`` lets an implementation's compiled peak take."""
    host = (benchmark.physical_memory_bytes() or 1 << 62) // 2
    stats = jax.devices()[0].memory_stats() or {}
    return min(host, int(stats['bytes_limit']) // 2) if 'bytes_limit' in stats else host


def estimate_seconds(fig, measured):
    """(seconds, basis) of ``fig`` from the ``ok`` figures of this run (``measured``, in order run)."""
    def weight(entry):
        return COST_WEIGHT.get(entry['subject'], 1.0)

    same_kind = [m for m in measured if m['kind'] == fig['kind']]
    same = [m for m in same_kind if m['subject'] == fig['subject']]
    if same:
        worst = max(same, key=lambda m: m['elapsed_s'])
        return worst['elapsed_s'], f"{worst['id']} took {worst['elapsed_s']:.0f} s"
    if same_kind:
        worst = max(same_kind, key=lambda m: m['elapsed_s'] * weight(fig) / weight(m))
        seconds = worst['elapsed_s'] * weight(fig) / weight(worst)
        return seconds, f"{worst['id']} took {worst['elapsed_s']:.0f} s, x {weight(fig) / weight(worst):.2f} (COST_WEIGHT)"
    if fig['kind'] == 'train':
        inference = [m for m in measured if m['kind'] == 'inference' and m['subject'] == fig['subject']]
        if inference:
            worst = max(inference, key=lambda m: m['elapsed_s'])
            return (worst['elapsed_s'] * TRAIN_OVER_INFERENCE,
                    f"{worst['id']} took {worst['elapsed_s']:.0f} s, x {TRAIN_OVER_INFERENCE} (TRAIN_OVER_INFERENCE)")
    return 0.0, 'no figure of this kind measured yet'


class Run:
    """The state of one run: settings, mesh, the dense trainers kept from inference for the train figures.
    ``train_pending``: the (family, dtype) whose train figure is still to run (their inference trainers are kept)."""

    def __init__(self, settings, train_pending):
        self.settings = settings
        self.train_pending = set(train_pending)
        self.mesh = mesh_lib.make_mesh()
        self.batch_size = jax.device_count()   # one sample per device
        self.kept = {}                          # (family, dtype) -> Trainer whose eval step was timed

    def config(self, fig):
        """``fig``'s config in its precision, as ``compare_variants`` builds its dense variant (batch one per
        device, ``sca_max_cameras`` 0), so that the inference trainer can serve as the dense train trainer."""
        _, config = benchmark.load_config(fig['config'])
        config.model.dtype = fig['dtype']
        return bench_sca.with_model_key(config, 'sca_max_cameras', VARIANTS['dense'], self.batch_size)

    def msda(self, fig):
        args = bench_msda.make_parser().parse_args(
            ['--shapes', fig['subject'], '--iters', str(self.settings['msda_iters']),
             '--warmup', str(self.settings['msda_warmup']), '--no-torch'])
        limit = device_memory_limit()
        entry = bench_msda.run_shape(fig['subject'], args, False, limit)
        return dict(entry, memory_limit_bytes=limit, chunk_bytes=deformable_attention.default_chunk_bytes(),
                    iters=args.iters, warmup=args.warmup)

    def inference(self, fig):
        config = self.config(fig)
        settings = self.settings
        batches, inputs = bench_inference.dummy_inputs(config, settings['warmup'] + settings['frames'],
                                                       'bench_device: dummy inputs at the config size')
        trainer = loop.Trainer(config, 1, self.mesh)
        params = trainer.state.params['model']
        timed = bench_inference.time_frames(trainer, params, batches, settings['warmup'])
        prev0 = mesh_lib.shard_batch(np.zeros(trainer.model.carried_shape(1), np.float32), trainer.mesh)
        compiled = trainer.eval_step.lower(params, mesh_lib.shard_batch(batches[0], trainer.mesh), prev0).compile()
        if (fig['subject'], fig['dtype']) in self.train_pending:
            self.kept[fig['subject'], fig['dtype']] = trainer
        published = [e for e in bench_inference.published_entries(f"{fig['subject']}:full") if e['same_config']]
        return dict(inputs=inputs, image_hw=list(batches[0]['img'].shape[-3:-1]), batch_size=1, queue_length=1,
                    params='random init', warmup=settings['warmup'], frames=timed['frames'],
                    compile_s=round(timed['compile_s'], 2), latency=timed['latency'], fps_mean=timed['fps_mean'],
                    fps_median=timed['fps_median'], model_dtype=str(trainer.model.dtype),
                    sca_max_cameras=int(trainer.model.sca_max_cameras), program=program_record(compiled),
                    published=dict(note=bench_inference.PUBLISHED_NOTE, entries=published))

    def train(self, fig):
        config = self.config(fig)
        kept = self.kept.pop((fig['subject'], fig['dtype']), None)

        def inspect(variant, compiled, trainer):
            return dict(model_dtype=str(trainer.model.dtype), sca_max_cameras=int(trainer.model.sca_max_cameras),
                        program=program_record(compiled))

        entry = bench_sca.compare_variants(config, 'sca_max_cameras', VARIANTS, True, self.batch_size,
                                           self.settings['step_iters'], self.settings['step_warmup'],
                                           trainers={'dense': kept} if kept else None, inspect=inspect)
        variants = {}
        for variant in VARIANTS:
            variants[variant] = dict(entry[variant], step=entry['times'][variant],
                                     peak_gb=round(entry[variant]['memory_bytes']['peak'] / 1e9, 3))
        sparse = f'sparse_{SPARSE_SLOTS}'
        published_gb = bench_memory.PYTORCH_TRAIN_GB.get(f"{fig['subject']}:full")
        return dict(batch_size=self.batch_size, iters=self.settings['step_iters'],
                    warmup=self.settings['step_warmup'], variants=variants, dense_reused_inference_trainer=bool(kept),
                    dense_over_sparse=round(entry['times']['dense']['median_ms'] / entry['times'][sparse]['median_ms'],
                                            3),
                    published=dict(pytorch_train_gb=published_gb, config=f"{fig['subject']}:full",
                                   note=('PUBLISHED PyTorch training memory (BEVFormer README, nvidia-smi, fp32, '
                                         'batch 1 per GPU): a process-level figure, not XLA\'s compiled peak')))


def mark_unselected(figures, args):
    for fig in figures.values():
        why = ('--figures' if fig['kind'] not in args.figures else
               '--models' if fig['kind'] != 'msda' and fig['subject'] not in args.models else
               '--dtypes' if fig['kind'] != 'msda' and fig['dtype'] not in args.dtypes else None)
        if why:
            fig.update(status='skipped', reason=f'not selected ({why})')


def keep_existing(figures, path):
    """Copies the ``ok`` figures of an earlier result file at ``path`` measured on this run's devices into
    ``figures`` (with ``kept_from``: its date and commit); returns how many."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        old = json.load(f)
    machine, here = old.get('machine', {}), benchmark.machine_info()
    if machine.get('devices') != here['devices']:
        print(f"--keep-existing: {path} was measured on {machine.get('devices')}, not {here['devices']}: "
              'nothing kept', flush=True)
        return 0
    kept = 0
    for fid, entry in old.get('figures', {}).items():
        if entry.get('status') == 'ok' and fid in figures and figures[fid]['status'] == 'pending':
            figures[fid] = dict(entry, kept_from=entry.get('kept_from') or dict(date=machine.get('date'),
                                                                              commit=machine.get('commit')))
            kept += 1
    return kept


def summary(fig):
    """One line of the table's result column."""
    if fig['status'] != 'ok':
        return fig.get('reason', fig['status'])
    if fig['kind'] == 'msda':
        times = fig.get('times', {})
        parts = [f"{impl} {t['fwd']['median_ms']:.2f} / {t['fwd_bwd']['median_ms']:.2f} ms" for impl, t in times.items()]
        parts += [f'{impl} skipped ({why})' for impl, why in fig.get('skipped', {}).items()]
        return 'fwd / fwd+bwd: ' + '; '.join(parts)
    if fig['kind'] == 'inference':
        return (f"{fig['fps_mean']:.2f} FPS, median {fig['latency']['median_ms']:.1f} ms "
                f"({fig['model_dtype']}, {fig['program']['bf16_values']} bf16 HLO values)")
    return ', '.join(f"{v} {e['step']['median_ms']:.1f} ms peak {e['peak_gb']:.2f} GB"
                     for v, e in fig['variants'].items()) + f"; dense / sparse {fig['dense_over_sparse']}"


def published_column(fig):
    if fig['kind'] == 'inference':
        return ', '.join(f"{e['fps']} FPS ({e['hardware']})" for e in fig.get('published', {}).get('entries', []))
    if fig['kind'] == 'train':
        gb = fig.get('published', {}).get('pytorch_train_gb')
        return f'{gb} GB (nvidia-smi)' if gb else ''
    return ''


def print_table(figures, toy):
    print(f"\n| figure | status | result | PyTorch published{' (of :full: not comparable to :toy)' if toy else ''} |")
    print('|---|---|---|---|')
    for fid, fig in figures.items():
        published = published_column(fig) if fig['status'] == 'ok' else ''
        print(f"| {fid} | {fig['status']} | {summary(fig)} | {published} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--budget-s', type=float, default=480.0, help='seconds for all figures (estimated, see above)')
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--toy', action='store_true', help=':toy configs, tiny counts: a check that the command runs')
    parser.add_argument('--figures', nargs='+', choices=KINDS, default=list(KINDS))
    parser.add_argument('--models', nargs='+', choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument('--dtypes', nargs='+', choices=DTYPES, default=list(DTYPES))
    parser.add_argument('--keep-existing', action='store_true', help='keep the ok figures of an earlier result file')
    args = parser.parse_args(argv)

    settings = SETTINGS['toy' if args.toy else 'full']
    backend = jax.default_backend()
    name = f"bench_device_{'toy_' if args.toy else ''}{backend}"
    figures = plan(settings)
    for fid, fig in figures.items():
        fig['id'] = fid
    mark_unselected(figures, args)
    kept = keep_existing(figures, os.path.join(args.out_dir, f'{name}.json')) if args.keep_existing else 0
    run = Run(settings, [(f['subject'], f['dtype']) for f in figures.values()
                         if f['kind'] == 'train' and f['status'] == 'pending'])
    device = jax.devices()[0]
    print(f'{name}: {jax.device_count()} x {device.device_kind} ({backend}), budget {args.budget_s:.0f} s, '
          f"{sum(f['status'] == 'pending' for f in figures.values())} figures to run, {kept} kept", flush=True)

    def write(spent):
        result = dict(toy=args.toy, size=settings['size'], budget_s=args.budget_s, spent_s=round(spent, 1),
                      settings=settings, device_kind=device.device_kind, backend=backend,
                      xla=('jax_disable_most_optimizations (--toy: the toy programs are all compile; their figures '
                           'measure nothing)') if args.toy else 'default',
                      published_note=bench_inference.PUBLISHED_NOTE, protocol=bench_inference.PROTOCOL,
                      figures=figures)
        return benchmark.write_result(name, result, args.out_dir, echo=False)

    restore = None   # the accelerator run leaves XLA's settings alone
    if args.toy:
        restore = jax.config.values.get('jax_disable_most_optimizations', False)
        jax.config.update('jax_disable_most_optimizations', True)
    start = time.perf_counter()
    path = write(0.0)
    try:
        measured = []
        for fid, fig in figures.items():
            if fig['status'] != 'pending':
                continue
            spent = time.perf_counter() - start
            left = args.budget_s - spent
            estimate, basis = estimate_seconds(fig, measured)
            fig['estimate_s'] = round(estimate, 1)
            if left <= 0 or estimate > left:
                fig.update(status='skipped', reason=f'budget: estimated {estimate:.0f} s ({basis}), {max(left, 0):.0f} s '
                                                    f'of {args.budget_s:.0f} s left')
                print(f'[{spent:6.1f} s] {fid}: skipped, {fig["reason"]}', flush=True)
                if fig['kind'] == 'train':
                    run.kept.pop((fig['subject'], fig['dtype']), None)
                write(spent)
                continue
            print(f'[{spent:6.1f} s] {fid}: running (estimate {estimate:.0f} s: {basis})', flush=True)
            t0 = time.perf_counter()
            try:
                fig.update(getattr(run, fig['kind'])(fig))
                fig['status'] = 'ok'
            except Exception as e:   # noqa: BLE001 (out of memory, a compile error: recorded, the next figure runs)
                fig.update(status='failed', reason=one_line(e))
                if fig['kind'] == 'train':
                    run.kept.pop((fig['subject'], fig['dtype']), None)
            fig['elapsed_s'] = round(time.perf_counter() - t0, 1)
            if fig['status'] == 'ok':
                measured.append(fig)
            gc.collect()
            print(f"[{time.perf_counter() - start:6.1f} s] {fid}: {fig['status']} in {fig['elapsed_s']:.1f} s: "
                  f'{summary(fig)}', flush=True)
            write(time.perf_counter() - start)
    finally:
        if restore is not None:
            jax.config.update('jax_disable_most_optimizations', restore)
        run.kept.clear()
    spent = time.perf_counter() - start
    path = write(spent)
    print_table(figures, args.toy)
    counts = {s: sum(f['status'] == s for f in figures.values()) for s in ('ok', 'skipped', 'failed')}
    print(f'{spent:.0f} s of a {args.budget_s:.0f} s budget: {counts}; {path}', flush=True)
    return path


if __name__ == '__main__':
    main()
