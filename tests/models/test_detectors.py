import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd3d_jax.detection import losses
from fd3d_jax.models import box_coder, detr3d
from fd3d_jax.models.bevformer import original_can_bus
from fd3d_jax.models.decoder import SelfAttention
from fd3d_jax.models import build
from fd3d_jax.models.inputs import dummy_batch
from tests.models import numpy_reference as ref
from tests.models.test_spatial_cross_attention import randomize, rig_lidar2img

CONFIGS = ['bevformer_tiny', 'bevformer_small', 'bevformer_base', 'detr3d_r50', 'detr3d_r101']


def toy_config(name):
    return importlib.import_module(f'configs.{name}').get_config('toy')


@pytest.fixture(scope='module')
def toy_models():
    out = {}
    for name in CONFIGS:
        config = toy_config(name)
        model = build(config.model)
        batch = dummy_batch(config, batch_size=2)
        params = jax.jit(model.init)({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}, batch)['params']
        out[name] = (config, model, params, batch)
    return out


@pytest.mark.parametrize('name', CONFIGS)
def test_toy_config_runs_and_compiles_once(name, toy_models):
    config, model, params, batch = toy_models[name]
    traces = []

    @jax.jit
    def forward(p, b, rng):
        traces.append(1)
        return model.apply({'params': p}, b, deterministic=False, rngs={'dropout': rng})

    out = forward(params, batch, jax.random.PRNGKey(2))
    batch2 = dict(batch, img=batch['img'] + 1.0)
    out2 = forward(params, batch2, jax.random.PRNGKey(3))
    assert len(traces) == 1
    m = config.model
    assert out['cls_scores'].shape == (m.decoder_layers, 2, m.num_query, m.num_classes)
    assert out['bbox_preds'].shape == (m.decoder_layers, 2, m.num_query, box_coder.CODE_SIZE)
    assert out['queries'].shape == (m.decoder_layers, 2, m.num_query, m.embed_dims)
    assert out['references'].shape == (m.decoder_layers + 1, 2, m.num_query, 3)
    assert len(out['img_feats']) == m.num_levels
    assert [f.shape[2:4] for f in out['img_feats']] == [(6, 10), (3, 5), (2, 3)]
    if build(m).has_bev:
        assert out['bev'].shape == (2, m.bev_h * m.bev_w, m.embed_dims)
    assert np.isfinite(np.asarray(out['cls_scores'])).all() and np.isfinite(np.asarray(out2['bbox_preds'])).all()
    assert not np.allclose(np.asarray(out['cls_scores']), np.asarray(out2['cls_scores']))


def test_decoder_refinement_and_stop_gradient(toy_models):
    config, model, params, batch = toy_models['bevformer_tiny']
    out = jax.jit(model.apply)({'params': params}, batch)
    refs, preds = np.asarray(out['references']), np.asarray(out['bbox_preds'])
    pc = config.model.pc_range
    # reference of layer l+1 = the centre predicted by layer l, normalised back to [0, 1]
    np.testing.assert_allclose(refs[1:, ..., 0], (preds[..., 0] - pc[0]) / (pc[3] - pc[0]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(refs[1:, ..., 1], (preds[..., 1] - pc[1]) / (pc[4] - pc[1]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(refs[1:, ..., 2], (preds[..., 4] - pc[2]) / (pc[5] - pc[2]), rtol=1e-4, atol=1e-5)

    @jax.jit
    def grads(p):
        refs = lambda p: model.apply({'params': p}, batch)['references']  # noqa: E731
        return jax.grad(lambda p: refs(p)[1:].sum())(p), jax.grad(lambda p: refs(p)[0].sum())(p)
    g_later, g_first = grads(params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(g_later))
    assert np.any(np.asarray(g_first['head']['reference_points']['kernel']))


def test_bevformer_history_frames_carry_no_gradient(toy_models):
    """Only the last frame of the queue gets gradients: images of history frames do not."""
    config, model, params, batch = toy_models['bevformer_tiny']
    batch = dict(batch, prev_bev_exists=np.ones_like(batch['prev_bev_exists']))

    def f(img, p):
        return model.apply({'params': p}, dict(batch, img=img))['cls_scores'].sum()
    g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(batch['img']), params))
    assert not np.any(g[:, :-1]) and np.any(g[:, -1])
    # ... but the history does change the output when a previous BEV exists
    no_hist = dict(batch, prev_bev_exists=np.zeros_like(batch['prev_bev_exists']))
    bev = jax.jit(lambda p, b: model.apply({'params': p}, b)['bev'])
    a, b = bev(params, batch), bev(params, no_hist)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_detr3d_cross_attention_matches_numpy():
    c, n, lv = 8, 6, 2
    shapes = ((6, 10), (3, 5))
    img_hw = (96, 160)
    rng = np.random.default_rng(0)
    l2i = rig_lidar2img()
    feats = [rng.normal(size=(1, n, h, w, c)).astype(np.float32) for h, w in shapes]
    query = rng.normal(size=(1, 12, c)).astype(np.float32)
    pos = rng.normal(size=(1, 12, c)).astype(np.float32)
    refs = rng.uniform(0.3, 0.7, (1, 12, 3)).astype(np.float32)
    module = detr3d.Detr3DCrossAttention(img_hw, c, n, lv)
    ctx = dict(feats=feats, lidar2img=jnp.asarray(l2i[None], jnp.float32))
    params = randomize(module.init(jax.random.PRNGKey(0), query, pos, refs, ctx)['params'])
    out, sampling = module.apply({'params': params}, query, pos, refs, ctx)
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    q = (query + pos)[0].astype(np.float64)
    w = 1 / (1 + np.exp(-ref.dense(q, p['attention_weights']).reshape(12, n, lv)))
    pc = np.array(detr3d.Detr3DCrossAttention.pc_range)
    pts = refs[0] * (pc[3:] - pc[:3]) + pc[:3]
    want = np.zeros((12, c))
    for cam in range(n):
        hom = np.concatenate([pts, np.ones((12, 1))], 1) @ l2i[cam].T
        uv = hom[:, :2] / np.maximum(hom[:, 2:3], 1e-5) / [img_hw[1], img_hw[0]]
        mask = (hom[:, 2] > 1e-5) & np.all((2 * uv - 1 > -1) & (2 * uv - 1 < 1), 1)
        for qi in range(12):
            for l, (h, wd) in enumerate(shapes):
                s = ref.bilinear_sample(feats[l][0, cam].astype(np.float64), uv[qi, 1] * h - 0.5, uv[qi, 0] * wd - 0.5)
                want[qi] += w[qi, cam, l] * mask[qi] * s
    want = ref.dense(want, p['output_proj'])
    x = np.log(np.clip(refs[0], 1e-5, None) / np.clip(1 - refs[0], 1e-5, None))
    for i in range(2):
        x = ref.dense(x, p[f'position_encoder_fc{i}'])
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        x = np.maximum(x * p[f'position_encoder_norm{i}']['scale'] + p[f'position_encoder_norm{i}']['bias'], 0)
    want = want + query[0] + x
    np.testing.assert_allclose(np.asarray(out[0]), want, rtol=2e-4, atol=2e-4)
    assert np.asarray(sampling['mask']).any()


def test_pillar_anchors_span_the_range_height():
    """The pillar anchors cover ``pc_range[5] - pc_range[2]`` (the original's Z), not a fixed 8 m: with a 6 m
    range the world heights are ``z_min + linspace(0.5, Z - 0.5, D)``."""
    config = toy_config('bevformer_tiny')
    other_range = config.model.copy_and_resolve_references()     # the fixture's config stays as it is
    other_range.pc_range = (-51.2, -51.2, -4.0, 51.2, 51.2, 2.0)
    model = build(other_range)
    z = model.pillar_points()[:, 0, 2] * 6.0 - 4.0
    np.testing.assert_allclose(z, -4.0 + np.linspace(0.5, 5.5, config.model.num_points_in_pillar), atol=1e-5)


def test_prev_bev_batch0_quirk(toy_models):
    """``prev_bev_batch0``: element 0's ``prev_bev_exists`` decides for the whole batch (the original's
    ``img_metas[0]``); off, each element follows its own flag."""
    config, model, params, batch = toy_models['bevformer_tiny']
    quirk_config = config.model.copy_and_resolve_references()
    quirk_config.prev_bev_batch0 = True
    quirk = build(quirk_config)
    exists = np.ones_like(batch['prev_bev_exists'])
    exists[:, 0] = False
    own_1_off = exists.copy()
    own_1_off[1, -1] = False                       # element 1 has no previous BEV, element 0 has one
    jitted = {id(mdl): jax.jit(lambda p, b, mdl=mdl: mdl.apply({'params': p}, b)['bev']) for mdl in (model, quirk)}
    bev = lambda mdl, b: jitted[id(mdl)](params, b)  # noqa: E731
    fixed = np.asarray(bev(model, dict(batch, prev_bev_exists=own_1_off)))
    quirky = np.asarray(bev(quirk, dict(batch, prev_bev_exists=own_1_off)))
    all_on = np.asarray(bev(model, dict(batch, prev_bev_exists=exists)))
    np.testing.assert_allclose(quirky[0], fixed[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quirky[1], all_on[1], rtol=1e-5, atol=1e-5)   # follows element 0: exists
    assert not np.allclose(fixed[1], all_on[1], atol=1e-4)
    own_0_off = exists.copy()
    own_0_off[0, -1] = False                       # element 0 has none: the whole batch has none
    all_off = exists.copy()
    all_off[:, -1] = False
    np.testing.assert_allclose(np.asarray(bev(quirk, dict(batch, prev_bev_exists=own_0_off)))[1],
                               np.asarray(bev(model, dict(batch, prev_bev_exists=all_off)))[1], rtol=1e-5, atol=1e-5)


# An ego pose of nuScenes v1.0-mini (ego_pose 37091c75b9704e0daa829ba56dfa0906: RADAR_FRONT of the first sample
# of scene-0061), as the devkit's schema documentation lists it.
MINI_EGO_ROTATION = (0.5721129977125774, -0.0014962022442161157, 0.011922678049447764, -0.8200867813684729)
MINI_EGO_TRANSLATION = (411.25243634487725, 1180.7511754315697, 0.0)


def official_can_bus_slots(rotation, translation):
    """can_bus[0:7] as the original's ``CustomNuScenesDataset.get_data_info`` fills it, run literally: a
    pyquaternion ``Quaternion`` assigned to a numpy slice."""
    from pyquaternion import Quaternion   # the devkit's dependency
    can_bus = np.zeros(18)
    can_bus[:3] = translation
    can_bus[3:7] = Quaternion(rotation)
    return can_bus[:7]


@pytest.mark.parametrize('sign', [1.0, -1.0])   # -q: the same rotation, the sign a table may hold
def test_reproduce_can_bus_bug_feeds_what_the_original_fed(sign, toy_models):
    """The records hold the table's quaternion in can_bus[3:7]; ``original_can_bus`` turns it into the original's
    [w, w, w, w] (checked against the original statement on a real pose), and ``model.reproduce_can_bus_bug``
    makes the model see exactly that: its BEV equals the plain model's on the [w, w, w, w] input and differs from
    it on the true quaternion (the can_bus MLP is added to every BEV query)."""
    rotation = sign * np.asarray(MINI_EGO_ROTATION)
    official = official_can_bus_slots(rotation, MINI_EGO_TRANSLATION)
    assert np.allclose(official[3:7], rotation[0])   # numpy broadcasts float(q) = w
    record_vector = np.zeros(18)
    record_vector[:3], record_vector[3:7] = MINI_EGO_TRANSLATION, rotation
    fed = np.asarray(original_can_bus(jnp.asarray(record_vector, jnp.float32)))
    np.testing.assert_array_equal(fed[:7], official.astype(np.float32))
    np.testing.assert_array_equal(fed[7:], record_vector[7:])

    config, model, params, batch = toy_models['bevformer_tiny']
    quirk_config = config.model.copy_and_resolve_references()
    quirk_config.reproduce_can_bus_bug = True
    quirk = build(quirk_config)
    true_quaternion = np.array(batch['can_bus'])
    true_quaternion[..., 3:7] = rotation
    as_original = true_quaternion.copy()
    as_original[..., 3:7] = rotation[0]
    bev = lambda mdl, can_bus: np.asarray(jax.jit(lambda p, b: mdl.apply({'params': p}, b)['bev'])(  # noqa: E731
        params, dict(batch, can_bus=can_bus)))
    np.testing.assert_array_equal(bev(quirk, true_quaternion), bev(model, as_original))
    assert not np.allclose(bev(model, true_quaternion), bev(model, as_original), atol=1e-4)


def test_decoder_self_attention_init_matches_packed_torch_xavier(toy_models):
    """q/k/v kernels start as torch's xavier on the packed (3C, C) ``in_proj_weight`` (uniform, bound
    sqrt(6 / 4C)); the output kernel as xavier on (C, C) (bound sqrt(6 / 2C))."""
    channels = 256
    query = jnp.zeros((1, 4, channels))
    attn = SelfAttention(channels, 8).init(jax.random.PRNGKey(0), query, query)['params']['attn']
    for name, fan in (('query', 4 * channels), ('key', 4 * channels), ('value', 4 * channels), ('out', 2 * channels)):
        kernel = np.asarray(attn[name]['kernel']).reshape(-1)
        bound = np.sqrt(6.0 / fan)
        assert np.abs(kernel).max() <= bound + 1e-7, name
        np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.03, err_msg=name)


@pytest.mark.parametrize('name', ['bevformer_tiny', 'detr3d_r50'])
def test_a_batch_of_two_equals_two_batches_of_one(name, toy_models):
    """Batch > 1 on one device (the original's batch quirks off): each element's outputs are those of a batch of
    one, through the temporal queue (element 0 with a previous BEV, element 1 restarting mid-queue, other camera
    hits) and with a carried previous BEV; the loss is the batch's positive-weighted mean of the per-sample losses
    (the original sums ``num_pos`` over the batch)."""
    config, model, params, batch = toy_models[name]
    rng = np.random.default_rng(5)
    batch = {k: np.array(v) for k, v in batch.items()}
    batch['lidar2img'][1] = batch['lidar2img'][1][:, [0, 1, 2, 3, 5, 5]]
    batch['can_bus'] = rng.normal(size=batch['can_bus'].shape).astype(np.float32)
    num_frames = batch['prev_bev_exists'].shape[1]
    batch['prev_bev_exists'][:] = True
    batch['prev_bev_exists'][:, 0] = False
    if num_frames > 1:
        batch['prev_bev_exists'][1, -1] = False
    num_gt = 4
    batch['gt_boxes'][:, :num_gt] = np.concatenate([rng.uniform(-30, 30, (2, num_gt, 2)), rng.uniform(-1, 1, (2, num_gt, 1)),
                                                    rng.uniform(1, 4, (2, num_gt, 3)), rng.uniform(-3, 3, (2, num_gt, 3))], -1)
    batch['gt_labels'][:, :num_gt] = rng.integers(0, config.model.num_classes, (2, num_gt))
    batch['gt_mask'][:, :num_gt] = True
    batch['gt_mask'][1, num_gt - 1] = False
    carried = rng.normal(size=model.carried_shape(2)).astype(np.float32) if model.has_bev else None
    keys = ('cls_scores', 'bbox_preds', 'bev') if model.has_bev else ('cls_scores', 'bbox_preds')

    @jax.jit
    def run(p, b, prev):
        out = model.apply({'params': p}, b, prev_bev=prev)
        total, parts = losses.detection_loss(out, b, config.loss)
        return {k: out[k] for k in keys}, parts

    both, both_parts = run(params, batch, carried)
    singles = [run(params, {k: v[i:i + 1] for k, v in batch.items()}, None if carried is None else carried[i:i + 1])
               for i in range(2)]
    for i, (single, _) in enumerate(singles):
        for key in keys:
            axis = 1 if key in ('cls_scores', 'bbox_preds') else 0
            np.testing.assert_allclose(np.take(np.asarray(both[key]), [i], axis), np.asarray(single[key]),
                                       rtol=2e-4, atol=2e-4, err_msg=f'{key} of element {i}')
    counts = [float(parts['num_pos']) for _, parts in singles]
    assert counts == [num_gt, num_gt - 1] and float(both_parts['num_pos']) == sum(counts)
    for term in ('loss_cls', 'loss_bbox', 'd0.loss_cls'):
        want = sum(n * float(parts[term]) for n, (_, parts) in zip(counts, singles)) / sum(counts)
        np.testing.assert_allclose(float(both_parts[term]), want, rtol=1e-4, err_msg=term)


def test_sparse_spatial_cross_attention_model_equals_dense(toy_models):
    """``model.sca_max_cameras=2`` on the toy rig (no BEV query hits more than two cameras): the same params give
    the dense model's BEV and boxes, through the history frames and the current one."""
    config, model, params, batch = toy_models['bevformer_tiny']
    sparse_config = config.model.copy_and_resolve_references()
    sparse_config.sca_max_cameras = 2
    sparse = build(sparse_config)
    batch = dict(batch, prev_bev_exists=np.ones_like(batch['prev_bev_exists']))
    run = {id(mdl): jax.jit(lambda p, b, mdl=mdl: {k: mdl.apply({'params': p}, b)[k] for k in ('bev', 'bbox_preds')})
           for mdl in (model, sparse)}
    dense_out, sparse_out = run[id(model)](params, batch), run[id(sparse)](params, batch)
    for key in ('bev', 'bbox_preds'):
        np.testing.assert_allclose(np.asarray(sparse_out[key]), np.asarray(dense_out[key]), rtol=1e-4, atol=1e-4,
                                   err_msg=key)
