"""ResNet / FPN vs float64 numpy restatements (tiny widths); real-config shapes via eval_shape."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fd3d_jax.models.backbone import (FPN, FrozenBatchNorm, ResNet, nearest_indices,
                                      resnet_trainable_mask)
from tests.models.numpy_reference import conv2d as np_conv

# ---------------------------------------------------------------- numpy restatements


def np_bn(x, p, eps=1e-5):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    return (x - p['mean']) / np.sqrt(p['var'] + eps) * p['scale'] + p['bias']


def np_maxpool3s2p1(x):
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    return np.max([xp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2]
                   for i in range(3) for j in range(3)], axis=0)


def np_resize_nearest(x, size):
    rows = [min(d * x.shape[1] // size[0], x.shape[1] - 1) for d in range(size[0])]
    cols = [min(d * x.shape[2] // size[1], x.shape[2] - 1) for d in range(size[1])]
    return x[:, rows][:, :, cols]


def relu(x):
    return np.maximum(x, 0)


def np_bottleneck(x, p, stride, style, conv2_scale=1.0):
    s1, s2 = (1, stride) if style == 'pytorch' else (stride, 1)
    out = relu(np_bn(np_conv(x, p['conv1']['kernel'], stride=s1), p['bn1']))
    out = conv2_scale * np_conv(out, p['conv2']['kernel'], stride=s2, pad=1)
    out = relu(np_bn(out, p['bn2']))
    out = np_bn(np_conv(out, p['conv3']['kernel']), p['bn3'])
    identity = x
    if 'downsample_conv' in p:
        identity = np_conv(x, p['downsample_conv']['kernel'], stride=stride)
        identity = np_bn(identity, p['downsample_bn'])
    return relu(out + identity)


def np_resnet(x, p, blocks, style, dcn_stages=(False,) * 4):
    """Outputs C2..C5. DCN stages assume zero conv_offset (plain conv x sigmoid(0) = 0.5)."""
    x = relu(np_bn(np_conv(x, p['conv1']['kernel'], stride=2, pad=3), p['bn1']))
    x = np_maxpool3s2p1(x)
    outs = []
    for s, nb in enumerate(blocks):
        for b in range(nb):
            pb = p[f'layer{s + 1}_0'] if b == 0 else jax.tree_util.tree_map(
                lambda a: a[b - 1], p[f'layer{s + 1}_rest']['block'])  # repeated blocks are stacked
            x = np_bottleneck(x, pb, (1, 2, 2, 2)[s] if b == 0 else 1, style, 0.5 if dcn_stages[s] else 1.0)
        outs.append(x)
    return outs


def np_fpn(inputs, p, num_outs, start_level, extra, relu_before):
    laterals = [np_conv(inputs[start_level + i], p[f'lateral_convs_{i}']['kernel'],
                        p[f'lateral_convs_{i}']['bias']) for i in range(len(inputs) - start_level)]
    used = len(laterals)
    for i in range(used - 1, 0, -1):
        up = np_resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
        laterals[i - 1] = laterals[i - 1] + up
    outs = [np_conv(laterals[i], p[f'fpn_convs_{i}']['kernel'], p[f'fpn_convs_{i}']['bias'], pad=1)
            for i in range(used)]
    if not extra:
        while len(outs) < num_outs:
            outs.append(outs[-1][:, ::2, ::2])
        return outs
    src = {'on_input': inputs[-1], 'on_lateral': laterals[-1], 'on_output': outs[-1]}[extra]
    for i in range(used, num_outs):
        if i > used and relu_before:
            src = relu(src)
        outs.append(np_conv(src, p[f'fpn_convs_{i}']['kernel'], p[f'fpn_convs_{i}']['bias'], 2, 1))
        src = outs[-1]
    return outs


# ---------------------------------------------------------------- helpers

TINY = dict(base_width=4, stage_blocks=(1, 1, 1, 1))


def randomize(params, rng):
    """Random values everywhere (BN var positive) so that no layer is an identity."""
    def f(path, leaf):
        name = path[-1].key
        if name == 'var':
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        scale = 0.3 if name == 'kernel' else 0.5
        return jnp.asarray(scale * rng.normal(size=leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(f, params)


def random_params(module, rng, *args):
    """Random params with the module's tree structure; eval_shape avoids compiling the inits."""
    return randomize(jax.eval_shape(module.init, jax.random.key(0), *args)['params'], rng)


def names_of(tree):
    return {'/'.join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def n_params(tree, skip_stats=False):
    return sum(int(np.prod(v.shape)) for k, v in names_of(tree).items()
               if not (skip_stats and k.rsplit('/', 1)[-1] in ('mean', 'var')))


# ---------------------------------------------------------------- tests


def test_frozen_bn_formula_and_no_grad():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    bn = FrozenBatchNorm()
    p = random_params(bn, rng, x)
    got = bn.apply({'params': p}, x)
    np.testing.assert_allclose(np.asarray(got), np_bn(x, p), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda q: jnp.sum(bn.apply({'params': q}, x) ** 2))(p)
    assert all(not np.any(v) for v in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize('style', ['pytorch', 'caffe'])
def test_tiny_resnet_matches_numpy(style):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 37, 45, 3)).astype(np.float32)  # odd sizes: ceil(n/2) everywhere
    dcn = (False, False, True, False)
    blocks = (2, 1, 3, 1)  # stages 1 and 3 run their repeated blocks as a scan
    net = ResNet(style=style, dcn_stages=dcn, base_width=TINY['base_width'], stage_blocks=blocks)
    params = random_params(net, rng, x)
    # zero offsets and mask logits: DCNv2 == conv * sigmoid(0)
    for conv2 in (params['layer3_0']['conv2'], params['layer3_rest']['block']['conv2']):
        conv2['conv_offset'] = jax.tree_util.tree_map(jnp.zeros_like, conv2['conv_offset'])
    assert params['layer3_rest']['block']['conv1']['kernel'].shape[0] == 2
    got = jax.jit(net.apply)({'params': params}, x)
    want = np_resnet(x, params, blocks, style, dcn)
    sizes = [(10, 12), (5, 6), (3, 3), (2, 2)]  # 37x45 -> /2 19x23 -> /4 10x12 -> ...
    for g, w, hw, c in zip(got, want, sizes, (16, 32, 64, 128)):
        assert g.shape == (1, *hw, c)
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('style,conv1_hw,conv2_hw', [('pytorch', (10, 12), (5, 6)),
                                                     ('caffe', (5, 6), (5, 6))])
def test_style_puts_stride_on_the_right_conv(style, conv1_hw, conv2_hw):
    x = jnp.zeros((1, 37, 45, 3))
    net = ResNet(style=style, out_indices=(1,), **TINY)
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    _, state = jax.eval_shape(lambda v: net.apply(v, x, capture_intermediates=True), variables)
    inter = state['intermediates']['layer2_0']  # input C2: 10x12
    assert inter['conv1']['__call__'][0].shape[1:3] == conv1_hw
    assert inter['conv2']['__call__'][0].shape[1:3] == conv2_hw
    assert inter['downsample_conv']['__call__'][0].shape[1:3] == (5, 6)


def test_trainable_mask_and_frozen_gradients():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 32, 32, 3)).astype(np.float32)
    net = ResNet(frozen_stages=1, dcn_stages=(False, False, False, True), out_indices=(2, 3),
                 **TINY)
    params = random_params(net, rng, x)
    mask = names_of(resnet_trainable_mask(params, frozen_stages=1))
    for name, trainable in mask.items():
        is_bn = any(part.startswith('bn') or part == 'downsample_bn' for part in name.split('/'))
        frozen = name.split('/')[0] in ('conv1', 'bn1') or name.startswith('layer1_')
        assert trainable == (not is_bn and not frozen), name
    assert mask['layer4_0/conv2/conv_offset/kernel'] and mask['layer2_0/downsample_conv/kernel']
    wrapped = names_of(resnet_trainable_mask({'params': params}, 1))
    assert wrapped == {'params/' + k: v for k, v in mask.items()}
    assert names_of(resnet_trainable_mask(params, -1))['conv1/kernel']
    assert not names_of(resnet_trainable_mask(params, 0))['conv1/kernel']
    assert names_of(resnet_trainable_mask(params, 0))['layer1_0/conv1/kernel']

    def loss(p):
        return sum(jnp.sum(o ** 2) for o in net.apply({'params': p}, x))
    raw_grads = jax.jit(jax.grad(loss))(params)
    grads = names_of(raw_grads)
    for name, g in grads.items():  # stop_gradient: frozen leaves get exactly zero
        assert bool(np.any(g)) == mask[name], name
    # AdamW (decoupled decay) through optax.masked leaves every frozen leaf untouched
    tx = optax.masked(optax.adamw(1e-2, weight_decay=0.1), resnet_trainable_mask(params, 1))

    @jax.jit
    def step(p, g):
        updates, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, updates)
    new = names_of(step(params, raw_grads))
    old = names_of(params)
    for name, trainable in mask.items():
        assert np.array_equal(np.asarray(new[name]), np.asarray(old[name])) != trainable, name


def test_remat_matches_plain():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 32, 32, 3)).astype(np.float32)
    kw = dict(style='caffe', dcn_stages=(False, False, False, True), out_indices=(3,), **TINY)
    params = random_params(ResNet(**kw), rng, x)

    def loss(p, remat):
        return jnp.sum(ResNet(remat=remat, **kw).apply({'params': p}, x)[0] ** 2)
    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l1, g1), (l2, g2) = vg(params, True), vg(params, False)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


FPN_CASES = [  # (start_level, num_outs, add_extra_convs, relu_before_extra_convs)
    (0, 5, 'on_output', True),
    (0, 5, 'on_output', False),
    (1, 4, 'on_input', False),
    (0, 4, 'on_lateral', True),
    (0, 5, False, False),
]


@pytest.mark.parametrize('start_level,num_outs,extra,relu_before', FPN_CASES)
def test_fpn_matches_numpy(start_level, num_outs, extra, relu_before):
    rng = np.random.default_rng(5)
    in_ch, sizes = [3, 4, 5], [(9, 13), (5, 7), (3, 4)]  # odd: interpolate-to-size path
    inputs = [rng.normal(size=(1, *hw, c)).astype(np.float32) for c, hw in zip(in_ch, sizes)]
    fpn = FPN(in_ch, 6, num_outs, start_level=start_level, add_extra_convs=extra,
              relu_before_extra_convs=relu_before)
    params = random_params(fpn, rng, inputs)  # random biases too (zero at init)
    got = jax.jit(fpn.apply)({'params': params}, inputs)
    want = np_fpn(inputs, params, num_outs, start_level, extra, relu_before)
    assert len(got) == num_outs
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)
    n_convs = (len(in_ch) - start_level) + (num_outs - (len(in_ch) - start_level) if extra else 0)
    assert sorted(k for k in params if k.startswith('fpn_convs')) == \
        sorted(f'fpn_convs_{i}' for i in range(n_convs))


def test_fpn_relu_only_before_second_extra_conv():
    rng = np.random.default_rng(6)
    inputs = [rng.normal(size=(1, 9, 13, 3)).astype(np.float32),
              rng.normal(size=(1, 5, 7, 4)).astype(np.float32)]
    outs = {}
    for flag in (False, True):
        fpn = FPN([3, 4], 6, 5, add_extra_convs='on_output', relu_before_extra_convs=flag)
        params = random_params(fpn, np.random.default_rng(0), inputs)
        outs[flag] = jax.jit(fpn.apply)({'params': params}, inputs)
    assert [o.shape[1:3] for o in outs[True]] == [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]
    for lvl in range(3):  # up to and including the first extra conv: identical
        np.testing.assert_array_equal(np.asarray(outs[True][lvl]), np.asarray(outs[False][lvl]))
    assert not np.allclose(np.asarray(outs[True][3]), np.asarray(outs[False][3]))


def test_fpn_xavier_uniform_init():
    fpn = FPN([64], 32, 1)
    params = jax.jit(fpn.init)(jax.random.key(0), [jnp.zeros((1, 4, 4, 64))])['params']
    k = np.asarray(params['fpn_convs_0']['kernel'])  # fan_in = fan_out = 32*9
    limit = np.sqrt(6.0 / (2 * 32 * 9))
    assert np.abs(k).max() <= limit and np.abs(k).max() > 0.9 * limit
    assert not np.any(params['fpn_convs_0']['bias'])


def test_nearest_indices_float32_kernel_equals_integer_rule():
    for n_in in range(1, 160):
        for n_out in (2 * n_in - 1, 2 * n_in, n_in + 1):
            if n_out < 1:
                continue
            want = np.minimum(np.arange(n_out) * n_in // n_out, n_in - 1)
            np.testing.assert_array_equal(nearest_indices(n_in, n_out), want)


def _shapes_and_params(net, hw, fpn=None):
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    feats = jax.eval_shape(net.apply, variables, x)
    out = ([f.shape for f in feats], n_params(variables, skip_stats=True))
    if fpn is None:
        return out
    fvars = jax.eval_shape(fpn.init, jax.random.key(0), feats)
    return out + ([f.shape for f in jax.eval_shape(fpn.apply, fvars, feats)], n_params(fvars))


def test_real_config_shapes_and_param_counts():
    # BEVFormer-tiny: R50 pytorch, C5 only, 480x800
    shapes, n, fshapes, nf = _shapes_and_params(
        ResNet(50, out_indices=(3,), frozen_stages=1), (480, 800), FPN([2048], 256, 1))
    assert shapes == [(1, 15, 25, 2048)] and fshapes == [(1, 15, 25, 256)]
    assert n == 23_508_032  # torchvision resnet50 without fc (25_557_032 - 2_049_000)
    assert nf == 2048 * 256 + 256 + 256 * 256 * 9 + 256
    # BEVFormer-base: R101-DCN caffe, C3..C5 + FPN(4 outs, on_output), 928x1600
    base_fpn = FPN([512, 1024, 2048], 256, 4, add_extra_convs='on_output',
                   relu_before_extra_convs=True)
    shapes, n, fshapes, nf = _shapes_and_params(
        ResNet(101, style='caffe', out_indices=(1, 2, 3), frozen_stages=1, remat=True,
               dcn_stages=(False, False, True, True)), (928, 1600), base_fpn)
    assert shapes == [(1, 116, 200, 512), (1, 58, 100, 1024), (1, 29, 50, 2048)]
    assert fshapes == [(1, 116, 200, 256), (1, 58, 100, 256), (1, 29, 50, 256), (1, 15, 25, 256)]
    dcn_extra = 23 * (27 * 256 * 9 + 27) + 3 * (27 * 512 * 9 + 27)  # conv_offset layers
    assert n == 42_500_160 + dcn_extra  # torchvision resnet101 without fc: 44_549_160 - 2_049_000
    assert nf == 3_278_592
    # DETR3D: R101-DCN, C2..C5, FPN start_level=1
    shapes, n, fshapes, nf = _shapes_and_params(
        ResNet(101, style='caffe', frozen_stages=1, dcn_stages=(False, False, True, True)),
        (928, 1600),
        FPN([256, 512, 1024, 2048], 256, 4, start_level=1, add_extra_convs='on_output'))
    assert shapes[0] == (1, 232, 400, 256)
    assert fshapes == [(1, 116, 200, 256), (1, 58, 100, 256), (1, 29, 50, 256), (1, 15, 25, 256)]
    assert nf == 3_278_592
    # plain R101
    assert _shapes_and_params(ResNet(101, out_indices=(3,)), (480, 800))[1] == 42_500_160


@pytest.mark.parametrize('remat,other', [(False, 'loop'), (True, 'unrolled')])
def test_repeated_blocks_loop_on_the_cpu_only_when_rematerialised(remat, other):
    """On the CPU, without remat, the repeated blocks are unrolled (no loop in the compiled gradient: XLA:CPU runs
    backward convolutions in a loop body in its naive emitter); as a loop or unrolled, the same gradients."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 32, 32, 3)).astype(np.float32)
    nets = {form: ResNet(frozen_stages=1, base_width=TINY['base_width'], stage_blocks=(1, 3, 1, 1), remat=remat,
                         repeated_blocks=form) for form in ('auto', other)}
    params = random_params(nets['auto'], rng, x)
    compiled = {form: jax.jit(jax.grad(lambda p, net=net: sum(jnp.sum(f ** 2) for f in net.apply({'params': p}, x))))
                .lower(params).compile() for form, net in nets.items()}
    assert jax.default_backend() == 'cpu'
    assert {form: 'while(' in c.as_text() for form, c in compiled.items()} == {'auto': remat, other: not remat}
    want = compiled[other](params)
    assert np.any(np.asarray(want['layer2_rest']['block']['conv2']['kernel']))   # stage 2 is trained
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
                           compiled['auto'](params), want)
    with pytest.raises(ValueError, match='repeated_blocks'):
        ResNet(repeated_blocks='scan', **TINY).init(jax.random.key(0), x)
