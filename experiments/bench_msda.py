"""MSDA core benchmark: the materialising reference vs the chunked production core, side by side.

    python experiments/bench_msda.py --shape tiny_sca
    python experiments/bench_msda.py --shape base_sca --compile-only

For each implementation it prints XLA's compiled buffer sizes (``memory_analysis()``: temp,
argument, output bytes) for the forward and for forward+backward (one VJP giving d_value,
d_locations, d_weights), and, unless ``--compile-only``, the median wall time. "inputs" is the
compulsory data: value + locations + weights + output. Runs are skipped (not compiled results) when
the compiled buffers would not fit in half of this machine's memory.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.models import deformable_attention as da

# batch, queries, heads, head dims, levels, points
SHAPES = {
    'tiny_sca': (6, 2500, 8, 32, ((15, 25),), 8),        # 6 cameras x dense 50x50 BEV, C5 of 480x800
    'tiny_tsa': (2, 2500, 8, 32, ((50, 50),), 4),        # queue of 2 (prev, cur) over the 50x50 BEV
    'base_sca': (6, 40000, 8, 32, ((116, 200), (58, 100), (29, 50), (15, 25)), 8),  # dense 200x200 BEV
    'base_tsa': (2, 40000, 8, 32, ((200, 200),), 4),
}


def _gb(n):
    return f'{n / 1e9:8.3f}'


def physical_memory():
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError):
        return 1 << 62


def compile_pair(fn, shapes, b, q, m, d, p):
    """Compiled forward and forward+backward of ``fn(value, shapes, loc, attn)``."""
    nl, s = len(shapes), sum(h * w for h, w in shapes)
    spec = (jax.ShapeDtypeStruct((b, s, m, d), jnp.float32),
            jax.ShapeDtypeStruct((b, q, m, nl, p, 2), jnp.float32),
            jax.ShapeDtypeStruct((b, q, m, nl, p), jnp.float32))
    cot = jax.ShapeDtypeStruct((b, q, m * d), jnp.float32)
    core = lambda v, l, a: fn(v, shapes, l, a)                            # noqa: E731
    fwd = jax.jit(core)
    fwd_bwd = jax.jit(lambda v, l, a, g: jax.vjp(core, v, l, a)[1](g))
    out = {}
    for name, f, args in (('fwd', fwd, spec), ('fwd+bwd', fwd_bwd, spec + (cot,))):
        t0 = time.perf_counter()
        compiled = f.lower(*args).compile()
        out[name] = (compiled, compiled.memory_analysis(), time.perf_counter() - t0)
    return out


def median_ms(compiled, args, warmup, iters):
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shape', choices=sorted(SHAPES), default='tiny_sca')
    parser.add_argument('--compile-only', action='store_true', help='memory_analysis only, no execution')
    parser.add_argument('--chunk-bytes', type=int, default=None, help='gathered bytes per chunk (default: backend)')
    parser.add_argument('--query-chunk', type=int, default=None, help='rows (batch*query) per chunk; overrides bytes')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    args = parser.parse_args()

    b, q, m, d, shapes, p = SHAPES[args.shape]
    nl, s = len(shapes), sum(h * w for h, w in shapes)
    inputs = 4 * (b * s * m * d + b * q * m * nl * p * 3 + b * q * m * d)
    gathered = 4 * b * q * m * nl * p * 4 * d
    row_bytes = m * nl * p * 4 * d * 4
    chunk_bytes = da.default_chunk_bytes() if args.chunk_bytes is None else args.chunk_bytes
    chunk = args.query_chunk or da.choose_chunk(b * q, row_bytes, chunk_bytes)
    print(f'{args.shape}: batch {b}, queries {q}, heads {m} x {d}, levels {shapes}, points {p}; '
          f'backend {jax.default_backend()}')
    print(f'  inputs (value + locations + weights + output) {inputs / 1e9:.3f} GB; all gathered corners '
          f'{gathered / 1e9:.3f} GB; chunk {chunk} of {b * q} rows ({-(-b * q // chunk)} chunks, '
          f'{chunk * row_bytes / 2**20:.1f} MiB gathered each)')

    impls = {'reference': da.ms_deform_attn_reference,
             'chunked': lambda *a: da.ms_deform_attn(*a, query_chunk=chunk)}
    compiled = {name: compile_pair(fn, shapes, b, q, m, d, p) for name, fn in impls.items()}

    header = (f'  {"impl":10s} {"pass":8s} {"temp GB":>8s} {"arg GB":>8s} {"out GB":>8s} {"temp/inputs":>11s} '
              f'{"compile s":>9s}')
    if not args.compile_only:
        header += f' {"median ms":>10s}'
    print(header)
    rng = np.random.default_rng(0)
    data = None
    if not args.compile_only:
        data = (jnp.asarray(rng.normal(size=(b, s, m, d)), jnp.float32),
                jnp.asarray(rng.uniform(-0.05, 1.05, size=(b, q, m, nl, p, 2)), jnp.float32),
                jnp.asarray(rng.dirichlet(np.ones(nl * p), size=(b, q, m)).reshape(b, q, m, nl, p), jnp.float32),
                jnp.asarray(rng.normal(size=(b, q, m * d)), jnp.float32))
    limit = physical_memory() // 2
    for name, passes in compiled.items():
        for pass_name, (exe, mem, compile_s) in passes.items():
            line = (f'  {name:10s} {pass_name:8s} {_gb(mem.temp_size_in_bytes)} {_gb(mem.argument_size_in_bytes)} '
                    f'{_gb(mem.output_size_in_bytes)} {mem.temp_size_in_bytes / inputs:11.2f} {compile_s:9.2f}')
            if not args.compile_only:
                total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                if total > limit:
                    line += f' {"skipped":>10s} (needs {total / 1e9:.1f} GB)'
                else:
                    run_args = data[:3] if pass_name == 'fwd' else data
                    line += f' {median_ms(exe, run_args, args.warmup, args.iters):10.1f}'
            print(line, flush=True)


if __name__ == '__main__':
    main()
