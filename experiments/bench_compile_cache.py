"""What JAX's persistent compilation cache saves on a train step, per Hungarian matcher.

    python experiments/bench_compile_cache.py [--config configs/fd3d_bevformer_base_to_tiny.py:demo]

For ``loss.matcher`` in ``scipy`` and ``jax``: a fresh cache folder, then two fresh processes, each compiling
the config's train step from abstract shapes (``loop.abstract_train_step``, as ``bench_train_step.py
--compile-only``) with ``JAX_COMPILATION_CACHE_DIR`` set: the first (cold) fills the cache, the second
(warm) can read it. Prints and writes the trace/lower/compile seconds of both, the cache entries the train
step left, and warm / cold. JAX does not write executables that call back into Python to the cache, so the
step with the scipy matcher (a ``jax.pure_callback``) recompiles in every process; the in-graph matcher's
step is cached.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from experiments import benchmark
from experiments.bench_train_step import aot_compile
from fd3d_jax.distill import make_distiller
from fd3d_jax.train import loop

MATCHERS = ('scipy', 'jax')
MARK = 'compile_seconds='


def compile_step(spec, matcher):
    """Child: compile ``spec``'s train step (FD3D for a pair config) with ``matcher``; prints the seconds."""
    _, config = benchmark.load_config(spec)
    config.loss.matcher = matcher
    jitted, step_args = loop.abstract_train_step(config, make_distiller(config))   # None without an expert
    _, seconds = aot_compile(jitted, *step_args)
    print(MARK + json.dumps(seconds), flush=True)


def cache_entries(folder):
    """The cache files of train steps (JAX also caches the small jits of initialisation)."""
    return sorted(name for name in os.listdir(folder) if 'train_step' in name)


def run_child(spec, matcher, cache_dir):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
    proc = subprocess.run([sys.executable, '-m', 'experiments.bench_compile_cache', '--config', spec,
                           '--child', matcher], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f'error: the compile of {spec} (matcher {matcher}) failed:\n{proc.stderr[-3000:]}')
    return json.loads(lines[-1][len(MARK):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/fd3d_bevformer_base_to_tiny.py:demo', help='config[:arg]')
    parser.add_argument('--child', choices=MATCHERS, help=argparse.SUPPRESS)
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--name', default='', help='result name (default bench_compile_cache_CONFIG_ARG)')
    args = parser.parse_args(argv)
    if args.child:
        return compile_step(args.config, args.child)
    result = {}
    for matcher in MATCHERS:
        with tempfile.TemporaryDirectory(prefix='jax_cache_') as cache_dir:
            cold = run_child(args.config, matcher, cache_dir)
            entries = cache_entries(cache_dir)
            warm = run_child(args.config, matcher, cache_dir)
        result[matcher] = dict(cold_s=cold, warm_s=warm, train_step_cache_entries=len(entries),
                               warm_over_cold=round(warm['total'] / cold['total'], 3))
        print(f"matcher {matcher}: cold {cold['total']} s, warm {warm['total']} s (x{result[matcher]['warm_over_cold']}),"
              f' {len(entries)} train-step cache entries', flush=True)
    slug = benchmark.config_slug(args.config)
    return benchmark.write_result(args.name or f'bench_compile_cache_{slug}', dict(config=args.config, **result),
                                  args.out_dir)


if __name__ == '__main__':
    main()
