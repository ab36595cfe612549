"""Distillation modules vs float64 numpy restatements of the PyTorch layers (channels-last)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd3d_jax.distill.modules import Align, BatchStatNorm, BEVUpsampler, Generator
from tests.models.numpy_reference import conv2d


def _rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


def _count(tree):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


def _np(p):
    return np.asarray(p, np.float64)


def np_conv_transpose(x, weight, stride=2, pad=1):
    """torch ConvTranspose2d (no bias, output_padding 0) by its scatter-add definition, on
    (N, H, W, C_in) with the torch weight (C_in, C_out, kh, kw):
    out[n, i*s - p + ki, j*s - p + kj, o] += x[n, i, j, c] * w[c, o, ki, kj], cropped to
    ((H - 1) * s - 2p + kh, (W - 1) * s - 2p + kw)."""
    x, weight = _np(x), _np(weight)
    n, h, w, _ = x.shape
    _, cout, kh, kw = weight.shape
    full = np.zeros((n, (h - 1) * stride + kh, (w - 1) * stride + kw, cout))
    for i in range(h):
        for j in range(w):
            for ki in range(kh):
                for kj in range(kw):
                    full[:, i * stride + ki, j * stride + kj] += x[:, i, j] @ weight[:, :, ki, kj]
    ho, wo = (h - 1) * stride - 2 * pad + kh, (w - 1) * stride - 2 * pad + kw
    return full[:, pad:pad + ho, pad:pad + wo]


def np_batch_norm(x, scale, bias, eps=1e-5):
    """torch BatchNorm2d in training mode: batch mean and biased variance over (N, H, W)."""
    mean = x.mean((0, 1, 2))
    var = ((x - mean) ** 2).mean((0, 1, 2))
    return (x - mean) / np.sqrt(var + eps) * _np(scale) + _np(bias)


def np_upsampler(x, params, num_layers):
    y = _np(x)
    for i in range(num_layers):
        weight = _np(params[f'deconv_{i}']['kernel']).transpose(3, 2, 0, 1)  # -> (C_in, C_out, 4, 4)
        y = np_conv_transpose(y, weight)
        y = np.maximum(np_batch_norm(y, params[f'bn_{i}']['scale'], params[f'bn_{i}']['bias']), 0)
    return conv2d(y, params['conv']['kernel'], params['conv']['bias'], pad=1)


def _shapes(module, x):
    """The module's variables as ShapeDtypeStructs (no init compile: tests stay fast)."""
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)


def _random_params(module, x, rng):
    """Random params of the module's shapes; BN scales in [0.5, 1.5] so the test sees them."""
    def draw(path, leaf):
        if path[-1].key == 'scale':
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (0.3 * rng.normal(size=leaf.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, _shapes(module, x)['params'])


def test_align_identity_and_1x1_conv():
    rng = np.random.default_rng(0)
    x = _rand(rng, 2, 3, 4, 5, 4)  # (B, N_cam, H, W, C)
    same = Align(4)
    variables = same.init(jax.random.PRNGKey(0), x)
    assert _count(variables) == 0
    np.testing.assert_array_equal(same.apply(variables, x), x)

    align = Align(6)
    params = _random_params(align, x, rng)
    assert _count(params) == 4 * 6 + 6
    assert params['conv']['kernel'].shape == (1, 1, 4, 6)
    got = align.apply({'params': params}, x)
    assert got.shape == (2, 3, 4, 5, 6)
    want = conv2d(x.reshape(6, 4, 5, 4), params['conv']['kernel'], params['conv']['bias']).reshape(2, 3, 4, 5, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_generator_matches_numpy_convs():
    rng = np.random.default_rng(1)
    x = _rand(rng, 2, 2, 6, 5, 3)
    gen = Generator(3)
    params = _random_params(gen, x, rng)
    assert _count(params) == 2 * (9 * 3 * 3 + 3)
    got = gen.apply({'params': params}, x)
    y = conv2d(x.reshape(4, 6, 5, 3), params['conv1']['kernel'], params['conv1']['bias'], pad=1)
    want = conv2d(np.maximum(y, 0), params['conv2']['kernel'], params['conv2']['bias'], pad=1)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want.reshape(x.shape), rtol=1e-4, atol=1e-5)


def test_torch_default_init_bounds():
    x = np.zeros((1, 4, 4, 8), np.float32)
    params = Generator(8).init(jax.random.PRNGKey(2), x)['params']
    bound = 1 / math.sqrt(9 * 8)
    for name in ('conv1', 'conv2'):
        k, b = np.asarray(params[name]['kernel']), np.asarray(params[name]['bias'])
        assert np.abs(k).max() <= bound and np.abs(b).max() <= bound
        assert np.abs(k).max() > 0.8 * bound and np.abs(b).max() > 0.3 * bound  # uniform, not zeros
    up = BEVUpsampler(8, 2).init(jax.random.PRNGKey(3), x)['params']
    assert np.abs(np.asarray(up['deconv_0']['kernel'])).max() <= 1 / math.sqrt(16 * 8)  # torch: fan_in = C_out * 16
    np.testing.assert_array_equal(up['bn_0']['scale'], 1.0)
    np.testing.assert_array_equal(up['bn_0']['bias'], 0.0)


@pytest.mark.parametrize('factor, num_layers', [(1, 0), (2, 1), (4, 2)])
def test_upsampler_shapes_and_param_counts(factor, num_layers):
    c = 4
    x = np.zeros((2, 5, 3, c), np.float32)
    up = BEVUpsampler(c, factor)
    variables = _shapes(up, x)
    assert set(variables) <= {'params'}  # no batch_stats collection
    expected = 0 if factor == 1 else num_layers * (16 * c * c + 2 * c) + 9 * c * c + c
    assert _count(variables) == expected
    assert jax.eval_shape(up.apply, variables, x).shape == (2, 5 * factor, 3 * factor, c)
    # Any leading dims.
    x5 = np.zeros((2, 3, 5, 3, c), np.float32)
    assert jax.eval_shape(up.apply, variables, x5).shape == (2, 3, 5 * factor, 3 * factor, c)


@pytest.mark.parametrize('factor', [3, 0, 6])
def test_upsampler_factor_must_be_power_of_two(factor):
    with pytest.raises(ValueError):
        BEVUpsampler(4, factor)


@pytest.mark.parametrize('factor, num_layers', [(2, 1), (4, 2)])
def test_upsampler_matches_torch_restatement(factor, num_layers):
    """Deconv(k4, s2, p1, no bias) -> BN (batch stats) -> ReLU, repeated, then Conv3x3; C_in != C
    exercises the (C_in, C_out) layout of the transposed kernel."""
    rng = np.random.default_rng(2)
    x = _rand(rng, 2, 3, 4, 2)
    up = BEVUpsampler(3, factor)
    params = _random_params(up, x, rng)
    got = up.apply({'params': params}, x)
    want = np_upsampler(x, params, num_layers)
    assert got.shape == want.shape == (2, 3 * factor, 4 * factor, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_transposed_conv_alone_matches_scatter_add():
    """The deconv layer alone, on an odd-sized non-square map."""
    rng = np.random.default_rng(3)
    x = _rand(rng, 1, 5, 3, 2)
    up = BEVUpsampler(4, 2)
    params = _random_params(up, x, rng)
    deconv = params['deconv_0']
    layer = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), use_bias=False, transpose_kernel=True)
    got = layer.apply({'params': deconv}, x)
    want = np_conv_transpose(x, deconv['kernel'].transpose(3, 2, 0, 1))
    assert got.shape == want.shape == (1, 10, 6, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The same kernel inside the upsampler: its pre-BN activation is this output.
    _, inter = up.apply({'params': params}, x, capture_intermediates=lambda m, _: m.name == 'deconv_0')
    np.testing.assert_allclose(inter['intermediates']['deconv_0']['__call__'][0], want, rtol=1e-5, atol=1e-5)


def test_batch_norm_uses_batch_statistics():
    rng = np.random.default_rng(4)
    x = _rand(rng, 3, 4, 5, 6) * 3 + 2
    bn = BatchStatNorm()
    variables = bn.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {'params'} and _count(variables) == 2 * 6
    params = {'scale': rng.uniform(0.5, 1.5, 6).astype(np.float32), 'bias': _rand(rng, 6)}
    got = bn.apply({'params': params}, x)
    np.testing.assert_allclose(got, np_batch_norm(_np(x), params['scale'], params['bias']), rtol=1e-4, atol=1e-5)
    plain = np.asarray(bn.apply(variables, x))
    np.testing.assert_allclose(plain.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(plain.var((0, 1, 2)), 1, atol=1e-3)
    # Sample 0's output depends on the other samples (batch statistics, not per-sample).
    x2 = x.copy()
    x2[1:] *= 5
    assert not np.allclose(bn.apply(variables, x2)[0], plain[0], atol=1e-3)


@pytest.mark.parametrize('module, cin', [(Align(5), 3), (Generator(3), 3), (BEVUpsampler(3, 2), 3)])
def test_grad_flows(module, cin):
    rng = np.random.default_rng(5)
    x = jnp.asarray(_rand(rng, 2, 4, 4, cin))
    params = _random_params(module, x, rng)
    target = jnp.asarray(_rand(rng, *module.apply({'params': params}, x).shape))

    def loss(p, inp):
        return jnp.mean((module.apply({'params': p}, inp) - target) ** 2)

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    for leaf in jax.tree_util.tree_leaves(g_params) + [g_x]:
        assert np.all(np.isfinite(leaf)) and np.abs(np.asarray(leaf)).max() > 0
