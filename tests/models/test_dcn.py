"""DCNv2 vs a float64 numpy restatement of mmcv's CUDA im2col kernel (channel-last)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd3d_jax.models.dcn import ModulatedDeformConv2dPack, modulated_deform_conv
from tests.models.numpy_reference import conv2d


def np_bilinear(img, h, w):
    """mmcv ``dmcn_im2col_bilinear`` on (H, W, C): corners outside the map read as 0."""
    height, width = img.shape[:2]
    h_low, w_low = int(np.floor(h)), int(np.floor(w))
    h_high, w_high = h_low + 1, w_low + 1
    lh, lw = h - h_low, w - w_low
    hh, hw = 1 - lh, 1 - lw
    zero = np.zeros(img.shape[2])
    v1 = img[h_low, w_low] if (h_low >= 0 and w_low >= 0) else zero
    v2 = img[h_low, w_high] if (h_low >= 0 and w_high <= width - 1) else zero
    v3 = img[h_high, w_low] if (h_high <= height - 1 and w_low >= 0) else zero
    v4 = img[h_high, w_high] if (h_high <= height - 1 and w_high <= width - 1) else zero
    return hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4


def np_dcn(x, offset, mask, kernel, stride, pad, dil):
    """Direct loop over output pixels and kernel points.

    x (N,H,W,C), offset (N,Ho,Wo,2K) as [dy_k, dx_k], mask (N,Ho,Wo,K), kernel (kh,kw,C,O).
    """
    x, offset, mask, kernel = (np.asarray(a, np.float64) for a in (x, offset, mask, kernel))
    n, height, width, _ = x.shape
    kh, kw, _, cout = kernel.shape
    ho = (height + 2 * pad - (dil * (kh - 1) + 1)) // stride + 1
    wo = (width + 2 * pad - (dil * (kw - 1) + 1)) // stride + 1
    out = np.zeros((n, ho, wo, cout))
    for b in range(n):
        for oh in range(ho):
            for ow in range(wo):
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        h = oh * stride - pad + i * dil + offset[b, oh, ow, 2 * k]
                        w = ow * stride - pad + j * dil + offset[b, oh, ow, 2 * k + 1]
                        if h > -1 and w > -1 and h < height and w < width:
                            val = np_bilinear(x[b], h, w) * mask[b, oh, ow, k]
                            out[b, oh, ow] += val @ kernel[i, j]
    return out


def _out_hw(height, width, kh, kw, stride, pad, dil):
    return ((height + 2 * pad - (dil * (kh - 1) + 1)) // stride + 1,
            (width + 2 * pad - (dil * (kw - 1) + 1)) // stride + 1)


def _inputs(rng, n, height, width, cin, cout, kh, kw, stride, pad, dil):
    ho, wo = _out_hw(height, width, kh, kw, stride, pad, dil)
    x = rng.normal(size=(n, height, width, cin)).astype(np.float32)
    kernel = rng.normal(size=(kh, kw, cin, cout)).astype(np.float32)
    mask = rng.uniform(size=(n, ho, wo, kh * kw)).astype(np.float32)
    return x, kernel, mask, (ho, wo)


CASES = [  # (kh, kw, stride, pad, dil)
    (3, 3, 1, 1, 1),
    (3, 3, 2, 1, 1),
    (3, 3, 1, 2, 2),
    (3, 3, 2, 2, 2),
    (2, 3, 1, 0, 1),  # non-square kernel catches i/j (dy/dx) swaps in the channel layout
]


@pytest.mark.parametrize('kh,kw,stride,pad,dil', CASES)
def test_dcn_matches_numpy_loop(kh, kw, stride, pad, dil):
    rng = np.random.default_rng(kh * 100 + stride * 10 + dil)
    x, kernel, mask, (ho, wo) = _inputs(rng, 2, 7, 9, 3, 4, kh, kw, stride, pad, dil)
    offset = rng.uniform(-3, 3, size=(2, ho, wo, 2 * kh * kw))
    far = rng.uniform(size=offset.shape) < 0.15        # far out of the map
    offset = np.where(far, rng.uniform(-15, 15, size=offset.shape), offset)
    integer = rng.uniform(size=offset.shape) < 0.15    # exact pixel hits and border cases
    offset = np.where(integer, np.round(offset), offset).astype(np.float32)
    got = modulated_deform_conv(x, offset, mask, kernel, stride, pad, dil)
    want = np_dcn(x, offset, mask, kernel, stride, pad, dil)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_dcn_border_rules():
    """Exactly -1 / H are outside (zero); just inside, only the valid corner contributes."""
    x = np.arange(1, 13, dtype=np.float32).reshape(1, 3, 4, 1)
    kernel = np.ones((1, 1, 1, 1), np.float32)
    mask = np.ones((1, 3, 4, 1), np.float32)
    for dy, dx in [(-1.0, 0.0), (-0.5, 0.0), (0.0, -0.75), (3.0, 0.0), (2.5, 0.0), (0.0, 3.5),
                   (-1.25, 0.0), (0.3, 0.6)]:
        offset = np.zeros((1, 3, 4, 2), np.float32)
        offset[..., 0], offset[..., 1] = dy, dx
        got = np.asarray(modulated_deform_conv(x, offset, mask, kernel, 1, 0, 1))
        want = np_dcn(x, offset, mask, kernel, 1, 0, 1)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    offset = np.zeros((1, 3, 4, 2), np.float32)
    offset[..., 0] = -0.5                         # row 0 samples half of the zero row above
    got = np.asarray(modulated_deform_conv(x, offset, mask, kernel, 1, 0, 1))
    np.testing.assert_allclose(got[0, 0, :, 0], 0.5 * x[0, 0, :, 0], rtol=1e-6)


@pytest.mark.parametrize('stride,pad,dil', [(1, 1, 1), (2, 1, 1), (2, 2, 2)])
def test_zero_offset_unit_mask_is_plain_conv(stride, pad, dil):
    rng = np.random.default_rng(stride + 7 * dil)
    x, kernel, _, (ho, wo) = _inputs(rng, 2, 8, 11, 5, 6, 3, 3, stride, pad, dil)
    offset = np.zeros((2, ho, wo, 18), np.float32)
    mask = np.ones((2, ho, wo, 9), np.float32)
    got = np.asarray(modulated_deform_conv(x, offset, mask, kernel, stride, pad, dil))
    np.testing.assert_allclose(got, conv2d(x, kernel, stride=stride, pad=pad, dil=dil), rtol=1e-4, atol=1e-4)
    ref = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                       rhs_dilation=(dil, dil),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                       precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_grad_wrt_offset_and_mask_matches_finite_differences():
    rng = np.random.default_rng(3)
    stride, pad, dil = 2, 2, 2
    x, kernel, mask, (ho, wo) = _inputs(rng, 1, 7, 8, 2, 3, 3, 3, stride, pad, dil)
    # integer part + fraction in [0.1, 0.9]: every sample is >= 0.1 px from a grid line, so the
    # piecewise-bilinear map is smooth within +-eps.
    offset = (rng.integers(-3, 3, size=(1, ho, wo, 18)) + rng.uniform(0.1, 0.9, (1, ho, wo, 18)))
    offset = offset.astype(np.float32)
    cot = rng.normal(size=(1, ho, wo, 3))

    def loss(off, msk):
        return jnp.sum(modulated_deform_conv(x, off, msk, kernel, stride, pad, dil) * cot)

    g_off, g_mask = jax.grad(loss, argnums=(0, 1))(offset, mask)

    def np_loss(off, msk):
        return np.sum(np_dcn(x, off, msk, kernel, stride, pad, dil) * cot)

    eps = 1e-3
    off64, mask64 = offset.astype(np.float64), mask.astype(np.float64)
    flat = rng.choice(offset.size, 12, replace=False)
    for f in flat:
        idx = np.unravel_index(f, offset.shape)
        e = np.zeros_like(off64)
        e[idx] = eps
        fd = (np_loss(off64 + e, mask64) - np_loss(off64 - e, mask64)) / (2 * eps)
        np.testing.assert_allclose(float(g_off[idx]), fd, rtol=2e-3, atol=2e-4)
    for f in rng.choice(mask.size, 6, replace=False):
        idx = np.unravel_index(f, mask.shape)
        e = np.zeros_like(mask64)
        e[idx] = eps
        fd = (np_loss(off64, mask64 + e) - np_loss(off64, mask64 - e)) / (2 * eps)
        np.testing.assert_allclose(float(g_mask[idx]), fd, rtol=2e-3, atol=2e-4)
    # remat_points only changes what the backward pass keeps, not the gradient
    g_plain = jax.grad(lambda o: jnp.sum(modulated_deform_conv(
        x, o, mask, kernel, stride, pad, dil, remat_points=False) * cot))(offset)
    np.testing.assert_allclose(np.asarray(g_plain), np.asarray(g_off), rtol=1e-5, atol=1e-6)


def test_pack_module_split_and_zero_init():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 6, 7, 4)).astype(np.float32)
    layer = ModulatedDeformConv2dPack(5, 3, strides=2, padding=1)
    params = layer.init(jax.random.key(0), x)['params']
    assert params['kernel'].shape == (3, 3, 4, 5)
    assert 'bias' not in params
    assert params['conv_offset']['kernel'].shape == (3, 3, 4, 27)
    assert not np.any(params['conv_offset']['kernel']) and not np.any(params['conv_offset']['bias'])
    kernel = np.asarray(params['kernel'])
    # zero-initialised offsets: plain conv times sigmoid(0) = 0.5
    np.testing.assert_allclose(np.asarray(layer.apply({'params': params}, x)),
                               0.5 * conv2d(x, kernel, stride=2, pad=1), rtol=1e-4, atol=1e-5)
    # a constant conv_offset output (bias only): channels [0, 18) offsets, [18, 27) mask logits
    bias = rng.normal(size=27).astype(np.float32)
    params = jax.tree_util.tree_map(lambda a: a, params)
    params['conv_offset']['bias'] = jnp.asarray(bias)
    got = np.asarray(layer.apply({'params': params}, x))
    ho, wo = _out_hw(6, 7, 3, 3, 2, 1, 1)
    offset = np.broadcast_to(bias[:18], (1, ho, wo, 18))
    mask = np.broadcast_to(1 / (1 + np.exp(-bias[18:].astype(np.float64))), (1, ho, wo, 9))
    np.testing.assert_allclose(got, np_dcn(x, offset, mask, kernel, 2, 1, 1), rtol=1e-4, atol=1e-4)
