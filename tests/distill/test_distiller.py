"""The distillation term of train_step (distill/distiller.py and the method modules) for every method, on the
toy pairs.

Most tests feed random model outputs of the right shapes (fast); one test per pair differentiates the
whole training loss through both real models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fd3d_detr3d_r101_to_r50
from fd3d_jax.distill import make_distiller
from fd3d_jax.distill.distiller import level_pairs
from fd3d_jax.errors import ConfigError
from fd3d_jax.models import build
from fd3d_jax.train.state import init_params
from fd3d_jax.train.train_step import make_loss_fn
from fd3d_jax.validate import validate
from tests.distill.conftest import toy_batch, toy_config

EXPECTED = {
    'fitnet': {'bevformer': {'distill/fitnet_bev', 'distill/fitnet_pv'}, 'detr3d': {'distill/fitnet_pv'}},
    'mgd': {'bevformer': {'distill/mgd_bev', 'distill/mgd_pv'}, 'detr3d': {'distill/mgd_pv'}},
    'heatmap': {'bevformer': {'distill/heatmap_bev', 'distill/cwd_pv'}, 'detr3d': {'distill/cwd_pv'}},
    'fd3d': {'bevformer': {'distill/gen_bev', 'distill/gen_pv', 'distill/focal'},
             'detr3d': {'distill/gen_pv', 'distill/focal'}},
}


@pytest.mark.parametrize('method', sorted(EXPECTED))
def test_every_method_gives_finite_nonzero_terms(fake, method):
    kind, batch, out, exp_out, exp_params = fake
    d = make_distiller(toy_config(kind, method))
    params = d.init(jax.random.PRNGKey(0), exp_params)
    loss, parts = jax.jit(d.loss)(params, exp_params, out, exp_out, batch, jax.random.PRNGKey(1))
    terms = {k for k in parts if k in EXPECTED[method][kind]}
    assert terms == EXPECTED[method][kind], sorted(parts)
    for k in terms:
        assert np.isfinite(float(parts[k])) and float(parts[k]) > 0, (k, parts[k])
    np.testing.assert_allclose(float(loss), sum(float(parts[k]) for k in terms), rtol=1e-5)


WEIGHT_KEYS = {'fitnet': {'fitnet_bev': 'fitnet.bev_weight', 'fitnet_pv': 'fitnet.pv_weight'},
               'mgd': {'mgd_bev': 'mgd.weight', 'mgd_pv': 'mgd.weight'},
               'heatmap': {'heatmap_bev': 'heatmap.bev_weight', 'cwd_pv': 'heatmap.cwd_weight'},
               'fd3d': {'gen_bev': 'generative.bev_weight', 'gen_pv': 'generative.pv_weight', 'focal': 'focal.weight'}}


@pytest.mark.parametrize('method', sorted(WEIGHT_KEYS))
def test_weights_are_applied_once_and_both_values_logged(fake, method):
    """``distill/<term>`` = weight x ``distill_unweighted/<term>`` (the weight from its config key), the loss is
    their sum, and a term of weight 0 is neither computed nor logged."""
    kind, batch, out, exp_out, exp_params = fake
    rng = jax.random.PRNGKey(1)
    plain = make_distiller(toy_config(kind, method))
    params = plain.init(jax.random.PRNGKey(0), exp_params)
    _, base = jax.jit(plain.loss)(params, exp_params, out, exp_out, batch, rng)
    config = toy_config(kind, method)
    terms = sorted(k.split('/')[1] for k in base if k.startswith('distill/'))
    assert terms == sorted(t for t in WEIGHT_KEYS[method] if f'distill/{t}' in EXPECTED[method][kind])
    scaled_keys = {WEIGHT_KEYS[method][t] for t in terms}
    for key in scaled_keys:
        section, name = key.split('.')
        config.distill[section][name] = 3.0 * config.distill[section][name]
    scaled = make_distiller(config)
    loss, parts = jax.jit(scaled.loss)(params, exp_params, out, exp_out, batch, rng)
    for term in terms:
        section, name = WEIGHT_KEYS[method][term].split('.')
        weight = config.distill[section][name]
        np.testing.assert_allclose(float(parts[f'distill_unweighted/{term}']), float(base[f'distill_unweighted/{term}']),
                                   rtol=1e-6)
        np.testing.assert_allclose(float(parts[f'distill/{term}']), weight * float(parts[f'distill_unweighted/{term}']),
                                   rtol=1e-5)
    np.testing.assert_allclose(float(loss), sum(float(parts[f'distill/{t}']) for t in terms), rtol=1e-5)
    if len(scaled_keys) > 1:   # one weight to 0: its term goes, the others stay
        key = sorted(scaled_keys)[0]
        section, name = key.split('.')
        config.distill[section][name] = 0.0
        _, parts = jax.jit(make_distiller(config).loss)(params, exp_params, out, exp_out, batch, rng)
        gone = {t for t in terms if WEIGHT_KEYS[method][t] == key}
        assert not any(f'distill/{t}' in parts or f'distill_unweighted/{t}' in parts for t in gone)
        assert all(f'distill/{t}' in parts for t in set(terms) - gone)


def test_fd3d_without_selected_queries_has_zero_generative_terms(fake):
    kind, batch, out, exp_out, exp_params = fake
    d = make_distiller(toy_config(kind, mask__select='score', mask__score_thresh=1.1, generative__area='instance',
                                  focal__queries='all'))
    params = d.init(jax.random.PRNGKey(0), exp_params)
    _, parts = jax.jit(d.loss)(params, exp_params, out, exp_out, batch, jax.random.PRNGKey(1))
    assert float(parts['distill_stats/selected']) == 0.0
    for k in ('distill/gen_bev', 'distill/gen_pv'):
        if k in parts:
            assert float(parts[k]) == 0.0
    assert float(parts['distill/focal']) > 0           # 'all' queries: the focal term does not depend on masks
    selected = make_distiller(toy_config(kind, mask__select='score', mask__score_thresh=1.1,
                                         generative__area='instance', focal__queries='selected'))
    _, parts = jax.jit(selected.loss)(params, exp_params, out, exp_out, batch, jax.random.PRNGKey(1))
    assert float(parts['distill/focal']) == 0.0        # 'selected' (the default): no query, no focal term
    # counted over the full map, the generative terms remain (the generator must still reproduce the map)
    full = make_distiller(toy_config(kind, mask__select='score', mask__score_thresh=1.1, generative__area='full'))
    _, parts = jax.jit(full.loss)(params, exp_params, out, exp_out, batch, jax.random.PRNGKey(1))
    assert all(float(parts[k]) > 0 for k in ('distill/gen_bev', 'distill/gen_pv') if k in parts)


@pytest.mark.parametrize('options', [dict(mask__mode='random', focal__source='generated', focal__queries='selected'),
                                     dict(mask__select='gt', generative__area='instance', mask__box_scale=1.5),
                                     dict(feature_norm='both')],
                         ids=['random-generated-selected', 'gt-instance-scaled', 'standardised'])
def test_fd3d_switches(fake, options):
    kind, batch, out, exp_out, exp_params = fake
    d = make_distiller(toy_config(kind, **options))
    params = d.init(jax.random.PRNGKey(0), exp_params)
    _, parts = jax.jit(d.loss)(params, exp_params, out, exp_out, batch, jax.random.PRNGKey(1))
    for k in EXPECTED['fd3d'][kind]:
        assert np.isfinite(float(parts[k])) and float(parts[k]) > 0, (k, parts[k])


def test_trained_head_gets_gradient_only_from_its_gt_loss(fake):
    kind, batch, out, exp_out, exp_params = fake
    d = make_distiller(toy_config(kind, head__train=True))
    params = d.init(jax.random.PRNGKey(0), exp_params)
    assert set(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)),
                                                                params['head'], exp_params['head']))) == {True}

    def terms(p):
        parts = d.loss(p, exp_params, out, exp_out, batch, jax.random.PRNGKey(1))[1]
        return jnp.stack([parts['distill/focal'], parts['distill/head']])

    g = jax.jit(jax.jacrev(terms))(params)['head']
    focal_leaves = [np.asarray(x)[0] for x in jax.tree_util.tree_leaves(g)]
    head_leaves = [np.asarray(x)[1] for x in jax.tree_util.tree_leaves(g)]
    assert not any(np.any(x) for x in focal_leaves)
    assert sum(float(np.abs(x).sum()) for x in head_leaves) > 0


def test_level_pairs_match_equal_sizes():
    assert level_pairs([(15, 25)], [(120, 200), (60, 100), (30, 50), (15, 25)]) == [(0, 3)]
    assert level_pairs([(6, 10), (3, 5), (2, 3)], [(12, 20), (6, 10), (3, 5)]) == [(0, 1), (1, 2)]
    assert level_pairs([(7, 7)], [(8, 8)]) == []


def test_mismatched_pairs_fail_with_the_config_keys():
    config = toy_config('bevformer')
    config.expert.model.bev_h = 12
    with pytest.raises(ConfigError, match='config.expert.model.bev_h'):
        validate(config)
    config.expert.model.bev_h, config.expert.model.bev_w = 24, 30     # x3: not a power of two
    with pytest.raises(ConfigError, match='power-of-two'):
        validate(config)
    config = toy_config('bevformer')
    config.expert.model = fd3d_detr3d_r101_to_r50.get_config('toy').expert.model
    with pytest.raises(ConfigError, match='same kind of detector'):
        validate(config)


@pytest.mark.parametrize('kind', ['bevformer', pytest.param('detr3d', marks=pytest.mark.slow)])
def test_gradients_of_the_training_loss(kind):
    """Through both real models: exactly zero for the expert (frozen head included), non-zero for the
    apprentice and for every distillation module."""
    config = toy_config(kind, generative__area='instance')
    d = make_distiller(config)
    batch = toy_batch(config)
    exp_params = jax.jit(lambda b: d.expert.init({'params': jax.random.PRNGKey(1)}, b)['params'])(d.expert_batch(batch))
    model = build(config.model)
    params = dict(model=init_params(model, batch, 0), distill=d.init(jax.random.PRNGKey(3), exp_params))
    loss_fn = make_loss_fn(model, config, d)
    (loss, parts), (g, g_exp) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        params, exp_params, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss)) and float(parts['loss_distill']) > 0
    assert not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(g_exp))
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(g['model'])) > 0
    for name, sub in g['distill'].items():
        assert sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(sub)) > 0, name
