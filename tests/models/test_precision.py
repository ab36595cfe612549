"""``config.model.dtype``: bfloat16 compute with float32 params, geometry, softmaxes, norms and outputs."""
import importlib

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

from fd3d_jax import validate
from fd3d_jax.errors import ConfigError
from fd3d_jax.models import build
from fd3d_jax.models.decoder import SelfAttention, attention_softmax_float32
from fd3d_jax.models.deformable_attention import MSDeformableAttention
from fd3d_jax.models.inputs import dummy_batch

NAMES = ['bevformer_tiny', 'detr3d_r50']


def toy(name):
    config = importlib.import_module(f'configs.{name}').get_config('toy')
    batch = dummy_batch(config, batch_size=1)
    batch = dict(batch, img=jax.random.normal(jax.random.PRNGKey(5), batch['img'].shape))
    return config, batch


@pytest.fixture(scope='module')
def models():
    """Per detector: (config, batch, float32 params, abstract params of the bfloat16 model, outputs of the float32
    and of the bfloat16 model with the float32 params)."""
    out = {}
    for name in NAMES:
        config, batch = toy(name)
        rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
        params32 = jax.jit(build(config.model).init)(rngs, batch)['params']
        params16 = jax.eval_shape(build(config.model, dtype='bfloat16').init, rngs, batch)['params']
        outputs = {dtype: apply_fn(build(config.model, dtype=dtype))(params32, batch)
                   for dtype in ('float32', 'bfloat16')}
        out[name] = (config, batch, params32, params16, outputs)
    return out


def apply_fn(model):
    return jax.jit(lambda params, batch: model.apply({'params': params}, batch))


def matmul_flops(jaxpr, multiplier=1):
    """{dtype name: FLOPs} of the dot_generals and convolutions of a jaxpr, sub-jaxprs included (a scan's body
    counted ``length`` times)."""
    flops = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            out = eqn.outvars[0].aval
            if eqn.primitive.name == 'dot_general':
                (contract, _), _ = eqn.params['dimension_numbers']
                inner = int(np.prod([lhs.shape[d] for d in contract]))
            else:
                out_features = rhs.shape[eqn.params['dimension_numbers'].rhs_spec[0]]
                inner = int(np.prod(rhs.shape)) // out_features
            key = str(jnp.result_type(lhs.dtype, rhs.dtype))
            flops[key] = flops.get(key, 0) + 2 * int(np.prod(out.shape)) * inner * multiplier
        inner_multiplier = multiplier * int(eqn.params.get('length', 1)) if eqn.primitive.name == 'scan' else multiplier
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, jex.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jex.Jaxpr):
                    for key, count in matmul_flops(sub, inner_multiplier).items():
                        flops[key] = flops.get(key, 0) + count
    return flops


@pytest.mark.parametrize('name', NAMES)
def test_params_stay_float32_and_outputs_follow_the_policy(name, models):
    _, _, params32, params16, outputs = models[name]
    assert {x.dtype for x in jax.tree_util.tree_leaves(params16)} == {jnp.dtype(jnp.float32)}
    assert jax.tree_util.tree_structure(params16) == jax.tree_util.tree_structure(params32)
    out = outputs['bfloat16']
    for key in ('cls_scores', 'bbox_preds', 'references') + (('bev',) if 'bev' in out else ()):
        assert out[key].dtype == jnp.float32, key
    assert out['img_feats'][0].dtype == jnp.bfloat16 and out['queries'].dtype == jnp.bfloat16
    for layer in out['sampling']:   # geometry and attention weights
        for key, value in layer.items():
            if jnp.issubdtype(value.dtype, jnp.floating):
                assert value.dtype == jnp.float32, key


@pytest.mark.parametrize('name', NAMES)
def test_matmuls_and_convolutions_run_in_bfloat16(name, models):
    """Nearly all matmul/conv FLOPs in bfloat16 (what is left: offsets, attention logits, the branches' last
    Linear, the reference points, the DCN offsets); none in float32 mode. Fails when a module ignores dtype."""
    config, batch, params32, _, _ = models[name]
    for dtype, low, high in (('float32', 0.0, 0.0), ('bfloat16', 0.9, 1.0)):
        model = build(config.model, dtype=dtype)
        jaxpr = jax.make_jaxpr(lambda p, b: model.apply({'params': p}, b))(params32, batch).jaxpr
        flops = matmul_flops(jaxpr)
        share = flops.get('bfloat16', 0) / sum(flops.values())
        assert low <= share <= high, (dtype, flops)


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_outputs_are_near_float32(name, models):
    out32, out16 = models[name][4]['float32'], models[name][4]['bfloat16']
    for key in ('cls_scores', 'bbox_preds'):
        ref, got = np.asarray(out32[key]), np.asarray(out16[key])
        rel = np.abs(got - ref).mean() / np.abs(ref).mean()
        assert 1e-5 < rel < 2e-2, (key, rel)   # bfloat16 did run, and stayed close


def test_sampling_locations_are_computed_in_float32():
    """The offsets Linear runs in float32: with inputs exact in bfloat16 the bfloat16 module's sampling locations
    equal the float32 module's to float32 rounding (a bfloat16 Linear would be ~1e-3 off)."""
    rng = np.random.default_rng(0)
    query = jnp.asarray(rng.normal(size=(1, 7, 32)), jnp.bfloat16).astype(jnp.float32)
    value = jnp.asarray(rng.normal(size=(1, 6 * 10, 32)), jnp.float32)
    reference = jnp.asarray(rng.uniform(size=(1, 7, 1, 2)), jnp.float32)
    module32 = MSDeformableAttention(32, 4, 1, 4, 0.0)
    params = module32.init(jax.random.PRNGKey(0), query, value, reference, ((6, 10),))['params']
    params = jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype) * 0.3, params)
    _, aux32 = module32.apply({'params': params}, query, value, reference, ((6, 10),))
    out16, aux16 = MSDeformableAttention(32, 4, 1, 4, 0.0, jnp.bfloat16).apply(
        {'params': params}, query.astype(jnp.bfloat16), value.astype(jnp.bfloat16), reference, ((6, 10),))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(aux16['sampling_locations'], aux32['sampling_locations'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux16['attention_weights'], aux32['attention_weights'], rtol=1e-5, atol=1e-7)


def test_an_unknown_dtype_is_refused_naming_the_key():
    config, _ = toy('bevformer_tiny')
    config.model.dtype = 'float16'
    with pytest.raises(ConfigError, match=r'config\.model\.dtype'):
        validate.validate(config)


def residual_bytes(model, params, batch):
    """Bytes ``jax.vjp`` keeps for the backward pass of a loss on the model's outputs (abstract shapes)."""
    def loss(p):
        out = model.apply({'params': p}, batch)
        return out['cls_scores'].sum() + out['bbox_preds'].sum()
    leaves = jax.tree_util.tree_leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves)


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_halves_what_the_backward_pass_keeps(name, models):
    """The memory precision is for: the residuals kept for the backward pass shrink to at most 0.62x float32's
    (not 0.5x: softmax outputs, norm statistics, geometry and masks stay as they are). Fails when the attention
    weights or a block's activations stay float32."""
    config, batch, params32, _, _ = models[name]
    full, half = (residual_bytes(build(config.model, dtype=dtype), params32, batch) for dtype in ('float32', 'bfloat16'))
    assert half <= 0.62 * full, (half, full, half / full)


def test_self_attention_keeps_one_float32_copy_of_its_weights_and_equals_flax_in_float32():
    """Decoder self-attention (``attention_softmax_float32``): in float32 identical to flax's attention, dropout
    draw included; in bfloat16 the backward pass keeps one float32 (Q, Q) tensor per head-batch (the softmax's
    output), not flax's ``force_fp32_for_softmax`` float32 weights through dropout and the value product."""
    rng = np.random.default_rng(0)
    query, pos = (jnp.asarray(rng.normal(size=(1, 300, 32)), jnp.float32) for _ in range(2))
    rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
    ours = SelfAttention(32, 8, 0.1)
    params = ours.init(rngs, query, pos)['params']
    flax_attention = nn.MultiHeadDotProductAttention(num_heads=8, qkv_features=32, out_features=32, dropout_rate=0.1,
                                                     broadcast_dropout=False, deterministic=False)
    qk = query + pos
    expected = flax_attention.apply({'params': params['attn']}, qk, qk, query, rngs={'dropout': jax.random.PRNGKey(2)})
    got = nn.MultiHeadDotProductAttention(num_heads=8, qkv_features=32, out_features=32, dropout_rate=0.1,
                                          broadcast_dropout=False, deterministic=False,
                                          attention_fn=attention_softmax_float32).apply(
        {'params': params['attn']}, qk, qk, query, rngs={'dropout': jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

    half = SelfAttention(32, 8, 0.1, jnp.bfloat16)

    def loss(p):
        return half.apply({'params': p}, query.astype(jnp.bfloat16), pos.astype(jnp.bfloat16), deterministic=False,
                          rngs={'dropout': jax.random.PRNGKey(2)}).astype(jnp.float32).sum()
    kept = jax.tree_util.tree_leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
    square = [leaf.dtype for leaf in kept if leaf.shape[-2:] == (300, 300)]
    assert square.count(jnp.dtype(jnp.float32)) == 1, square
