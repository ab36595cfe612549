"""Per-sample work on the ``data`` axis (``fd3d_jax.data_parallel``): deformable attention and the matcher on 8
simulated devices compute the one-device numbers, and their compiled programs divide the work (read with
``experiments/bench_partition.hlo_stats``); the same functions called without it gather the global batch, so the
checks below can fail. The whole train steps: ``tests/experiments/test_bench_partition.py``."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from fd3d_jax import data_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from experiments.bench_partition import hlo_stats
    from fd3d_jax.data_parallel import on_data_shards
    from fd3d_jax.detection import matching
    from fd3d_jax.models import deformable_attention as msda
    from fd3d_jax.train import mesh as mesh_lib
    from fd3d_jax.train.train_step import under_mesh

    shapes = ((8, 10), (4, 5))
    S = sum(h * w for h, w in shapes)
    rng = np.random.default_rng(0)
    B, Q, M, L, Pt, D = 8, 96, 2, 2, 3, 4
    value = rng.normal(size=(B, S, M, D)).astype(np.float32)
    loc = rng.uniform(-0.1, 1.1, size=(B, Q, M, L, Pt, 2)).astype(np.float32)
    attn = rng.uniform(size=(B, Q, M, L, Pt)).astype(np.float32)
    # sparse-SCA style rows (value = B x 2 cameras): row (b, q) reads camera q % 2 of sample b, value element 2b + q % 2
    cams = rng.normal(size=(2 * B, S, M, D)).astype(np.float32)
    index = (2 * np.arange(B)[:, None] + np.arange(Q)[None] % 2).astype(np.int32)
    cot = rng.normal(size=(B, Q, M * D)).astype(np.float32)

    def loss(core, value, loc, attn, index=None):
        return jnp.sum(core(value, shapes, loc, attn, query_chunk=16, value_index=index) * cot)

    sharded = lambda *a, **k: msda.ms_deform_attn(*a, **k)
    def unsharded(value, shapes, loc, attn, query_chunk, value_index):   # the core without on_data_shards
        return msda._ms_deform_attn_chunked(shapes, query_chunk, value, loc, attn, value_index).astype(value.dtype)

    out = {}
    for name, core in (('sharded', sharded), ('unsharded', unsharded)):
        for use_index in (False, True):
            fn = jax.value_and_grad(lambda v, l, a, i: loss(core, v, l, a, i), argnums=(0, 1, 2))
            args = (cams, loc, attn, index) if use_index else (value, loc, attn, None)
            for n in (1, 2, 8):
                mesh = mesh_lib.make_mesh(jax.devices()[:n])
                dat, rep = mesh_lib.data_sharded(mesh), mesh_lib.replicated(mesh)
                jitted = jax.jit(under_mesh(fn, mesh), in_shardings=(dat, dat, dat, dat if use_index else rep))
                compiled = jitted.lower(*args).compile()
                val, grads = compiled(*args)
                key = f'{name}/{"index" if use_index else "plain"}/{n}'
                out[key] = dict(stats=hlo_stats(compiled), value=float(val),
                                grads=[np.asarray(g).ravel()[::97].tolist() for g in grads])

    # the matcher: (layers, batch, queries, gt) costs, some GT padded, computed in the step (x 2) as in training;
    # 'large': 6 layers at the full configs' 900 x 256, where one scipy callback per CPU device hung (each waits for
    # CPU device 0, itself busy in its own callback)
    cost = rng.normal(size=(3, B, 12, 5)).astype(np.float32)
    mask = rng.uniform(size=(B, 5)) < 0.7
    large_cost = rng.normal(size=(6, B, 900, 256)).astype(np.float32)
    large_mask = np.arange(256)[None].repeat(B, 0) < 100
    for matcher in ('scipy', 'jax', 'auto', 'scipy_large'):
        args = (large_cost, large_mask) if matcher == 'scipy_large' else (cost, mask)
        for n in (1, 8):
            mesh = mesh_lib.make_mesh(jax.devices()[:n])
            spec = NamedSharding(mesh, P(None, 'data'))
            name = matcher.removesuffix('_large')
            fn = jax.jit(under_mesh(lambda c, m: matching.assign(c * 2.0, m, name), mesh),
                         in_shardings=(spec, mesh_lib.data_sharded(mesh)))
            compiled = fn.lower(*args).compile()
            out[f'match/{matcher}/{n}'] = dict(stats=hlo_stats(compiled), assigned=np.asarray(compiled(*args)).tolist())
    print(json.dumps(out))
''')


def run_script():
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    res = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_deformable_attention_and_matching_run_per_device_and_give_the_one_device_numbers():
    out = run_script()
    for use_index in ('plain', 'index'):
        one = out[f'sharded/{use_index}/1']
        for n in (2, 8):
            many = out[f'sharded/{use_index}/{n}']
            # the same value and gradients (value_index made shard-local: a wrong offset reads other samples)
            np.testing.assert_allclose(many['value'], one['value'], rtol=1e-5)
            for grad_many, grad_one in zip(many['grads'], one['grads']):
                np.testing.assert_allclose(grad_many, grad_one, rtol=1e-5, atol=1e-5)
            stats = many['stats']
            assert stats['collectives']['all-gather']['count'] == 0, (use_index, n, stats['collectives'])
            assert stats['collectives']['all-reduce']['bytes'] <= 8, (use_index, n, stats['collectives'])  # the sum
            # one device's loops: 96 rows / 16 per chunk = 6 chunks on one device, 6 / n on each of n
            assert stats['loop_trip_max'] <= one['stats']['loop_trip_max'] // n or stats['loop_trip_max'] <= 4
            assert stats['temp_bytes'] <= 1.05 * one['stats']['temp_bytes']   # here the chunks' buffers dominate
        # the control: the same core without on_data_shards loops over the global batch on every device
        plain = out[f'unsharded/{use_index}/8']
        np.testing.assert_allclose(plain['value'], one['value'], rtol=1e-5)
        gathered = plain['stats']['collectives']['all-gather']['count'] + plain['stats']['collectives'][
            'all-reduce']['count']
        assert gathered > 0 or plain['stats']['loop_trip_max'] > out[f'sharded/{use_index}/8']['stats']['loop_trip_max']
    for matcher in ('scipy', 'jax', 'auto', 'scipy_large'):
        one, many = out[f'match/{matcher}/1'], out[f'match/{matcher}/8']
        assert many['assigned'] == one['assigned'], matcher
    for matcher in ('jax', 'auto'):   # in the graph, per device: no collective ('auto' on a CPU mesh is 'jax')
        stats = out[f'match/{matcher}/8']['stats']
        assert stats['collectives']['all-gather']['count'] == 0, (matcher, stats['collectives'])
        assert stats['collectives']['all-reduce']['count'] == 0, (matcher, stats['collectives'])
        assert stats['host_callbacks'] == 0, matcher
    # scipy on a CPU mesh: one callback on the whole batch (per-device callbacks hang there); on one device 'auto'
    # is scipy
    assert out['match/scipy/8']['stats']['host_callbacks'] == 1 == out['match/auto/1']['stats']['host_callbacks']


def test_on_data_shards_falls_back_to_the_whole_arrays_without_a_mesh_or_with_an_odd_batch():
    calls = []

    def per_sample(x):
        calls.append(x.shape)
        return x * 2

    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(data_parallel.on_data_shards(per_sample, x), x * 2)   # no mesh: called as is
    assert calls == [(3, 2)] and data_parallel.data_axis_size() == 1 and data_parallel.shard_index() == 0
    mesh = jax.sharding.AbstractMesh((2,), ('data',))
    with jax.sharding.use_abstract_mesh(mesh):
        assert data_parallel.data_axis_size() == 2
        jax.eval_shape(lambda v: data_parallel.on_data_shards(per_sample, v), x)   # 3 rows do not split in 2
    assert calls[-1] == (3, 2)
    assert data_parallel._spec(2) == P(None, None, 'data') and data_parallel._spec(None) == P()
