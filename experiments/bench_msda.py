"""MSDA core benchmark: our production JAX core, our JAX reference and PyTorch's ``grid_sample``
formulation, side by side in one run, forward and forward+backward.

    python experiments/bench_msda.py                                  # tiny_sca tiny_tsa
    python experiments/bench_msda.py --shapes tiny_sca tiny_tsa base_tsa base_sca --queries 2500
    python experiments/bench_msda.py --shapes base_sca --compile-only   # XLA memory only, nothing run

Implementations (only the sampling core: no value / offset / weight / output projections):

* ``production``: ``deformable_attention.ms_deform_attn`` (chunked, custom VJP);
* ``reference``: ``deformable_attention.ms_deform_attn_reference`` (direct, materialises every tap);
* ``torch``: mmcv's ``multi_scale_deformable_attn_pytorch`` restated here (one ``F.grid_sample``
  per level, bilinear, zeros padding, ``align_corners=False``, then weights and sum), eager, with
  ``torch.set_num_threads`` = the cores this process may use (JAX's XLA:CPU pool uses the same).
  torch is optional: without it the torch rows, ratios and errors are skipped (and say so).

Forward+backward is one VJP giving the gradients of value, sampling locations and attention weights
for a random cotangent. All implementations' forward and forward+backward calls are timed round-robin
(``benchmark.interleaved``) so that a slow spell of the machine hits them alike; the table gives
medians and the quartile spread, and the JAX / torch ratio of medians (< 1: JAX faster). Numerics:
relative L2 error of the output and of the three gradients against torch (and against the JAX
reference). Memory: XLA's ``memory_analysis()`` of every compiled JAX function (``benchmark.memory``).
Runs whose compiled buffers (JAX) or estimated tensors (torch) exceed half of this machine's memory
are skipped, with the reason; ``--queries N`` caps every shape's queries at N (the first N; the
result says so: ``queries`` vs ``queries_full``, ``subsampled``) so that base_sca can be timed at all
(``--queries 2500`` leaves the tiny shapes whole).

Inputs: value ~ N(0, 1); locations uniform in [-0.05, 1.05] (the zero padding is exercised), moved
by 2e-3 pixel where a pixel coordinate is within 1e-3 of an integer: there the location gradient
jumps (the bilinear floor), and torch's grid (2 x - 1, then back to pixels) rounds differently from
the mmcv kernel convention we follow, so one such sample at tiny_tsa alone made a 1.4e-2 relative
error of d_loc. Attention weights: softmax-like (Dirichlet) over L*P per head.

Writes ``experiments/results/bench_msda.json`` (``benchmark.write_result``), one file for all shapes
of the run. ``--threads N`` pins the process to N of its allowed cores before JAX starts its CPU
client (no effect on a client already started, e.g. inside pytest) and sets torch's threads to N:
useful on a shared machine, where torch's OpenMP threads lose much more than XLA's pool when a core is
taken away (measured: tiny_tsa torch forward 29 ms on 1 thread vs 92 ms on 2 threads while a
training job ran on the 2 cores). The table also prints the load average before and after.
"""
import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmark
from fd3d_jax.models import deformable_attention as da

# batch, queries, heads, head dims, levels ((H, W), ...), points
SHAPES = {
    'tiny_sca': (6, 2500, 8, 32, ((15, 25),), 8),        # 6 cameras x dense 50x50 BEV, C5 of 480x800
    'tiny_tsa': (2, 2500, 8, 32, ((50, 50),), 4),        # queue of 2 (prev, cur) over the 50x50 BEV
    'base_sca': (6, 40000, 8, 32, ((116, 200), (58, 100), (29, 50), (15, 25)), 8),  # dense 200x200 BEV
    'base_tsa': (2, 40000, 8, 32, ((200, 200),), 4),
    'tiny_test': (2, 48, 2, 8, ((6, 10), (3, 5)), 2),    # smoke test only
}
IMPLS = ('production', 'reference', 'torch')
PASSES = ('fwd', 'fwd_bwd')
GRADS = ('d_value', 'd_loc', 'd_attn')


def _gb(n):
    return n / 1e9


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def make_inputs(b, q, m, d, shapes, p, seed=0):
    """value (B, S, M, D), loc (B, Q, M, L, P, 2), attn (B, Q, M, L, P), cot (B, Q, M*D); float32."""
    rng = np.random.default_rng(seed)
    nl, s = len(shapes), sum(h * w for h, w in shapes)
    value = rng.normal(size=(b, s, m, d)).astype(np.float32)
    loc = rng.uniform(-0.05, 1.05, size=(b, q, m, nl, p, 2))
    size = np.array([[w, h] for h, w in shapes], np.float64)[:, None, :]   # (L, 1, 2): (W, H)
    pix = loc * size - 0.5
    near = np.abs(pix - np.round(pix)) < 1e-3                               # on the floor's jump
    loc = np.where(near, loc + 2e-3 / size, loc).astype(np.float32)
    attn = rng.dirichlet(np.ones(nl * p), size=(b, q, m)).reshape(b, q, m, nl, p).astype(np.float32)
    cot = rng.normal(size=(b, q, m * d)).astype(np.float32)
    return value, loc, attn, cot


def rel_l2(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


# ---------------------------------------------------------------------------------------------
# PyTorch reference (mmcv multi_scale_deformable_attn_pytorch)
# ---------------------------------------------------------------------------------------------

def torch_available():
    return importlib.util.find_spec('torch') is not None


def torch_msda(value, shapes, loc, attn):
    """value (B, S, M, D), loc (B, Q, M, L, P, 2), attn (B, Q, M, L, P) -> (B, Q, M*D), torch tensors."""
    import torch
    import torch.nn.functional as F
    b, _, m, d = value.shape
    _, q, _, nl, p, _ = loc.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * loc - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = levels[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)   # (B*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)                 # (B*M, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode='bilinear', padding_mode='zeros', align_corners=False))
    a = attn.transpose(1, 2).reshape(b * m, 1, q, nl * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1)             # (B*M, D, Q)
    return out.view(b, m * d, q).transpose(1, 2).contiguous()


def torch_bytes(b, q, m, d, shapes, p):
    """Rough bytes torch holds for forward+backward: the per-level samples (B*M, D, Q, P), their stack,
    the weighted product and the autograd copies (~4x), plus inputs and gradients."""
    sampled = 4 * b * m * d * q * p * len(shapes)
    return 4 * sampled + 8 * 4 * (b * sum(h * w for h, w in shapes) * m * d + b * q * m * len(shapes) * p * 3)


def torch_calls(data, shapes):
    """(fwd, fwd_bwd) zero-argument callables; fwd_bwd returns (out, d_value, d_loc, d_attn)."""
    import torch
    value, loc, attn, cot = (torch.from_numpy(x) for x in data)

    def fwd():
        with torch.no_grad():
            return torch_msda(value, shapes, loc, attn)

    leaves = [x.clone().requires_grad_(True) for x in (value, loc, attn)]

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        out = torch_msda(leaves[0], shapes, leaves[1], leaves[2])
        out.backward(cot)
        return (out.detach(),) + tuple(x.grad for x in leaves)

    return fwd, fwd_bwd


# ---------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------

def jax_impls(chunk):
    """{name: fn(value, shapes, loc, attn)} of the JAX implementations compared."""
    return {'production': lambda *a: da.ms_deform_attn(*a, query_chunk=chunk),
            'reference': da.ms_deform_attn_reference}


def compile_pair(fn, shapes, b, q, m, d, p):
    """{'fwd': (compiled, seconds), 'fwd_bwd': ...} of ``fn(value, shapes, loc, attn)`` from abstract
    shapes; fwd_bwd returns (out, d_value, d_loc, d_attn)."""
    nl, s = len(shapes), sum(h * w for h, w in shapes)
    spec = (jax.ShapeDtypeStruct((b, s, m, d), jnp.float32),
            jax.ShapeDtypeStruct((b, q, m, nl, p, 2), jnp.float32),
            jax.ShapeDtypeStruct((b, q, m, nl, p), jnp.float32))
    cot = jax.ShapeDtypeStruct((b, q, m * d), jnp.float32)
    core = lambda v, l, a: fn(v, shapes, l, a)                              # noqa: E731

    def fwd_bwd(v, l, a, g):
        out, pull = jax.vjp(core, v, l, a)
        return (out,) + pull(g)

    out = {}
    for name, f, args in (('fwd', jax.jit(core), spec), ('fwd_bwd', jax.jit(fwd_bwd), spec + (cot,))):
        t0 = time.perf_counter()
        compiled = f.lower(*args).compile()
        out[name] = (compiled, round(time.perf_counter() - t0, 2))
    return out


# ---------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------

def run_shape(name, args, use_torch, limit):
    b, q_full, m, d, shapes, p = SHAPES[name]
    q = min(q_full, args.queries) if args.queries else q_full
    nl, s = len(shapes), sum(h * w for h, w in shapes)
    row_bytes = m * nl * p * 4 * d * 4
    chunk = args.query_chunk or da.choose_chunk(
        b * q, row_bytes, da.default_chunk_bytes() if args.chunk_bytes is None else args.chunk_bytes)
    entry = dict(batch=b, queries=q, queries_full=q_full, subsampled=q != q_full, heads=m, head_dims=d,
                 levels=[list(hw) for hw in shapes], points=p,
                 inputs_bytes=4 * (b * s * m * d + b * q * m * nl * p * 3 + b * q * m * d),
                 gathered_bytes=4 * b * q * m * nl * p * 4 * d,
                 chunk_rows=chunk, chunks=-(-b * q // chunk), chunk_gathered_bytes=chunk * row_bytes)
    print(f'{name}: batch {b}, queries {q}' + (f' (of {q_full}: --queries)' if q != q_full else '') +
          f', heads {m} x {d}, levels {shapes}, points {p}; inputs {_gb(entry["inputs_bytes"]):.3f} GB, '
          f'all taps {_gb(entry["gathered_bytes"]):.3f} GB; chunk {chunk} of {b * q} rows '
          f'({entry["chunks"]} chunks)', flush=True)

    compiled, entry['memory'], entry['compile_s'], skipped = {}, {}, {}, {}
    for impl, fn in jax_impls(chunk).items():
        pair = compile_pair(fn, shapes, b, q, m, d, p)
        compiled[impl] = {k: c for k, (c, _) in pair.items()}
        entry['memory'][impl] = {k: benchmark.memory(c) for k, (c, _) in pair.items()}
        entry['compile_s'][impl] = {k: t for k, (_, t) in pair.items()}
        peak = max(mem['peak'] for mem in entry['memory'][impl].values())
        if peak > limit:
            skipped[impl] = f'compiled peak {_gb(peak):.1f} GB > half of memory'
    if use_torch and torch_bytes(b, q, m, d, shapes, p) > limit:
        skipped['torch'] = f'needs ~{_gb(torch_bytes(b, q, m, d, shapes, p)):.1f} GB > half of memory'
    entry['skipped'] = skipped
    if args.compile_only:
        return entry

    data = make_inputs(b, q, m, d, shapes, p, seed=args.seed)
    jdata = [jnp.asarray(x) for x in data]
    calls, results = {}, {}
    for impl, pair in compiled.items():
        if impl in skipped:
            continue
        fwd, fwd_bwd = pair['fwd'], pair['fwd_bwd']
        calls[f'{impl}/fwd'] = lambda f=fwd: jax.block_until_ready(f(*jdata[:3]))
        calls[f'{impl}/fwd_bwd'] = lambda f=fwd_bwd: jax.block_until_ready(f(*jdata))
        results[impl] = [np.asarray(x) for x in calls[f'{impl}/fwd_bwd']()]
    if use_torch and 'torch' not in skipped:
        fwd, fwd_bwd = torch_calls(data, shapes)
        calls['torch/fwd'], calls['torch/fwd_bwd'] = fwd, fwd_bwd
        results['torch'] = [x.numpy() for x in fwd_bwd()]

    stats = benchmark.interleaved(calls, warmup=args.warmup, iters=args.iters)
    entry['times'] = {impl: {ps: stats.get(f'{impl}/{ps}') for ps in PASSES} for impl in IMPLS
                      if f'{impl}/fwd' in stats}
    fields = ('out',) + GRADS

    def errors(against):
        if against not in results:
            return None
        return {impl: dict(zip(fields, (rel_l2(g, r) for g, r in zip(res, results[against]))))
                for impl, res in results.items() if impl != against}

    entry['errors_vs_torch'] = errors('torch')
    entry['errors_vs_reference'] = errors('reference')
    if 'torch' in entry['times']:
        entry['ratio_vs_torch'] = {
            impl: {ps: round(t[ps]['median_ms'] / entry['times']['torch'][ps]['median_ms'], 3) for ps in PASSES}
            for impl, t in entry['times'].items() if impl != 'torch'}
    else:
        entry['ratio_vs_torch'] = None
    return entry


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def print_table(result):
    mb = lambda n: f'{n / 2**20:9.1f}'                                     # noqa: E731
    print(f'\n{"shape":10s} {"impl":10s} {"fwd ms [p25-p75]":>22s} {"x torch":>7s} {"fwd+bwd ms [p25-p75]":>24s} '
          f'{"x torch":>7s}  {"rel L2 vs torch: out / d_value / d_loc / d_attn":48s} {"temp MiB fwd / fb":>19s}')
    for name, e in result['shapes'].items():
        for impl in IMPLS:
            mem = e['memory'].get(impl)
            times = (e.get('times') or {}).get(impl)
            if mem is None and times is None and impl not in e['skipped']:
                continue
            line = f'{name:10s} {impl:10s}'
            if times:
                for ps in PASSES:
                    t = times[ps]
                    ratio = (e.get('ratio_vs_torch') or {}).get(impl, {}).get(ps)
                    spread = f'{t["median_ms"]:9.1f} [{t["p25_ms"]:.1f}-{t["p75_ms"]:.1f}]'
                    line += f' {spread:>22s} {("%.2f" % ratio) if ratio else "-":>7s}' if ps == 'fwd' else \
                        f' {spread:>24s} {("%.2f" % ratio) if ratio else "-":>7s}'
            else:
                why = e['skipped'].get(impl, 'compile only')
                line += f' {why[:55]:55s}'
            err = (e.get('errors_vs_torch') or {}).get(impl)
            line += '  ' + (' / '.join(f'{err[k]:.1e}' for k in ('out',) + GRADS) if err else '-').ljust(48)
            if mem:
                line += f' {mb(mem["fwd"]["temp"])} / {mb(mem["fwd_bwd"]["temp"])}'
            print(line)
    th = result['threads']
    print(f'threads: JAX (XLA:CPU) {th["jax_cores"]} cores, torch {th["torch"]}; load average '
          f'{result["load_average"]["start"]} -> {result["load_average"]["end"]}')


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def make_parser():
    """The command line's options (``run_shape`` reads its ``args`` from them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', choices=sorted(SHAPES), default=['tiny_sca', 'tiny_tsa'])
    parser.add_argument('--queries', type=int, default=None, help='subsample each shape to at most N queries')
    parser.add_argument('--compile-only', action='store_true', help='memory_analysis only, no execution')
    parser.add_argument('--chunk-bytes', type=int, default=None, help='gathered bytes per chunk (default: backend)')
    parser.add_argument('--query-chunk', type=int, default=None, help='rows (batch*query) per chunk; overrides bytes')
    parser.add_argument('--iters', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=None,
                        help='pin to N cores before JAX starts, torch threads = N (default: all allowed cores)')
    parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
    parser.add_argument('--out-dir', default=None, help='default experiments/results')
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)

    if args.threads and hasattr(os, 'sched_setaffinity'):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:args.threads])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    use_torch, torch_note = False, 'not run (--compile-only)' if args.compile_only else None
    if not args.compile_only:
        if args.no_torch:
            torch_note = 'skipped (--no-torch)'
        elif not torch_available():
            torch_note = 'skipped: torch is not installed'
            print('torch is not installed: the PyTorch reference, ratios and errors vs torch are skipped')
        else:
            import torch
            torch.set_num_threads(cores)
            use_torch = True
    threads = dict(jax_cores=cores, torch=None)
    if use_torch:
        import torch
        threads['torch'] = torch.get_num_threads()
    print(f'backend {jax.default_backend()}, {cores} cores; torch: {torch_note or "threads %d" % threads["torch"]}')

    limit = (benchmark.physical_memory_bytes() or 1 << 62) // 2
    load_start = [round(x, 2) for x in os.getloadavg()]
    shapes = {name: run_shape(name, args, use_torch, limit) for name in args.shapes}
    result = dict(shapes=shapes, threads=threads, torch=torch_note or 'ran', compile_only=args.compile_only,
                  queries_arg=args.queries, iters=args.iters, warmup=args.warmup,
                  chunk_bytes=args.chunk_bytes or da.default_chunk_bytes(),
                  load_average=dict(start=load_start, end=[round(x, 2) for x in os.getloadavg()]))
    print_table(result)
    benchmark.write_result('bench_msda', result, **({} if args.out_dir is None else dict(out_dir=args.out_dir)),
                           echo=False)
    return result


if __name__ == '__main__':
    main()
