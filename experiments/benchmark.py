"""Shared helpers of the benchmarks in ``experiments/bench_*.py``: wall-clock statistics, compiled
memory, the machine/versions record, and the JSON result files (``experiments/results/bench_*.json``).

Every benchmark measures what it compares in one run (ratios side by side, medians and spread), since
machines are noisy; nothing here asserts a speed.
"""
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

RESULTS_DIR = os.path.join('experiments', 'results')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_memory_bytes():
    """This machine's physical memory in bytes, or None when the OS does not say."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError):
        return None


def git_commit():
    """The checkout's commit (``+dirty`` with uncommitted changes to the code), or None outside git."""
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'fd3d_jax', 'configs'], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ('+dirty' if dirty else '')


def machine_info():
    """Where and with what a figure was measured (goes into every result file)."""
    devices = jax.devices()
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        cpu=_cpu_model(), cpu_count=os.cpu_count(),
        affinity=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
        memory_gb=None if physical_memory_bytes() is None else round(physical_memory_bytes() / 1e9, 1),
        backend=jax.default_backend(), devices=f'{len(devices)} x {devices[0].device_kind}',
        python=platform.python_version(), commit=git_commit(),
        versions={d: _version(d) for d in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'grain')})


def summarize_times(seconds):
    """Median and spread (min, quartiles, max) in milliseconds of a list of durations in seconds."""
    ms = 1e3 * np.asarray(seconds, np.float64)
    q25, q50, q75 = np.percentile(ms, [25, 50, 75])
    return dict(median_ms=round(float(q50), 3), p25_ms=round(float(q25), 3), p75_ms=round(float(q75), 3),
                min_ms=round(float(ms.min()), 3), max_ms=round(float(ms.max()), 3), n=int(ms.size))


def time_call(fn, *args, warmup=1, iters=5, sync=jax.block_until_ready):
    """Times ``sync(fn(*args))`` ``iters`` times after ``warmup`` untimed calls; ``summarize_times``."""
    for _ in range(warmup):
        sync(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn(*args))
        times.append(time.perf_counter() - t0)
    return summarize_times(times)


def interleaved(fns, warmup=1, iters=5, progress=False):
    """Times several zero-argument callables round-robin (``{name: fn}``, each returning when done), so
    that a slow spell of the machine hits all of them alike; ``{name: summarize_times}``. With ``progress``
    each call's seconds are printed as it ends (for calls that take minutes)."""
    times = {name: [] for name in fns}
    for round_ in range(-warmup, iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
            if round_ >= 0:
                times[name].append(seconds)
            if progress:
                print(f"    {'warmup' if round_ < 0 else f'iter {round_ + 1}/{iters}'} {name}: {seconds:.1f} s",
                      flush=True)
    return {name: summarize_times(t) for name, t in times.items()}


def memory(compiled):
    """XLA's buffer sizes of a compiled executable (bytes): arguments, outputs, temporaries, aliased,
    and peak = arguments + outputs + temporaries - aliased (the figure ``models/summary.py`` reports)."""
    m = compiled.memory_analysis()
    out = dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
               temp=int(m.temp_size_in_bytes), alias=int(m.alias_size_in_bytes))
    out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
    return out


def load_config(spec):
    """``NAME[:ARG]`` or ``configs/NAME.py[:ARG]`` -> (``'NAME:ARG'``, ``configs.NAME.get_config(ARG)``), ARG
    default ``full`` (a plain import: no command-line overrides; see ``parse_config_args`` for those)."""
    path, _, arg = spec.partition(':')
    name = os.path.basename(path).removesuffix('.py')
    return f'{name}:{arg or "full"}', importlib.import_module(f'configs.{name}').get_config(arg or 'full')


def config_slug(spec):
    """``configs/NAME.py:ARG`` -> ``NAME_ARG``, for result names."""
    return spec.rsplit('/', 1)[-1].replace('.py', '').replace(':', '_')


def parse_config_args(parser, argv, default_config):
    """``parser``'s (argparse) options plus the project's ``--config FILE[:ARG] --config.key=value``
    (absl, private flag values). Returns (args, config, name), name like ``bevformer_tiny:demo``."""
    args, rest = parser.parse_known_args(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', default_config, 'config file[:arg]', flag_values=fv,
                                    sys_argv=['bench'] + rest)
    fv(['bench'] + rest)
    path, _, arg = fv['config'].config_filename.partition(':')
    name = os.path.splitext(os.path.basename(path))[0]
    return args, fv.config, name + (':' + arg if arg else '')


def write_result(name, result, out_dir=RESULTS_DIR, echo=True):
    """Writes ``{machine, **result}`` to ``out_dir/NAME.json`` (and prints it); returns the path."""
    payload = dict(benchmark=name, machine=machine_info(), **result)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f'{name}.json')
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2, default=float)
        f.write('\n')
    os.replace(tmp, path)
    if echo:
        print(json.dumps(payload, default=float), flush=True)
    return path
