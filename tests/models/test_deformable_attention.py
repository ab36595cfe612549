"""MSDA core and module against a float64 numpy restatement of the mmcv CUDA kernel semantics
(``ms_deformable_im2col_bilinear`` / ``ms_deformable_im2col_gpu_kernel``), written from the kernel's
description, not from our JAX code."""
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd3d_jax.models import deformable_attention as da

SHAPES = ((6, 10), (3, 5), (2, 3))     # non-square, several levels


# ---------------------------------------------------------------------------------------------
# numpy oracle
# ---------------------------------------------------------------------------------------------

def np_bilinear(v, h, w):
    """Kernel's bilinear: v (H, W, D); (h, w) pixel coords; 4 corners, each outside corner is 0."""
    height, width = v.shape[:2]
    h_low, w_low = math.floor(h), math.floor(w)
    lh, lw = h - h_low, w - w_low
    out = np.zeros(v.shape[-1])
    for r, c, wt in ((h_low, w_low, (1 - lh) * (1 - lw)), (h_low, w_low + 1, (1 - lh) * lw),
                     (h_low + 1, w_low, lh * (1 - lw)), (h_low + 1, w_low + 1, lh * lw)):
        if 0 <= r < height and 0 <= c < width:
            out += wt * v[r, c]
    return out


def np_msda(value, shapes, loc, attn):
    """value (B, S, M, D), loc (B, Q, M, L, P, 2), attn (B, Q, M, L, P) -> (B, Q, M*D), float64."""
    value, loc, attn = (np.asarray(a, np.float64) for a in (value, loc, attn))
    b, q, m, nl, p, _ = loc.shape
    out = np.zeros((b, q, m, value.shape[-1]))
    start = 0
    for lvl, (hh, ww) in enumerate(shapes):
        v = value[:, start:start + hh * ww].reshape(b, hh, ww, m, -1)
        start += hh * ww
        for bi in range(b):
            for qi in range(q):
                for mi in range(m):
                    for pi in range(p):
                        x, y = loc[bi, qi, mi, lvl, pi]
                        h, w = y * hh - 0.5, x * ww - 0.5
                        if -1 < h < hh and -1 < w < ww:       # the kernel's early exit
                            out[bi, qi, mi] += attn[bi, qi, mi, lvl, pi] * np_bilinear(v[bi, :, :, mi], h, w)
    return out.reshape(b, q, -1)


def np_grid_init(m, nl, p):
    """mmcv ``init_weights``: thetas in float32, (cos, sin) / max|.|, repeated over levels, * (i + 1)."""
    thetas = np.arange(m, dtype=np.float32) * np.float32(2.0 * math.pi / m)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, nl, p, 1))
    for i in range(p):
        grid[:, :, i, :] *= i + 1
    return grid


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def make_inputs(seed, b=2, q=13, m=3, p=3, d=4, shapes=SHAPES, dtype=np.float32):
    """Random locations in [-0.1, 1.1] plus hand-placed edge, pixel-centre and far-away points."""
    rng = np.random.default_rng(seed)
    s = sum(h * w for h, w in shapes)
    value = rng.normal(size=(b, s, m, d))
    loc = rng.uniform(-0.1, 1.1, size=(b, q, m, len(shapes), p, 2))
    specials = []
    for hh, ww in shapes:
        specials += [
            (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0),               # image corners (edges)
            (0.5 / ww, 0.5 / hh), ((ww - 0.5) / ww, (hh - 0.5) / hh),    # first / last pixel centres
            (2.5 / ww, 1.5 / hh),                                         # interior pixel centre
            (-0.5 / ww + 1e-3, 0.5), (0.5, (hh + 0.5) / hh - 1e-3),       # just inside the skip test
            (-0.5 / ww, 0.5), (0.5, (hh + 0.5) / hh),                      # exactly on it (h, w = -1 / H)
            (-5.0, 0.3), (0.3, 7.0), (1e6, -1e6), (-3e4, 2e5),            # far out of range
        ]
    flat = loc.reshape(-1, 2)
    idx = rng.choice(len(flat), size=min(len(specials), len(flat)), replace=False)
    flat[idx] = np.asarray(specials[:len(idx)])
    loc = flat.reshape(loc.shape)
    attn = rng.uniform(size=(b, q, m, len(shapes), p))
    return value.astype(dtype), loc.astype(dtype), attn.astype(dtype)


IMPLS = {
    'reference': da.ms_deform_attn_reference,
    'chunked_default': da.ms_deform_attn,
    'chunked_5': lambda *a: da.ms_deform_attn(*a, query_chunk=5),      # 26 rows: 5 does not divide
    'chunked_bytes': lambda *a: da.ms_deform_attn(*a, chunk_bytes=1),  # 1 row per chunk
}


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_x64_process(test):
    """Runs ``test`` in a child pytest process started with ``JAX_ENABLE_X64=1``, not under the
    ``jax.enable_x64`` context in this process, so that no test changes the dtype config of a worker the
    rest of the suite shares (the toggle is global state; the child asserts float64, the parent float32)."""
    @functools.wraps(test)
    def wrapper():
        if jax.config.jax_enable_x64:
            return test()
        node = f'{os.path.relpath(__file__, REPO)}::{test.__name__}'
        proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:xdist', '-p', 'no:cacheprovider', node],
                              cwd=REPO, env=dict(os.environ, JAX_ENABLE_X64='1'), capture_output=True, text=True)
        assert proc.returncode == 0 and ' passed' in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]
    return wrapper


# ---------------------------------------------------------------------------------------------
# core
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('impl', sorted(IMPLS))
def test_core_matches_numpy_kernel(impl):
    value, loc, attn = make_inputs(0)
    expected = np_msda(value, SHAPES, loc, attn)
    got = jax.jit(IMPLS[impl], static_argnums=1)(value, SHAPES, loc, attn)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@in_x64_process
def test_core_matches_numpy_kernel_x64():
    assert jnp.zeros(()).dtype == jnp.float64
    value, loc, attn = make_inputs(1, b=3, q=5, m=2, p=2, dtype=np.float64)
    expected = np_msda(value, SHAPES, loc, attn)
    for impl in ('reference', 'chunked_5', 'chunked_default'):
        got = IMPLS[impl](jnp.asarray(value), SHAPES, jnp.asarray(loc), jnp.asarray(attn))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12, err_msg=impl)


def test_float64_tests_leave_this_process_float32():
    assert jnp.zeros(()).dtype == jnp.float32


@pytest.mark.parametrize('chunk', [1, 4, 7, 13, 25, 26, 1000])
def test_chunked_equals_reference_any_chunk(chunk):
    value, loc, attn = make_inputs(2)                                    # B*Q = 26 rows
    ref = da.ms_deform_attn_reference(value, SHAPES, loc, attn)
    got = da.ms_deform_attn(value, SHAPES, loc, attn, query_chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_single_level_batch_of_cameras():
    """SCA/TSA-style call: one level, large batch (cameras or queue folded into the batch)."""
    shapes = ((5, 7),)
    value, loc, attn = make_inputs(3, b=6, q=4, m=2, p=4, shapes=shapes)
    got = da.ms_deform_attn(value, shapes, loc, attn, query_chunk=5)
    np.testing.assert_allclose(np.asarray(got), np_msda(value, shapes, loc, attn), rtol=1e-5, atol=1e-5)


def test_choose_chunk():
    assert da.choose_chunk(240000, 1, 512) == 500         # largest divisor in [256, 512]
    assert da.choose_chunk(100, 1, 1000) == 100           # one chunk
    assert da.choose_chunk(101, 1, 10) == 10              # prime: balanced with padding (11 chunks)
    assert da.choose_chunk(7, 1000, 1) == 1


@in_x64_process
def test_gradients_match_finite_differences():
    """jax.grad of the chunked core (float64) vs central differences of the numpy kernel."""
    assert jnp.zeros(()).dtype == jnp.float64
    shapes = SHAPES[:2]
    rng = np.random.default_rng(4)
    b, q, m, p, d = 2, 3, 2, 2, 3
    value, _, attn = make_inputs(4, b=b, q=q, m=m, p=p, d=d, shapes=shapes, dtype=np.float64)
    # locations whose pixel coordinates are at least 0.1 px away from integers (the kernel's floor
    # makes the location gradient discontinuous there); some lie outside the map (zero gradient).
    loc = rng.uniform(-0.15, 1.15, size=(b, q, m, len(shapes), p, 2))
    size = np.array([[w, h] for h, w in shapes], np.float64)[:, None, :]   # (L, 1, 2)
    pix = loc * size - 0.5
    pix = np.floor(pix) + np.clip(pix - np.floor(pix), 0.1, 0.9)
    loc = (pix + 0.5) / size
    cot = rng.normal(size=(b, q, m * d))

    def loss(v, l, a):
        return jnp.sum(da.ms_deform_attn(v, shapes, l, a, query_chunk=4) * cot)

    def np_loss(v, l, a):
        return float(np.sum(np_msda(v, shapes, l, a) * cot))

    gv, gl, ga = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn))

    def fd(arr, which, eps):
        grad = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[i] += eps
            minus[i] -= eps
            args = [value, loc, attn]
            args[which] = plus
            lp = np_loss(*args)
            args[which] = minus
            grad[i] = (lp - np_loss(*args)) / (2 * eps)
        return grad

    np.testing.assert_allclose(np.asarray(gl), fd(loc, 1, 1e-6), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ga), fd(attn, 2, 1e-4), rtol=1e-8, atol=1e-8)
    assert np.abs(np.asarray(gl)).max() > 0.1
    # value: the loss is linear in it, so directional differences along random directions are exact.
    for _ in range(4):
        direction = rng.normal(size=value.shape)
        num = (np_loss(value + direction, loc, attn) - np_loss(value - direction, loc, attn)) / 2
        np.testing.assert_allclose(np.sum(np.asarray(gv) * direction), num, rtol=1e-9)


def test_chunked_gradients_equal_reference_gradients():
    value, loc, attn = make_inputs(5)
    cot = np.random.default_rng(5).normal(size=(2, 13, 12)).astype(np.float32)

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2))(value, loc, attn)

    for ref, got in zip(grads(lambda *a: da.ms_deform_attn_reference(a[0], SHAPES, *a[1:])),
                        grads(lambda *a: da.ms_deform_attn(a[0], SHAPES, *a[1:], query_chunk=5))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('chunk', [1, 7, 26])
def test_custom_vjp_equals_reference_autodiff(chunk):
    """The hand-written VJP of the chunked core (d_value scatter, bilinear d_loc / d_attn) against JAX
    autodiff of the reference, with edge, pixel-centre and far-away points (make_inputs); 26 rows:
    chunk 7 pads, 26 is a single chunk."""
    value, loc, attn = make_inputs(8)
    cot = np.random.default_rng(8).normal(size=(2, 13, 12)).astype(np.float32)

    def vjp(fn):
        out, pull = jax.vjp(lambda *a: fn(a[0], SHAPES, *a[1:]), value, loc, attn)
        return (out,) + pull(cot)

    ref = vjp(da.ms_deform_attn_reference)
    got = jax.jit(lambda: vjp(lambda *a: da.ms_deform_attn(*a, query_chunk=chunk)))()
    for name, r, g in zip(('out', 'd_value', 'd_loc', 'd_attn'), ref, got):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(np.asarray(got[2])).max() > 0.1                            # d_loc is not trivially 0


def test_custom_vjp_under_remat_and_partial_grads():
    """jit(grad(checkpoint(...))) with respect to one argument at a time equals the plain gradients
    (up to float32 rounding: jit fuses differently)."""
    value, loc, attn = make_inputs(9)
    cot = np.random.default_rng(9).normal(size=(2, 13, 12)).astype(np.float32)

    def loss(v, l, a):
        return jnp.sum(da.ms_deform_attn(v, SHAPES, l, a, query_chunk=5) * cot)

    full = jax.grad(loss, argnums=(0, 1, 2))(value, loc, attn)
    for i in range(3):
        part = jax.jit(jax.grad(jax.checkpoint(loss), argnums=i))(value, loc, attn)
        np.testing.assert_allclose(np.asarray(part), np.asarray(full[i]), rtol=1e-5, atol=1e-5)


def test_low_precision_inputs():
    """bfloat16 value / locations / weights: result and gradients in the input dtypes, computed in
    float32 (equal to the float32 core on the same rounded inputs up to the final rounding)."""
    value, loc, attn = make_inputs(10)
    v16, l16, a16 = (jnp.asarray(x, jnp.bfloat16) for x in (value, loc, attn))
    cot = jnp.asarray(np.random.default_rng(10).normal(size=(2, 13, 12)), jnp.bfloat16)
    out, pull = jax.vjp(lambda *a: da.ms_deform_attn(a[0], SHAPES, *a[1:], query_chunk=5), v16, l16, a16)
    grads = pull(cot)
    assert out.dtype == jnp.bfloat16 and [g.dtype for g in grads] == [jnp.bfloat16] * 3
    f32 = [x.astype(jnp.float32) for x in (v16, l16, a16)]
    out32, pull32 = jax.vjp(lambda *a: da.ms_deform_attn(a[0], SHAPES, *a[1:], query_chunk=5), *f32)
    for got, ref in zip((out,) + grads, (out32,) + pull32(cot.astype(jnp.float32))):
        ref = np.asarray(ref)
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_chunked_memory_far_below_reference():
    """Compile-only: fwd+bwd temp buffers of the chunked core vs the materialising reference."""
    b, q, m, d, p, shapes = 2, 2048, 8, 32, 4, ((32, 32), (16, 16))
    s = sum(h * w for h, w in shapes)
    args = (jax.ShapeDtypeStruct((b, s, m, d), jnp.float32),
            jax.ShapeDtypeStruct((b, q, m, len(shapes), p, 2), jnp.float32),
            jax.ShapeDtypeStruct((b, q, m, len(shapes), p), jnp.float32),
            jax.ShapeDtypeStruct((b, q, m * d), jnp.float32))

    def temp_bytes(fn):
        step = jax.jit(lambda v, l, a, g: jax.vjp(lambda *x: fn(x[0], shapes, *x[1:]), v, l, a)[1](g))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    gathered = b * q * m * len(shapes) * p * 4 * d * 4                     # 64 MiB
    naive = temp_bytes(da.ms_deform_attn_reference)
    chunked = temp_bytes(lambda *x: da.ms_deform_attn(*x, chunk_bytes=2 << 20))
    assert naive > gathered
    assert chunked * 10 < naive, (chunked, naive)
    assert chunked < 4 * (2 << 20), chunked                                  # a few chunks' worth


# ---------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------

def test_grid_init_bias_matches_mmcv():
    for m, nl, p in ((8, 4, 4), (8, 1, 8), (6, 2, 3)):
        bias = da.grid_init_bias(m, nl, p)
        assert bias.shape == (m, nl, p, 2) and bias.dtype == np.float32
        np.testing.assert_allclose(bias, np_grid_init(m, nl, p), rtol=1e-6, atol=1e-6)  # mmcv: float32 trig
    np.testing.assert_allclose(da.grid_init_bias(8, 1, 2)[:, 0, 1],
                               2 * np.array([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]]),
                               atol=1e-6)


def _module_setup(ref_levels):
    c, m, p = 12, 3, 2
    mod = da.MSDeformableAttention(embed_dims=c, num_heads=m, num_levels=len(SHAPES), num_points=p)
    rng = np.random.default_rng(6)
    s = sum(h * w for h, w in SHAPES)
    query = rng.normal(size=(2, 5, c)).astype(np.float32)
    value = rng.normal(size=(2, s, c)).astype(np.float32)
    pos = rng.normal(size=(2, 5, c)).astype(np.float32)
    ref = rng.uniform(0, 1, size=(2, 5, ref_levels, 2)).astype(np.float32)
    params = mod.init(jax.random.PRNGKey(0), query, value, ref, SHAPES, query_pos=pos)['params']
    return mod, params, (query, value, ref, pos)


def test_module_init_values():
    mod, params, (query, value, ref, pos) = _module_setup(len(SHAPES))
    m, nl, p = mod.num_heads, mod.num_levels, mod.num_points
    np.testing.assert_array_equal(params['sampling_offsets']['kernel'], 0)
    np.testing.assert_allclose(params['sampling_offsets']['bias'], np_grid_init(m, nl, p).reshape(-1), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_array_equal(params['attention_weights']['kernel'], 0)
    np.testing.assert_array_equal(params['attention_weights']['bias'], 0)
    for name in ('value_proj', 'output_proj'):
        np.testing.assert_array_equal(params[name]['bias'], 0)
        limit = math.sqrt(6 / (2 * mod.embed_dims))                          # xavier-uniform bound
        assert 0 < np.abs(params[name]['kernel']).max() <= limit
    out, aux = mod.apply({'params': params}, query, value, ref, SHAPES, query_pos=pos)
    assert out.shape == query.shape
    assert aux['sampling_locations'].shape == (2, 5, m, nl, p, 2)
    np.testing.assert_allclose(aux['attention_weights'], 1.0 / (nl * p), rtol=1e-6)
    size = np.array([[w, h] for h, w in SHAPES], np.float32)[:, None, :]
    np.testing.assert_allclose(aux['sampling_locations'],
                               ref[:, :, None, :, None, :] + np_grid_init(m, nl, p) / size, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('ref_levels', [len(SHAPES), 1])
def test_module_matches_numpy(ref_levels):
    """Random (non-init) parameters: locations = ref + offsets / (W_l, H_l), softmax over L*P per
    head, core, output_proj, residual with the query before query_pos."""
    mod, params, (query, value, ref, pos) = _module_setup(ref_levels)
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), params)
    out, aux = mod.apply({'params': params}, query, value, ref, SHAPES, query_pos=pos)

    c, m, nl, p = mod.embed_dims, mod.num_heads, mod.num_levels, mod.num_points
    pr = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    dense = lambda x, name: x @ pr[name]['kernel'] + pr[name]['bias']      # noqa: E731
    qp = query.astype(np.float64) + pos
    off = dense(qp, 'sampling_offsets').reshape(2, 5, m, nl, p, 2)
    logits = dense(qp, 'attention_weights').reshape(2, 5, m, nl * p)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = (attn / attn.sum(-1, keepdims=True)).reshape(2, 5, m, nl, p)
    size = np.array([[w, h] for h, w in SHAPES], np.float64)[:, None, :]
    loc = ref.astype(np.float64)[:, :, None, :, None, :] + off / size
    v = dense(value.astype(np.float64), 'value_proj').reshape(2, -1, m, c // m)
    expected = query + dense(np_msda(v, SHAPES, loc, attn), 'output_proj')

    np.testing.assert_allclose(aux['sampling_locations'], loc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux['attention_weights'], attn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_module_dropout_is_applied_in_training():
    mod, params, (query, value, ref, pos) = _module_setup(1)
    mod = mod.clone(dropout=0.5)
    det, _ = mod.apply({'params': params}, query, value, ref, SHAPES, query_pos=pos)
    train, _ = mod.apply({'params': params}, query, value, ref, SHAPES, query_pos=pos, deterministic=False,
                         rngs={'dropout': jax.random.PRNGKey(1)})
    assert not np.allclose(det, train)
    # dropped entries equal the residual (the query without query_pos)
    dropped = np.isclose(np.asarray(train), query, atol=1e-7)
    assert 0.2 < dropped.mean() < 0.8


@pytest.mark.parametrize('chunk', [1, 5, 100])
def test_value_index_reads_the_named_element(chunk):
    """``value_index``: row (b, q) reads value element ``value_index[b, q]`` (locations with another batch size
    than value); forward equal to the numpy kernel row by row, gradients equal to the reference's autodiff."""
    value, loc, attn = make_inputs(4, b=3)                                   # value from 3 elements
    loc, attn = loc[:2], attn[:2]                                            # rows of 2
    index = np.random.default_rng(4).integers(0, 3, size=loc.shape[:2])
    assert len(np.unique(index)) == 3 and (index != np.arange(2)[:, None]).any()
    want = np.stack([np.concatenate([np_msda(value[index[b, q]][None], SHAPES, loc[b, q][None, None],
                                             attn[b, q][None, None])[0] for q in range(loc.shape[1])])
                     for b in range(2)])
    got = da.ms_deform_attn(value, SHAPES, loc, attn, value_index=index, query_chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    weights = np.random.default_rng(5).normal(size=want.shape)

    def loss(impl):
        return lambda v, l, a: (impl(v, SHAPES, l, a, value_index=index) * weights).sum()
    grads = jax.grad(loss(functools.partial(da.ms_deform_attn, query_chunk=chunk)), (0, 1, 2))(value, loc, attn)
    want_grads = jax.grad(loss(da.ms_deform_attn_reference), (0, 1, 2))(value, loc, attn)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
