"""Hungarian matcher benchmark: the in-graph JAX matcher (``matching.hungarian_jax``, ``config.loss.matcher='jax'``)
against scipy's ``linear_sum_assignment`` through ``jax.pure_callback`` (``'scipy'``, the default), side by side
in one run, on the current backend.

    python experiments/bench_matcher.py                  # prints the table
    python experiments/bench_matcher.py --out            # and writes experiments/results/bench_matcher.json
    python experiments/bench_matcher.py --boxes 0 200 --iters 3 --out /tmp/results

One matching step is the training step's: ``jax.vmap(matching.match)`` over the decoder layers (6) of a batch
(1) with 900 queries, 10 classes and ``--slots`` GT slots (256, ``data.max_gt`` of the full configs) of which
``--boxes`` are valid, both matchers jit-compiled (AOT ``lower().compile()``, timed apart), the focal + L1
costs included (the same for both); and the assignment alone (``matching.assign`` vmapped over the layers'
precomputed (L, B, Q, G) costs), where the matchers differ. Inputs (``--inputs``):

* ``random``: an untrained head: logits ~ N(-4.6, 1) (the focal prior bias), box centres uniform over the
  point-cloud range, GT likewise;
* ``trained``: a converged-looking head: 3 queries per GT predict it (0.3 m centre noise, logit +3 on its
  class), the others as ``random``; many queries compete for each GT.
* ``collapsed`` (not run by default): every query predicts nearly the same box (a collapsed head), so all GT
  of a class rank the queries alike (a near rank-one cost): the augmenting paths are long, the worst case
  of the JAX matcher (O(G^2 Q) instead of ~O(G Q)).

``--devices N`` (N > 1; simulated CPU devices when run as a script) adds the matching step at one sample per
device on a mesh of N, through ``matching.assign`` as training runs it: ``jax`` per device shard, ``scipy`` (on a
CPU mesh one callback on the whole batch: per-device callbacks hang there, ``assign``), and for comparison the
in-graph matcher on the global batch as before (``jax_global``: its loops run over every device's samples), with
the compiled programs' all-gathers and host callbacks (``bench_partition.hlo_stats``). Simulated devices share
this machine's cores, so those times say what each device does, not what a node of accelerators would take.

Each (inputs, boxes) case times the two compiled steps round-robin (``benchmark.interleaved``) after
``--warmup`` calls, ``--iters`` times, and reports the medians with the quartile spread and the ratio
jax / scipy of the medians (< 1: the JAX matcher is faster). The assignments are compared (continuous
random costs have one optimum: ``same``) and by total cost (``cost_gap``, relative; near-ties may differ in
the pairs, not in the cost beyond float32 rounding). The load average before and after is printed and
recorded: on a shared machine the absolute figures wander, the side-by-side ratio less so.
"""
import argparse
import os
import time

from experiments import simulated_devices

if __name__ == '__main__':
    simulated_devices.request(1)   # --devices N: before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from experiments import benchmark  # noqa: E402
from experiments.bench_partition import hlo_stats  # noqa: E402
from fd3d_jax.detection import matching  # noqa: E402
from fd3d_jax.models.box_coder import normalize_bbox  # noqa: E402
from fd3d_jax.train import mesh as mesh_lib  # noqa: E402
from fd3d_jax.train.train_step import under_mesh  # noqa: E402

# --devices: how the matching step is placed (matcher, through ``assign``).
PLACEMENTS = {'jax': ('jax', True), 'scipy': ('scipy', True), 'jax_global': ('jax', False)}

PC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
INPUTS = ('random', 'trained', 'collapsed')
DEFAULT_INPUTS = ('random', 'trained')


def _boxes(rng, shape):
    """(..., 9) boxes ``(x, y, z, w, l, h, yaw, vx, vy)`` inside ``PC_RANGE``."""
    lo, hi = np.asarray(PC_RANGE[:3]), np.asarray(PC_RANGE[3:])
    return np.concatenate([rng.uniform(lo, hi, shape + (3,)), rng.uniform(0.5, 4.0, shape + (3,)),
                           rng.uniform(-np.pi, np.pi, shape + (1,)), rng.normal(0, 2, shape + (2,))], -1)


def make_inputs(kind, layers, batch, queries, classes, slots, boxes, seed=0):
    """(cls_logits (L, B, Q, K), bbox_preds (L, B, Q, 10), gt_boxes (B, G, 9), gt_labels (B, G), gt_mask (B, G))."""
    rng = np.random.default_rng(seed)
    gt = _boxes(rng, (batch, slots)).astype(np.float32)
    labels = rng.integers(0, classes, (batch, slots)).astype(np.int32)
    mask = np.zeros((batch, slots), bool)
    mask[:, :boxes] = True
    labels[~mask], gt[~mask] = -1, 0.0
    logits = rng.normal(-4.6, 1.0, (layers, batch, queries, classes))
    pred_boxes = _boxes(rng, (layers, batch, queries))
    if kind == 'trained' and boxes:
        per_gt = min(3, queries // boxes)
        for layer in range(layers):
            for b in range(batch):
                picks = rng.permutation(queries)[:per_gt * boxes].reshape(boxes, per_gt)
                for g in range(boxes):
                    q = picks[g]
                    pred_boxes[layer, b, q] = gt[b, g]
                    pred_boxes[layer, b, q, :3] += rng.normal(0, 0.3, (per_gt, 3))
                    logits[layer, b, q, labels[b, g]] += 3.0 + rng.normal(0, 0.5, per_gt)
    if kind == 'collapsed':
        pred_boxes = pred_boxes[..., :1, :] + rng.normal(0, 0.05, pred_boxes.shape)
    preds = np.asarray(normalize_bbox(jnp.asarray(pred_boxes, jnp.float32)))
    return logits.astype(np.float32), preds, gt, labels, mask


def matching_step(matcher):
    """The training step's matching: every decoder layer matched (``detection_loss``'s vmap)."""
    def step(cls_all, box_all, gt_boxes, gt_labels, gt_mask):
        return jax.vmap(lambda c, b: matching.match(c, b, gt_boxes, gt_labels, gt_mask, matcher=matcher))(
            cls_all, box_all)
    return step


def timed_pair(make, inputs, args):
    """Compiles ``make(matcher)`` for both matchers and times them round-robin: (times, compile seconds,
    assignments)."""
    compiled, compile_s, assigned = {}, {}, {}
    for matcher in ('jax', 'scipy'):
        t0 = time.perf_counter()
        compiled[matcher] = jax.jit(make(matcher)).lower(*inputs).compile()
        compile_s[matcher] = round(time.perf_counter() - t0, 2)
        assigned[matcher] = np.asarray(compiled[matcher](*inputs))
    fns = {m: (lambda f=f: jax.block_until_ready(f(*inputs))) for m, f in compiled.items()}
    return benchmark.interleaved(fns, warmup=args.warmup, iters=args.iters), compile_s, assigned


def run_case(kind, boxes, args):
    inputs = [jnp.asarray(x) for x in make_inputs(kind, args.layers, args.batch, args.queries, args.classes,
                                                    args.slots, boxes, args.seed)]
    step, compile_s, assigned = timed_pair(matching_step, inputs, args)
    # The assignment alone, on the layers' precomputed costs (L, B, Q, G).
    cost = jax.jit(jax.vmap(lambda c, b: matching.match_cost(c, b, *inputs[2:])))(*inputs[:2])
    alone, _, alone_assigned = timed_pair(
        lambda m: lambda c, mask: jax.vmap(lambda x: matching.assign(x, mask, m))(c), (cost, inputs[4]), args)
    ratio = lambda t: round(t['jax']['median_ms'] / max(t['scipy']['median_ms'], 1e-9), 3)    # noqa: E731
    return dict(inputs=kind, boxes=boxes, step=step, step_ratio=ratio(step), assign=alone,
                assign_ratio=ratio(alone), compile_s=compile_s,
                same=bool(np.array_equal(assigned['jax'], assigned['scipy'])
                          and np.array_equal(alone_assigned['jax'], assigned['jax'])),
                cost_gap=cost_gap(np.asarray(cost), assigned['jax'], assigned['scipy']),
                matched=int(np.sum(assigned['jax'] >= 0)))


def sharded_matching_step(matcher, through_assign):
    """The training step's matching on the global batch: every layer's costs, then ``assign`` or, with
    ``through_assign`` False, the matcher called on the whole batch (what training did before)."""
    solve = matching.hungarian if matcher == 'scipy' else matching.hungarian_jax

    def step(cls_all, box_all, gt_boxes, gt_labels, gt_mask):
        cost = jax.vmap(lambda c, b: matching.match_cost(c, b, gt_boxes, gt_labels, gt_mask))(cls_all, box_all)
        if through_assign:
            return matching.assign(cost, gt_mask, matcher)
        return solve(cost, jnp.broadcast_to(gt_mask, cost.shape[:-2] + cost.shape[-1:]))
    return step


def run_devices_case(kind, boxes, args):
    """The matching step at one sample per device on ``args.devices`` devices, per placement (``PLACEMENTS``)."""
    mesh = mesh_lib.make_mesh(jax.devices()[:args.devices])
    inputs = make_inputs(kind, args.layers, args.devices, args.queries, args.classes, args.slots, boxes, args.seed)
    layer_batch = NamedSharding(mesh, P(None, 'data'))
    shardings = (layer_batch, layer_batch) + (mesh_lib.data_sharded(mesh),) * 3
    inputs = [jax.device_put(x, sharding) for x, sharding in zip(inputs, shardings)]
    compiled, stats, assigned = {}, {}, {}
    for name, (matcher, through_assign) in PLACEMENTS.items():
        fn = jax.jit(under_mesh(sharded_matching_step(matcher, through_assign), mesh), in_shardings=shardings)
        compiled[name] = fn.lower(*inputs).compile()
        program = hlo_stats(compiled[name])
        gathers = program['collectives']['all-gather']
        stats[name] = dict(all_gathers=gathers['count'], all_gather_bytes=gathers['bytes'],
                           host_callbacks=program['host_callbacks'], dynamic_loops=program['dynamic_loops'])
        assigned[name] = np.asarray(compiled[name](*inputs))
    fns = {name: (lambda f=f: jax.block_until_ready(f(*inputs))) for name, f in compiled.items()}
    times = benchmark.interleaved(fns, warmup=args.warmup, iters=args.iters)
    return dict(inputs=kind, boxes=boxes, devices=args.devices, times=times, programs=stats,
                same=all(np.array_equal(a, assigned['scipy']) for a in assigned.values()))


def cost_gap(cost, got, want):
    """Largest ``(total(got) - total(want)) / max(1, |total(want)|)`` over layers and samples, totals in
    float64 of the float32 costs (L, B, Q, G); assignments (L, B, Q). Near-ties (the ``collapsed`` inputs)
    may pick other pairs (``same`` false) at a gap of float32 rounding."""
    gaps = [0.0]
    for index in np.ndindex(*got.shape[:-1]):
        c = cost[index].astype(np.float64)
        total = lambda a, c=c: float(c[np.flatnonzero(a >= 0), a[a >= 0]].sum())    # noqa: E731
        gaps.append((total(got[index]) - total(want[index])) / max(1.0, abs(total(want[index]))))
    return float(f'{max(gaps):.3g}')


def print_table(result):
    cell = lambda t: f'{t["median_ms"]:.2f} [{t["p25_ms"]:.2f}-{t["p75_ms"]:.2f}]'    # noqa: E731
    print(f'\n{"":14s} {"matching step (costs + assignment), ms":^56s}   {"assignment alone, ms":^56s}')
    print(f'{"inputs":8s} {"boxes":>5s} {"jax [p25-p75]":>22s} {"scipy [p25-p75]":>22s} {"jax/scipy":>9s}   '
          f'{"jax [p25-p75]":>22s} {"scipy [p25-p75]":>22s} {"jax/scipy":>9s} {"same":>5s} {"cost gap":>8s} '
          f'{"compile s jax/scipy":>20s}')
    for row in result['rows']:
        print(f'{row["inputs"]:8s} {row["boxes"]:5d} {cell(row["step"]["jax"]):>22s} {cell(row["step"]["scipy"]):>22s} '
              f'{row["step_ratio"]:9.2f}   {cell(row["assign"]["jax"]):>22s} {cell(row["assign"]["scipy"]):>22s} '
              f'{row["assign_ratio"]:9.2f} {str(row["same"]):>5s} {row["cost_gap"]:8.1e} '
              f'{row["compile_s"]["jax"]:>12.2f} / {row["compile_s"]["scipy"]:.2f}')
    print(f'backend {result["backend"]}; {result["layers"]} layers x batch {result["batch"]} x {result["queries"]} '
          f'queries x {result["slots"]} GT slots; load average {result["load_average"]["start"]} -> '
          f'{result["load_average"]["end"]}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--boxes', type=int, nargs='+', default=[0, 10, 50, 100, 200], help='valid GT boxes')
    parser.add_argument('--inputs', nargs='+', choices=INPUTS, default=list(DEFAULT_INPUTS))
    parser.add_argument('--queries', type=int, default=900)
    parser.add_argument('--slots', type=int, default=256, help='static GT slots (data.max_gt)')
    parser.add_argument('--layers', type=int, default=6, help='decoder layers (vmapped)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--classes', type=int, default=10)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--devices', type=int, default=1, help='> 1: also the matching step on a mesh of N devices')
    parser.add_argument('--out', nargs='?', const=benchmark.RESULTS_DIR, default=None, metavar='DIR',
                        help=f'write DIR/bench_matcher.json (DIR default {benchmark.RESULTS_DIR})')
    args = parser.parse_args(argv)
    if max(args.boxes) > args.slots:
        parser.error(f'--boxes {max(args.boxes)} > --slots {args.slots}')

    load_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for kind in args.inputs:
        for boxes in args.boxes:
            rows.append(run_case(kind, boxes, args))
            r = rows[-1]
            ms = lambda part, m: r[part][m]['median_ms']    # noqa: E731
            print(f'{kind} {boxes} boxes: step jax {ms("step", "jax"):.2f} ms, scipy {ms("step", "scipy"):.2f} ms; '
                  f'assignment alone jax {ms("assign", "jax"):.2f} ms, scipy {ms("assign", "scipy"):.2f} ms; '
                  f'same {r["same"]}', flush=True)
    device_rows = []
    if args.devices > 1:
        if jax.device_count() < args.devices:
            parser.error(f'--devices {args.devices}: {jax.device_count()} present')
        for kind in args.inputs:
            for boxes in args.boxes:
                device_rows.append(run_devices_case(kind, boxes, args))
                r = device_rows[-1]
                print(f'{args.devices} devices, {kind} {boxes} boxes: ' + '; '.join(
                    f'{name} {r["times"][name]["median_ms"]:.2f} ms ({r["programs"][name]["all_gathers"]} all-gathers, '
                    f'{r["programs"][name]["host_callbacks"]} callbacks)' for name in PLACEMENTS) +
                    f'; same {r["same"]}', flush=True)
    result = dict(backend=jax.default_backend(), layers=args.layers, batch=args.batch, queries=args.queries,
                  slots=args.slots, classes=args.classes, iters=args.iters, warmup=args.warmup, rows=rows,
                  device_rows=device_rows,
                  load_average=dict(start=load_start, end=[round(x, 2) for x in os.getloadavg()]))
    print_table(result)
    if args.out is not None:
        print('wrote', benchmark.write_result('bench_matcher', result, args.out, echo=False))
    return result


if __name__ == '__main__':
    main()
