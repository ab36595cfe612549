"""Does data parallelism divide the work? The compiled train and eval steps on N devices against one device.

    python experiments/bench_partition.py [--configs bevformer_tiny:toy detr3d_r50:toy
        fd3d_bevformer_base_to_tiny:toy] [--devices 8] [--no-eval] [--name NAME]

For each config, from abstract shapes only (``loop.abstract_train_step``; nothing initialised or run), the train
step (and the eval step) is compiled for 1 device with a batch of 1 and for N devices with a batch of N (one
sample per device either way), and read from the compiled program (``hlo_stats``):

* collectives (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute): count and result bytes;
* ``while`` loops: every known trip count (their sum and maximum), and the loops whose trip count is data
  dependent (the in-graph matcher's);
* host callbacks (the scipy matcher) and XLA's temporaries per device (``memory_analysis``).

A data-parallel step runs the same per-device program whatever N is: no trip count grows with N, no all-gather
moves activations (the gradient all-reduce is the one collective it needs, plus reductions of scalars and
per-channel statistics), and per-device temporaries stay where one device has them. ``verdict`` checks exactly
that (``check``). XLA's SPMD partitioner is the same on every backend, so simulated CPU devices
(``--xla_force_host_platform_device_count``, set here before JAX starts) show what a GPU or TPU host compiles.

Writes ``experiments/results/bench_partition.json`` (``--name``), and prints one line per config and step.
"""
import argparse
import re

from experiments import simulated_devices

if __name__ == '__main__':
    simulated_devices.request(8)   # before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import benchmark  # noqa: E402
from fd3d_jax.distill import make_distiller  # noqa: E402
from fd3d_jax.models import build  # noqa: E402
from fd3d_jax.models.inputs import batch_spec  # noqa: E402
from fd3d_jax.train import loop, mesh as mesh_lib  # noqa: E402
from fd3d_jax.train.train_step import compile_eval_step, make_eval_step  # noqa: E402

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
          'f64': 8, 's64': 8, 'u64': 8}
_SHAPE = re.compile(r'\b(pred|[fsu]\d+|bf16)\[([\d,]*)\]')
# An instruction line: "%name = <result type> <opcode>(<operands>), attributes".
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%\S+ = (.*?) ([a-z][a-z0-9-]*)\(')
# Loop sizes below this (elements of the largest result) are scalar / per-channel reductions, not activations.
ACTIVATION_ELEMENTS = 4096


def _result_bytes(result_type):
    """(bytes, elements of the largest array) of an HLO result type (an array or a tuple of arrays)."""
    total, largest = 0, 0
    for dtype, dims in _SHAPE.findall(result_type):
        elements = int(np.prod([int(d) for d in dims.split(',') if d])) if dims else 1
        total += elements * _BYTES.get(dtype, 4)
        largest = max(largest, elements)
    return total, largest


def hlo_stats(compiled):
    """What a compiled program does across devices (module docstring), from ``compiled.as_text()``."""
    text = compiled.as_text()
    collectives = {op: dict(count=0, bytes=0, activation_count=0, activation_bytes=0) for op in COLLECTIVES}
    trips, dynamic_loops, callbacks = [], 0, 0
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        result_type, opcode = match.groups()
        op = opcode.removesuffix('-start')
        if op in collectives:
            size, largest = _result_bytes(result_type)
            entry = collectives[op]
            entry['count'] += 1
            entry['bytes'] += size
            if op != 'all-reduce' and largest >= ACTIVATION_ELEMENTS:
                entry['activation_count'] += 1
                entry['activation_bytes'] += size
        elif opcode == 'while':
            trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            if trip:
                trips.append(int(trip.group(1)))
            else:
                dynamic_loops += 1
        elif opcode == 'custom-call' and 'callback' in line:
            callbacks += 1
    memory = benchmark.memory(compiled)
    return dict(collectives=collectives, loop_trips=sorted(trips), loop_trip_sum=int(sum(trips)),
                loop_trip_max=max(trips, default=0), dynamic_loops=dynamic_loops, host_callbacks=callbacks,
                temp_bytes=memory['temp'], peak_bytes=memory['peak'])


def tree_bytes(tree):
    return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def check(one, many, reduced_bytes=0, temp_tolerance=0.05):
    """The reasons (a list of strings; empty when it divides the work) why the N-device program ``many`` is not
    the one-device program ``one`` run on each device's own samples. ``reduced_bytes``: what the step must
    all-reduce (the gradient: the trainable params' bytes); up to 1 MiB more is allowed for scalars and
    per-channel statistics."""
    problems = []
    reduced = many['collectives']['all-reduce']['bytes']
    if reduced > reduced_bytes + 2**20:
        problems.append(f'all-reduces of {reduced / 2**20:.2f} MiB, more than the gradient '
                        f'({reduced_bytes / 2**20:.2f} MiB) + 1 MiB')
    if many['loop_trip_max'] > one['loop_trip_max'] or many['loop_trip_sum'] > one['loop_trip_sum']:
        problems.append(f'loop trips grow with the devices: max {one["loop_trip_max"]} -> {many["loop_trip_max"]}, '
                        f'sum {one["loop_trip_sum"]} -> {many["loop_trip_sum"]}')
    moved = {op: entry['activation_count'] for op, entry in many['collectives'].items() if entry['activation_count']}
    if moved:
        problems.append(f'collectives of activations: {moved}')
    if many['temp_bytes'] > one['temp_bytes'] * (1 + temp_tolerance):
        problems.append(f'temporaries per device {one["temp_bytes"] / 2**20:.2f} -> {many["temp_bytes"] / 2**20:.2f} '
                        f'MiB (> {temp_tolerance:.0%} more)')
    return problems


def eval_parts(config, distiller, mesh):
    """(jitted eval step, abstract args) at one sample per device: the apprentice's (a detector config), or the
    expert's on the apprentice's batch (a distillation config: what ``loop.evaluate_expert`` compiles)."""
    size = mesh.devices.size
    if distiller is None:
        model, model_config, input_fn, params = build(config.model), config, None, None
    else:
        model, input_fn = distiller.expert, distiller.expert_batch
        model_config, params = config.copy_and_resolve_references(), distiller.expert_abstract_params
        model_config.model = distiller.expert_cfg
    batch = batch_spec(config, size, queue_length=1, expert_model=None if distiller is None else distiller.expert_cfg)
    if params is None:
        params = jax.eval_shape(lambda b: model.init({'params': jax.random.PRNGKey(0)}, b), batch)['params']
    prev = jax.ShapeDtypeStruct(model.carried_shape(size), np.float32)
    step = compile_eval_step(make_eval_step(model, model_config, input_fn), mesh)
    return step, (params, batch, prev)


def compile_stats(spec, num_devices, with_eval=True):
    """{'train': hlo_stats, 'eval': hlo_stats} of ``spec`` on the first ``num_devices`` devices, one sample each."""
    _, config = benchmark.load_config(spec)
    config.train.batch_size = num_devices
    distiller = make_distiller(config) if 'distill' in config else None
    mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
    step, args = loop.abstract_train_step(config, distiller, batch_size=num_devices, mesh=mesh)
    out = {'train': dict(hlo_stats(step.lower(*args).compile()), gradient_bytes=tree_bytes(args[0].params))}
    if with_eval:
        step, args = eval_parts(config, distiller, mesh)
        out['eval'] = dict(hlo_stats(step.lower(*args).compile()), gradient_bytes=0)
    return out


def compare(spec, num_devices, with_eval=True):
    """{step: {'one': stats, 'many': stats, 'problems': [...]}} for one config."""
    one, many = compile_stats(spec, 1, with_eval), compile_stats(spec, num_devices, with_eval)
    return {step: dict(one=one[step], many=many[step],
                       problems=check(one[step], many[step], many[step]['gradient_bytes'])) for step in one}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='+',
                        default=['bevformer_tiny:toy', 'detr3d_r50:toy', 'fd3d_bevformer_base_to_tiny:toy'])
    parser.add_argument('--devices', type=int, default=8)
    parser.add_argument('--no-eval', action='store_true', help='the train step only')
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--name', default='bench_partition')
    args = parser.parse_args(argv)
    if jax.device_count() < args.devices:
        parser.error(f'{args.devices} devices asked, {jax.device_count()} present (XLA_FLAGS is set by this script '
                     'only when it is run as a script)')
    results = {}
    for spec in args.configs:
        results[spec] = compare(spec, args.devices, not args.no_eval)
        for step, entry in results[spec].items():
            one, many = entry['one'], entry['many']
            gathers = many['collectives']['all-gather']
            print(f'{spec} {step}: 1 -> {args.devices} devices: loop trips sum {one["loop_trip_sum"]} -> '
                  f'{many["loop_trip_sum"]}, max {one["loop_trip_max"]} -> {many["loop_trip_max"]}; all-gathers '
                  f'{gathers["count"]} ({gathers["bytes"] / 2**20:.2f} MiB); all-reduces '
                  f'{many["collectives"]["all-reduce"]["count"]}; temporaries {one["temp_bytes"] / 2**20:.2f} -> '
                  f'{many["temp_bytes"] / 2**20:.2f} MiB; host callbacks {many["host_callbacks"]}; '
                  f'{"divides the work" if not entry["problems"] else "; ".join(entry["problems"])}', flush=True)
    path = benchmark.write_result(args.name, dict(devices=args.devices, configs=results), args.out_dir, echo=False)
    print(f'wrote {path}')
    return results


if __name__ == '__main__':
    main()
