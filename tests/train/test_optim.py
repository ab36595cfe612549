import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.common import add_training
from fd3d_jax.models import build
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.train import optim

BASE = 2e-4


def make_config(frozen_stages=1, **optim_overrides):
    config = add_training(ml_collections.ConfigDict())
    config.model = ml_collections.ConfigDict({'backbone': {'frozen_stages': frozen_stages}})
    config.optim.update(optim_overrides)
    return config


def np_lr(step, spe=1000, num_steps=24000, by_epoch=True, base=BASE, min_ratio=1e-3, warmup=500, ratio=1 / 3):
    """mmcv CosineAnnealingLrUpdaterHook + linear warm-up, restated in float64."""
    eta_min = base * min_ratio
    progress, total = (step // spe, num_steps // spe) if by_epoch else (step, num_steps)
    lr = eta_min + 0.5 * (base - eta_min) * (1 + np.cos(np.pi * progress / total))
    if step < warmup:
        lr *= 1 - (1 - step / warmup) * (1 - ratio)
    return lr


@pytest.mark.parametrize('by_epoch', [True, False])
def test_lr_schedule(by_epoch):
    cfg = make_config(by_epoch=by_epoch).optim
    schedule = optim.lr_schedule(cfg, 1000, 24000)
    steps = np.array([0, 250, 499, 500, 999, 1000, 1500, 1999, 12000, 23999])
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)))
    want = np.array([np_lr(s, by_epoch=by_epoch) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[0], BASE / 3, rtol=1e-6)
    np.testing.assert_allclose(schedule(250), want[1], rtol=1e-6)  # python int step
    if by_epoch:  # warm-up ends at exactly the base lr, constant through epoch 0, halfway at E / 2
        np.testing.assert_allclose(got[1], BASE * (1 - 0.5 * (2 / 3)), rtol=1e-6)
        np.testing.assert_allclose(got[3:5], BASE, rtol=1e-6)
        assert got[5] == got[6] == got[7] < BASE
        np.testing.assert_allclose(got[8], 0.5 * (BASE + 1e-3 * BASE), rtol=1e-6)
    else:
        assert got[3] < BASE and got[5] > got[6] > got[7]


def test_num_train_steps():
    train = make_config().train
    assert optim.num_train_steps(train, 100) == 2400
    train.num_steps = 7
    assert optim.num_train_steps(train, 100) == 7


def tiny_params(rng):
    """A detector-like tree: ResNet stem / BN / stage 1 (frozen for frozen_stages=1) and stage 2
    (trainable backbone) under image_features/backbone, plus a neck and a head ('default')."""
    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)
    bn = lambda: {k: arr(4) for k in ('scale', 'bias', 'mean', 'var')}
    backbone = {'conv1': {'kernel': arr(3, 3, 2, 4)}, 'bn1': bn(),
                'layer1_0': {'conv1': {'kernel': arr(1, 1, 4, 4)}, 'bn1': bn()},
                'layer2_0': {'conv1': {'kernel': arr(1, 1, 4, 4)}, 'bn1': bn(), 'downsample_bn': bn()}}
    return {'image_features': {'backbone': backbone, 'neck': {'kernel': arr(1, 1, 4, 4)}},
            'head': {'kernel': arr(1, 1, 4, 4)}}


def np_adamw(p, grads, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW (amsgrad=False) over successive gradients, float64."""
    p = np.asarray(p, np.float64).copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        g = np.asarray(g, np.float64)
        p *= 1 - lr * wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
        p -= lr / (1 - b1 ** t) * m / denom
    return p


def run(tx, params, grads_seq):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    return params, state


def test_adamw_groups_and_backbone_lr():
    rng = np.random.default_rng(0)
    config = make_config(lr=1e-2, weight_decay=0.5, warmup_iters=4)
    params = tiny_params(rng)
    k = params['head']['kernel']  # same p and g for a default and a backbone leaf
    params['image_features']['backbone']['layer2_0']['conv1']['kernel'] = k
    grads_seq = []
    for _ in range(2):
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(0.01 * rng.normal(size=x.shape), jnp.float32),
                                   params)
        g['image_features']['backbone']['layer2_0']['conv1']['kernel'] = g['head']['kernel']
        grads_seq.append(g)
    tx, schedule = optim.make_optimizer(config, params, steps_per_epoch=10)
    new, _ = run(tx, params, grads_seq)

    lrs = [np_lr(s, spe=10, num_steps=240, base=1e-2, warmup=4) for s in (0, 1)]
    np.testing.assert_allclose([schedule(0), schedule(1)], lrs, rtol=1e-6)
    for path, mult in ((('head',), 1.0), (('image_features', 'neck'), 1.0),
                       (('image_features', 'backbone', 'layer2_0', 'conv1'), 0.1)):
        get = lambda tree: _at(tree, path + ('kernel',))  # noqa: E731
        want = np_adamw(get(params), [get(g) for g in grads_seq], [mult * lr for lr in lrs], wd=0.5)
        np.testing.assert_allclose(np.asarray(get(new)) - np.asarray(get(params)),
                                   want - np.asarray(get(params), np.float64), rtol=1e-4, atol=5e-7)
    # one step: the backbone leaf moves by exactly backbone_lr_mult x the default leaf's step
    new, _ = run(tx, params, grads_seq[:1])
    d_head = np.asarray(new['head']['kernel'] - k)
    d_bb = np.asarray(new['image_features']['backbone']['layer2_0']['conv1']['kernel'] - k)
    np.testing.assert_allclose(d_bb, 0.1 * d_head, rtol=1e-3, atol=1e-8)


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _keys(path):
    return tuple(getattr(p, 'key', None) for p in path if hasattr(p, 'key'))


def test_frozen_leaves_unchanged_and_stateless():
    rng = np.random.default_rng(1)
    config = make_config(frozen_stages=1)
    params = tiny_params(rng)
    grads = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), params)
    tx, _ = optim.make_optimizer(config, params, steps_per_epoch=10)
    new, state = run(tx, params, [grads, grads])

    labels = optim.param_labels(params, config.model)
    param_paths = {_keys(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}
    assert {l for l in param_paths.values()} == {'default', 'backbone', 'frozen'}
    # multi_transform keeps each group's state under its label: ('default', 'head', 'kernel')
    state_paths = {_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}
    for path, label in param_paths.items():
        p0, p1 = _at(params, path), _at(new, path)
        if label == 'frozen':
            np.testing.assert_array_equal(p0, p1)
            assert not any(s[-len(path):] == path for s in state_paths)
        else:
            assert not np.allclose(p0, p1)
            assert (label,) + path in state_paths  # mu and nu
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(state) if jnp.ndim(x) > 0)
    trainable_size = sum(_at(params, p).size for p, l in param_paths.items() if l != 'frozen')
    assert state_size == 2 * trainable_size


def test_clipping_ignores_frozen_grads():
    rng = np.random.default_rng(2)
    config = make_config(eps=1.0, grad_clip=35.0)  # eps=1: Adam's first step depends on |g|
    params = tiny_params(rng)
    labels = optim.param_labels(params, config.model)
    tx, _ = optim.make_optimizer(config, params, steps_per_epoch=10)
    grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    grads = jax.tree_util.tree_map(lambda g, l: jnp.zeros_like(g) if l == 'frozen' else g, grads, labels)
    norm = float(optax_global_norm(grads))
    grads = jax.tree_util.tree_map(lambda g: g * (350.0 / norm), grads)  # trainable norm 350 -> x0.1
    huge = jax.tree_util.tree_map(lambda g, l: jnp.full_like(g, 1e6) if l == 'frozen' else g, grads, labels)
    clipped = jax.tree_util.tree_map(lambda g: g * 0.1, grads)

    def first_update(g):
        return tx.update(g, tx.init(params), params)[0]

    u_huge, u_plain, u_clipped = first_update(huge), first_update(grads), first_update(clipped)
    for a, b, c in zip(*map(jax.tree_util.tree_leaves, (u_huge, u_plain, u_clipped))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-12)


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize('name', ['bevformer_tiny', 'detr3d_r50'])
def test_param_labels_on_toy_models(name):
    config = importlib.import_module(f'configs.{name}').get_config('toy')
    config.model.backbone.frozen_stages = 1
    key = jax.random.PRNGKey(0)
    model = build(config.model)
    init = lambda b: model.init({'params': key, 'dropout': key}, b)  # noqa: E731
    params = jax.eval_shape(init, dummy_batch(config))['params']
    labels = optim.param_labels(params, config.model)
    backbone = labels['image_features']['backbone']
    flat = {_keys(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}
    for path, label in flat.items():
        if path[:2] != ('image_features', 'backbone'):
            assert label == 'default', path
            continue
        sub = path[2:]
        is_bn = any(k.startswith('bn') or k == 'downsample_bn' for k in sub)
        frozen = is_bn or sub[0] in ('conv1', 'bn1') or sub[0].startswith('layer1_')
        assert label == ('frozen' if frozen else 'backbone'), path
    assert backbone['bn1'] == {k: 'frozen' for k in ('bias', 'mean', 'scale', 'var')}
    assert backbone['conv1']['kernel'] == 'frozen'
    assert backbone['layer2_0']['conv1']['kernel'] == 'backbone'
    assert backbone['layer2_0']['bn1']['scale'] == 'frozen'
    assert set(flat.values()) == {'default', 'backbone', 'frozen'}
    # the training state's params {'model': ..., 'distill': ...} are labelled the same way
    wrapped = optim.param_labels(dict(model=params, distill={'w': params['head']}), config.model)
    assert wrapped['model'] == labels
    assert set(jax.tree_util.tree_leaves(wrapped['distill'])) == {'default'}
    # the optimiser initialises on the abstract tree and holds 2 moments per trainable element only
    tx, _ = optim.make_optimizer(config, params, steps_per_epoch=4)
    state = jax.eval_shape(tx.init, params)
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(state) if len(x.shape) > 0)
    trainable = sum(_at(params, p).size for p, l in flat.items() if l != 'frozen')
    assert state_size == 2 * trainable
