"""FD3D's wiring, each test written to fail on a plausible broken variant: the mask polarity, the expert's
``lidar2img`` of the PV masks, the generative region, the focal target on the BEV (the expert's raw BEV against the
de-standardised apprentice), the BEV mask against BEVFormer's own reference points, the x2 upsampling, the
distiller's own stop-gradient on the expert, the expert in inference mode in a training step, the head copy, and
that distillation steps lower the distillation loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from fd3d_jax.distill import expert as expert_lib
from fd3d_jax.distill import losses, make_distiller, masks
from fd3d_jax.distill.focal import bev_focal_features
from fd3d_jax.models.box_coder import denormalize_bbox
from fd3d_jax.models.spatial_cross_attention import reference_points_2d
from fd3d_jax.train.loop import Trainer
from tests.distill.conftest import toy_batch, toy_config


def _boxes_and_keep(distiller, expert_out):
    cfg = distiller.distill_cfg
    cls_logits, code = expert_out['cls_scores'][-1], expert_out['bbox_preds'][-1]
    keep, _ = masks.select_queries(cls_logits, cfg.mask.select, cfg.mask.score_thresh, cfg.mask.topk)
    return denormalize_bbox(code), keep


def test_zero_mask_removes_the_region_and_keeps_the_rest(fake):
    kind, *_ = fake
    distiller = make_distiller(toy_config(kind))
    feats = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2) + 1.0
    region = jnp.zeros((2, 3, 4)).at[0, 1, 2].set(1.0).at[1, 0, 0].set(1.0)
    masked = np.asarray(distiller.masked(feats, region, jax.random.PRNGKey(0)))
    assert np.all(masked[0, 1, 2] == 0) and np.all(masked[1, 0, 0] == 0)
    keep = np.asarray(region) == 0
    np.testing.assert_array_equal(masked[keep], np.asarray(feats)[keep])


def test_pv_masks_use_the_lidar2img_of_the_upsampled_expert_images(fake):
    kind, batch, out, expert_out, expert_params = fake
    if kind != 'bevformer':
        pytest.skip('the DETR3D pair has no upsampling')
    distiller = make_distiller(toy_config(kind, mask__select='topk', generative__area='instance'))
    assert distiller.upsample == 2
    params = distiller.init(jax.random.PRNGKey(0), expert_params)
    _, parts = jax.jit(distiller.loss)(params, expert_params, out, expert_out, batch, jax.random.PRNGKey(1))
    boxes, keep = _boxes_and_keep(distiller, expert_out)
    feat_hws = [expert_out['img_feats'][level].shape[2:4] for _, level in distiller.pairs]
    scaled = batch['lidar2img'][:, -1] * np.asarray([2.0, 2.0, 1.0, 1.0], np.float32)[:, None]
    want = np.mean([np.mean(r) for r in masks.pv_box_mask(boxes, keep, scaled, distiller.expert_img_hw, feat_hws)])
    unscaled = np.mean([np.mean(r) for r in masks.pv_box_mask(boxes, keep, batch['lidar2img'][:, -1],
                                                               distiller.expert_img_hw, feat_hws)])
    assert want != unscaled         # the test can tell the two apart
    np.testing.assert_allclose(float(parts['distill_stats/mask_pv']), want, rtol=1e-6)


def test_generative_bev_term_counts_the_expert_grid_region_of_the_kept_boxes(fake):
    kind, batch, out, expert_out, expert_params = fake
    if kind != 'bevformer':
        pytest.skip('BEV term')
    distiller = make_distiller(toy_config(kind, mask__select='topk', generative__area='instance'))
    params = distiller.init(jax.random.PRNGKey(0), expert_params)
    _, parts = jax.jit(distiller.loss)(params, expert_params, out, expert_out, batch, jax.random.PRNGKey(1))
    feats = distiller.features(params, out, jax.lax.stop_gradient(expert_out))
    boxes, keep = _boxes_and_keep(distiller, expert_out)
    expert_cfg = distiller.expert_cfg
    region = masks.bev_box_mask(boxes, keep, (expert_cfg.bev_h, expert_cfg.bev_w), tuple(expert_cfg.pc_range))
    assert 0 < float(jnp.mean(region)) < 1
    generated = distiller.generate_bev(params, feats.apprentice_bev * (1.0 - region[..., None]))
    want = losses.generative_loss(generated, feats.expert_bev, region, 'instance')
    np.testing.assert_allclose(float(parts['distill_unweighted/gen_bev']), float(want), rtol=1e-5)
    outside = losses.generative_loss(generated, feats.expert_bev, 1.0 - region, 'instance')
    assert abs(float(outside) - float(want)) > 1e-3 * abs(float(want))   # the complement would be told apart


def test_focal_target_is_the_raw_expert_bev_against_the_destandardised_apprentice(fake):
    """With ``distill.feature_norm`` the focal term reads, through the expert's own ``value_proj``, the expert's raw
    BEV (what its decoder reads) and the apprentice's BEV mapped back to that scale (x std + mean of the raw BEV,
    per channel). The standardised expert BEV against the apprentice as it is (an earlier target) gives another
    value on an expert BEV far from zero mean and unit variance."""
    kind, batch, out, expert_out, expert_params = fake
    if kind != 'bevformer':
        pytest.skip('BEV focal term')
    distiller = make_distiller(toy_config(kind, feature_norm='expert', focal__queries='all'))
    expert_out = dict(expert_out, bev=expert_out['bev'] * 4.0 + 2.0)
    params = distiller.init(jax.random.PRNGKey(0), expert_params)
    _, parts = jax.jit(distiller.loss)(params, expert_params, out, expert_out, batch, jax.random.PRNGKey(1))
    apprentice = np.asarray(distiller.features(params, out, expert_out).apprentice_bev, np.float64)
    raw = np.asarray(expert_out['bev'], np.float64).reshape(apprentice.shape)
    mean, std = raw.mean((0, 1, 2)), np.sqrt(raw.var((0, 1, 2)) + 1e-5)

    def focal(apprentice_bev, expert_bev):
        pair = bev_focal_features(expert_params['head'], expert_out['sampling'], jnp.asarray(apprentice_bev, jnp.float32),
                                  jnp.asarray(expert_bev, jnp.float32), distiller.expert_cfg.num_heads)
        return float(losses.focal_loss(*pair))

    want = focal(apprentice * std + mean, raw)
    earlier = focal(apprentice, (raw - mean) / std)
    assert abs(earlier - want) > 0.1 * want, (earlier, want)   # the test tells the two targets apart
    np.testing.assert_allclose(float(parts['distill_unweighted/focal']), want, rtol=1e-4)


def test_bev_mask_cells_are_bevformers_query_cells():
    """A small box at the metric position of BEVFormer's reference point of query q marks exactly q
    (flat index row * W + col) on a non-square grid: a transposed or flipped grid marks another cell."""
    bev_h, bev_w = 6, 10
    pc_range = (-50.0, -30.0, -5.0, 50.0, 30.0, 3.0)
    reference = reference_points_2d(bev_h, bev_w)                  # (Q, 2) normalised (x, y)
    for query in (0, 7, 13, 42, bev_h * bev_w - 1):
        x = pc_range[0] + reference[query, 0] * (pc_range[3] - pc_range[0])
        y = pc_range[1] + reference[query, 1] * (pc_range[4] - pc_range[1])
        box = np.array([[[x, y, 0.0, 0.5, 0.5, 1.0, 0.3]]], np.float32)
        mask = np.asarray(masks.bev_box_mask(box, np.ones((1, 1)), (bev_h, bev_w), pc_range)).reshape(-1)
        assert np.flatnonzero(mask).tolist() == [query]


def test_expert_images_are_upsampled_like_torch_bilinear_without_corner_alignment():
    torch = pytest.importorskip('torch')
    data_cfg = common.data_config(toy=True)
    img = np.random.default_rng(0).normal(size=(1, 1, 2, 5, 7, 3)).astype(np.float32)
    batch = dict(img=jnp.asarray(img), lidar2img=jnp.tile(jnp.eye(4), (1, 1, 2, 1, 1)))
    got = np.asarray(expert_lib.expert_batch(batch, data_cfg, data_cfg, 2)['img'])
    nchw = torch.from_numpy(img.reshape(2, 5, 7, 3)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(nchw, scale_factor=2, mode='bilinear', align_corners=False)
    np.testing.assert_allclose(got.reshape(2, 10, 14, 3), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.parametrize('method', ['fd3d', 'heatmap'])
def test_the_distiller_itself_gives_the_expert_no_gradient(fake, method):
    """Without train_step's own stop_gradient: the loss's gradient reaches the apprentice, never the expert's
    outputs or params (the frozen head's params included). The stop-gradient is the shared ``Distiller.loss``'s;
    FD3D (head, masks, focal) and the heatmap baseline (GT) have the most paths to the expert."""
    kind, batch, out, expert_out, expert_params = fake
    distiller = make_distiller(toy_config(kind, method))
    params = distiller.init(jax.random.PRNGKey(0), expert_params)

    def total(apprentice_out, expert_outputs, expert_weights):
        return distiller.loss(params, expert_weights, apprentice_out, expert_outputs, batch, jax.random.PRNGKey(1))[0]

    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2), allow_int=True))(out, expert_out, expert_params)
    norm = lambda tree: sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(tree)  # noqa: E731
                            if jnp.issubdtype(x.dtype, jnp.floating))
    assert norm(grads[0]['img_feats']) > 0
    assert norm(grads[1]) == 0 and norm(grads[2]) == 0


def test_the_expert_runs_in_inference_mode_in_a_training_step():
    """The expert's outputs inside a training step are those of a deterministic apply, the same at two steps (two
    step rngs): the toy expert has dropout and GridMask, so an expert run in training mode (``deterministic=False``)
    would give other targets at every step. The distiller's ``loss`` is wrapped to report the expert outputs it
    receives. (The DETR3D pair with FitNet: the cheapest step that runs the expert.)"""
    config = toy_config('detr3d', 'fitnet', log_grad_norms=False)
    assert config.expert.model.dropout > 0 and config.expert.model.grid_mask
    config.train.update(batch_size=1, num_steps=2)
    distiller = make_distiller(config)
    batch = toy_batch(config)
    # a random expert and its outputs in inference mode, from one compiled function
    want, expert_variables = jax.jit(lambda b: distiller.expert.init_with_output(
        {'params': jax.random.PRNGKey(4)}, distiller.expert_batch(b), deterministic=True))(batch)
    expert_params = expert_variables['params']
    loss = distiller.loss

    def reporting_loss(params, expert_params, out, expert_out, batch, rng):
        total, metrics = loss(params, expert_params, out, expert_out, batch, rng)
        return total, dict(metrics, **{'probe/fpn': jnp.sum(jnp.abs(expert_out['img_feats'][0])),
                                       'probe/cls': jnp.sum(jnp.abs(expert_out['cls_scores'][-1]))})

    distiller.loss = reporting_loss
    trainer = Trainer(config, num_train_samples=2, distiller=distiller, expert_params=expert_params)
    steps = [jax.device_get(trainer.step(batch)) for _ in range(2)]
    for step in steps:
        np.testing.assert_allclose(step['probe/fpn'], float(jnp.sum(jnp.abs(want['img_feats'][0]))), rtol=1e-5)
        np.testing.assert_allclose(step['probe/cls'], float(jnp.sum(jnp.abs(want['cls_scores'][-1]))), rtol=1e-5)


def test_trainer_starts_the_apprentice_head_from_the_expert(fake):
    kind, batch, out, expert_out, expert_params = fake
    config = toy_config(kind)
    config.train.update(batch_size=1, num_steps=1)
    distiller = make_distiller(config)
    trainer = Trainer(config, num_train_samples=1, distiller=distiller, expert_params=expert_params)
    head = jax.device_get(trainer.state.params['model']['head'])
    flat_head = jax.tree_util.tree_leaves_with_path(head)
    expert_head = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(expert_params['head'])))
    copied = [path for path, leaf in flat_head
              if path in expert_head and np.shape(expert_head[path]) == np.shape(leaf)]
    assert copied and trainer.head_copy['copied_leaves'] == len(copied)
    assert trainer.head_copy['leaves'] == len(flat_head)
    if kind == 'bevformer':   # same head widths: all of it; the DETR3D toy pair (48 vs 32 wide): a few biases
        assert len(copied) == len(flat_head)
    for path, leaf in flat_head:
        if path in copied:
            np.testing.assert_array_equal(leaf, expert_head[path])
    config.distill.init_apprentice_head = False
    fresh = Trainer(config, num_train_samples=1, distiller=distiller, expert_params=expert_params)
    assert fresh.head_copy is None
    leaf = jax.device_get(fresh.state.params['model']['head'])
    assert any(not np.array_equal(a, expert_head[p]) for p, a in jax.tree_util.tree_leaves_with_path(leaf))


@pytest.mark.parametrize('method', ['fd3d', 'mgd'])
def test_a_few_distillation_steps_lower_the_distillation_loss(fake, method):
    """Adam on the distillation modules and the apprentice's features (the expert fixed): 60 steps at least
    halve the loss. A missing gradient path or a sign error would not."""
    kind, batch, out, expert_out, expert_params = fake
    distiller = make_distiller(toy_config(kind, method))
    params = distiller.init(jax.random.PRNGKey(0), expert_params)
    features = {k: out[k] for k in ('img_feats', 'bev') if k in out}
    tx = optax.adam(0.01)
    state = (params, features)
    opt_state = tx.init(state)

    def loss(state):
        distill_params, feats = state
        return distiller.loss(distill_params, expert_params, dict(out, **feats), expert_out, batch,
                              jax.random.PRNGKey(1))[0]

    @jax.jit
    def step(state, opt_state):
        value, grads = jax.value_and_grad(loss)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, value

    first = None
    for _ in range(60):
        state, opt_state, value = step(state, opt_state)
        first = float(value) if first is None else first
    assert float(loss(state)) < 0.5 * first, (first, float(loss(state)))
