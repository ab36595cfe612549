"""``Distiller``: the distillation term of ``train_step`` for ``config.distill.method``.

``loss(params, expert_params, out, expert_out, batch, rng) -> (loss, parts)`` takes the apprentice's
and the (stop-gradient) expert's model outputs and returns the weighted sum of the method's terms and
a dict ``distill/<name>`` of those terms (plus a few diagnostics that are not summed). Its own
trainable params (``params['distill']`` of the training state: aligners, BEV upsampler, generators,
optionally the distillation head) are made by ``init`` and never exported with the apprentice.

Methods (``config.distill``; what follows released facts and what is reconstructed is in each part's
docstring and in the README):
- ``fitnet``: 1x1 align + MSE on the BEV (upsampled to the expert's grid) and on the FPN levels the
  two models share (equal spatial size).
- ``mgd``: MGD with random spatial masks, its released detection defaults (alpha 2e-5, lambda 0.65,
  full-map sum / batch), on the same features.
- ``heatmap``: the released FocalDistiller baseline: CWD on the shared FPN levels (tau 2, weight 0.25
  each) + GT-Gaussian-heatmap-masked L2 on the BEV (weight 0.1).
- ``fd3d``: query-guided masked generative distillation on the BEV and the FPN levels + focal
  distillation at the distillation head's sampling points (``fd3d.md`` §2-§4, §8).

The distillation head is the expert's own head (same params: "initialised from the expert's head and
frozen"; its outputs come with the expert's forward at no extra cost), or, with
``distill.head.train``, a copy in ``params['distill']['head']`` trained with the GT Hungarian loss on
the stop-gradient expert features. Level pairs and sizes are found once from abstract shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.cli import ConfigError
from fd3d_jax.distill import heatmap as heatmap_lib
from fd3d_jax.distill import losses, masks
from fd3d_jax.distill.expert import expert_batch
from fd3d_jax.distill.focal import bev_focal_features, pv_focal_features
from fd3d_jax.distill.modules import Align, BEVUpsampler, Generator
from fd3d_jax.models.box_coder import denormalize_bbox
from fd3d_jax.models.build import build, build_head
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.train import matching
from fd3d_jax.train.losses import detection_loss

_sg = jax.lax.stop_gradient


def standardize(x, eps=1e-5):
    """BatchNorm without affine params, batch statistics (``distill.feature_norm``): per channel over
    all other axes. The released distiller offers ``bev_feats_norm='bn'`` on the expert BEV (its config
    sets None); without learned scale/shift it cannot be shrunk to fake a small loss."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.var(x, axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def level_pairs(app_hws, exp_hws):
    """[(apprentice level, expert level)] with equal (H, W), each apprentice level paired with the first
    expert level of its size. (With the released x2-upsampled expert input, e.g. BEVFormer-tiny's one
    C5 level at stride 32 pairs with BEVFormer-base's stride-64 level.)"""
    exp_hws = [tuple(hw) for hw in exp_hws]
    return [(a, exp_hws.index(tuple(hw))) for a, hw in enumerate(app_hws) if tuple(hw) in exp_hws]


class Distiller:
    def __init__(self, config, abstract_only=False):
        self.config = config
        self.cfg = cfg = config.distill
        self.method = cfg.method
        self.app_cfg, self.exp_cfg = config.model, config.expert.model
        if self.app_cfg.name != self.exp_cfg.name:
            raise ConfigError(f'config.model.name={self.app_cfg.name!r} and config.expert.model.name='
                             f'{self.exp_cfg.name!r}: apprentice and expert must be the same kind of detector')
        self.is_bev = self.app_cfg.name == 'bevformer'
        self.expert = build(self.exp_cfg)
        self.upsample = int(cfg.expert_upsample)
        batch = dummy_batch(config, 1, queue_length=1)
        if self.exp_cfg.name == 'bevformer' and 'expert_bev_rot_index' not in batch:  # method 'none'
            q = self.exp_cfg.bev_h * self.exp_cfg.bev_w
            batch.update(expert_bev_shift=np.zeros((1, 1, 2), np.float32),
                         expert_bev_rot_index=np.arange(q, dtype=np.int32)[None, None],
                         expert_bev_rot_valid=np.ones((1, 1, q), bool))
        rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(0)}
        out_a = jax.eval_shape(lambda b: build(self.app_cfg).init_with_output(rngs, b)[0], batch)
        out_e, var_e = jax.eval_shape(lambda b: self.expert.init_with_output(rngs, self.expert_batch(b)), batch)
        self.expert_abstract_params = var_e['params']
        if abstract_only:
            return
        self.exp_img_hw = tuple(jax.eval_shape(self.expert_batch, batch)['img'].shape[-3:-1])
        app_hws = [f.shape[2:4] for f in out_a['img_feats']]
        exp_hws = [f.shape[2:4] for f in out_e['img_feats']]
        self.pairs = level_pairs(app_hws, exp_hws)
        self.pv_c = [out_e['img_feats'][e].shape[-1] for _, e in self.pairs]
        self.num_exp_levels = len(exp_hws)
        if self.method != 'none' and not self.pairs and not self.is_bev:
            raise ValueError(f'no FPN level of the apprentice {app_hws} has the size of one of the expert '
                             f'{exp_hws} (check config.distill.expert_upsample and the image scales)')
        if self.is_bev:
            a, e = self.app_cfg, self.exp_cfg
            self.bev_c = e.embed_dims
            self.factor = e.bev_h // a.bev_h
            if (e.bev_h != self.factor * a.bev_h or e.bev_w != self.factor * a.bev_w
                    or self.factor & (self.factor - 1)):
                raise ValueError(f'the expert BEV {e.bev_h}x{e.bev_w} must be a power-of-two multiple of the '
                                 f'apprentice BEV {a.bev_h}x{a.bev_w} (config.expert.model.bev_h/bev_w, '
                                 f'config.model.bev_h/bev_w)')

    # -- inputs and params ----------------------------------------------------------------------
    def expert_batch(self, batch):
        return expert_batch(batch, self.config.data, self.config.expert, self.upsample)

    def _gen_bev(self):
        c = self.cfg
        return self.is_bev and self.method in ('mgd', 'fd3d') and (
            self.method == 'mgd' or c.generative.bev_weight > 0 or (c.focal.weight > 0 and c.focal.source == 'generated'))

    def _gen_pv(self):
        c = self.cfg
        return self.method == 'mgd' or (self.method == 'fd3d' and (c.generative.pv_weight > 0 or (
            not self.is_bev and c.focal.weight > 0 and c.focal.source == 'generated')))

    def init(self, rng, expert_params):
        """The trainable distillation params (PyTorch default init)."""
        keys = iter(jax.random.split(rng, 4 + 2 * len(self.pairs)))
        params = {}

        def add(name, module, x):
            variables = module.init(next(keys), x)
            if variables.get('params'):
                params[name] = variables['params']

        a = self.app_cfg
        if self.is_bev:
            add('bev_align', Align(self.bev_c), jnp.zeros((1, 2, 2, a.embed_dims)))
            if self.factor > 1:
                add('bev_up', BEVUpsampler(self.bev_c, self.factor), jnp.zeros((1, 2, 2, self.bev_c)))
            if self._gen_bev():
                add('bev_gen', Generator(self.bev_c), jnp.zeros((1, 4, 4, self.bev_c)))
        app_pv_c = a.neck.out_channels
        for k, c in enumerate(self.pv_c):
            add(f'pv_align_{k}', Align(c), jnp.zeros((1, 2, 2, app_pv_c)))
            if self._gen_pv():
                add(f'pv_gen_{k}', Generator(c), jnp.zeros((1, 4, 4, c)))
        if self.method == 'fd3d' and self.cfg.head.train:
            params['head'] = jax.tree_util.tree_map(jnp.array, expert_params['head'])
        return params

    @staticmethod
    def _apply(params, name, module, x):
        return module.apply({'params': params[name]}, x) if name in params else module.apply({}, x)

    # -- the loss ---------------------------------------------------------------------------------
    def loss(self, params, expert_params, out, expert_out, batch, rng):
        params = params or {}
        expert_out = _sg(expert_out)
        b = batch['img'].shape[0]
        feats = {}
        if self.is_bev:
            a, e = self.app_cfg, self.exp_cfg
            feats['bev_t'] = expert_out['bev'].reshape(b, e.bev_h, e.bev_w, e.embed_dims)
            s = self._apply(params, 'bev_align', Align(self.bev_c), out['bev'].reshape(b, a.bev_h, a.bev_w, a.embed_dims))
            feats['bev_s'] = self._apply(params, 'bev_up', BEVUpsampler(self.bev_c, self.factor), s) if self.factor > 1 else s
        feats['pv_t'] = [expert_out['img_feats'][e] for _, e in self.pairs]
        norm = self.cfg.feature_norm
        if norm not in ('none', 'expert', 'both'):
            raise ConfigError(f"config.distill.feature_norm must be 'none', 'expert' or 'both', got {norm!r}")
        if norm != 'none':
            feats['pv_t'] = [standardize(t) for t in feats['pv_t']]
            if self.is_bev:
                feats['bev_t'] = standardize(feats['bev_t'])
        app_pv = [out['img_feats'][a] for a, _ in self.pairs]
        if norm == 'both':  # the apprentice's FPN levels too, before they are aligned
            app_pv = [standardize(x) for x in app_pv]
        feats['pv_s'] = [self._apply(params, f'pv_align_{k}', Align(c), x)
                         for k, (x, c) in enumerate(zip(app_pv, self.pv_c))]
        fn = dict(fitnet=self._fitnet, mgd=self._mgd, heatmap=self._heatmap, fd3d=self._fd3d)[self.method]
        terms, diagnostics = fn(params, expert_params, feats, expert_out, batch, rng)
        total = sum(terms.values()) if terms else jnp.zeros((), jnp.float32)
        return total, {**terms, **diagnostics}

    def _fitnet(self, params, expert_params, f, expert_out, batch, rng):
        c, terms = self.cfg.fitnet, {}
        if self.is_bev and c.bev_weight:
            terms['distill/fitnet_bev'] = c.bev_weight * losses.fitnet_loss(f['bev_s'], f['bev_t'])
        if self.pairs and c.pv_weight:
            terms['distill/fitnet_pv'] = c.pv_weight * sum(
                losses.fitnet_loss(s, t) for s, t in zip(f['pv_s'], f['pv_t']))
        return terms, {}

    def _mgd(self, params, expert_params, f, expert_out, batch, rng):
        """MGD (yzd-v/MGD): generator(align(S) * random mask) vs T, sum / batch, x alpha, per feature."""
        c, terms = self.cfg.mgd, {}
        keys = iter(jax.random.split(rng, 1 + len(self.pairs)))

        def mgd(s, t, name):  # images (B or B*N_cams, H, W, C): the sum is divided by their number
            s, t = s.reshape((-1,) + s.shape[-3:]), t.reshape((-1,) + t.shape[-3:])
            mat = losses.random_mask(next(keys), s.shape[:-1] + (1,), c.ratio)
            gen = self._apply(params, name, Generator(t.shape[-1]), s * mat)
            return c.alpha * losses.generative_loss(gen, t, normalize='mgd')

        if self.is_bev:
            terms['distill/mgd_bev'] = mgd(f['bev_s'], f['bev_t'], 'bev_gen')
        if self.pairs:
            terms['distill/mgd_pv'] = sum(mgd(s, t, f'pv_gen_{k}') for k, (s, t) in enumerate(zip(f['pv_s'], f['pv_t'])))
        return terms, {}

    def _heatmap(self, params, expert_params, f, expert_out, batch, rng):
        """The released baseline: CWD on the shared FPN levels + heatmap-masked L2 on the BEV."""
        c, terms, diag = self.cfg.heatmap, {}, {}
        if self.is_bev and c.bev_weight:
            e = self.exp_cfg
            hm = heatmap_lib.gt_heatmap(batch['gt_boxes'], batch['gt_mask'], tuple(e.pc_range), tuple(c.grid_hw),
                                        (e.bev_h, e.bev_w), min_overlap=c.min_overlap, min_radius=c.min_radius)
            terms['distill/heatmap_bev'] = c.bev_weight * losses.masked_l2_loss(f['bev_s'], f['bev_t'], hm)
            diag['distill/mask_bev'] = jnp.mean(hm > 0)
        if self.pairs and c.cwd_weight:
            terms['distill/cwd_pv'] = c.cwd_weight * sum(
                losses.cwd_loss(s, t, c.cwd_tau) for s, t in zip(f['pv_s'], f['pv_t']))
        return terms, diag

    # -- FD3D ---------------------------------------------------------------------------------------
    def _expert_lidar2img(self, batch):
        k = float(self.upsample)
        return batch['lidar2img'][:, -1] * jnp.asarray([k, k, 1.0, 1.0], batch['lidar2img'].dtype)[:, None]

    def _distill_head(self, params, expert_params, expert_out, batch, rng):
        """(head outputs, head params, GT loss or None) of the distillation head."""
        if not self.cfg.head.train:
            return expert_out, expert_params['head'], None
        b = batch['img'].shape[0]
        head = build_head(self.exp_cfg, self.exp_img_hw)
        if self.is_bev:
            context = dict(bev=expert_out['bev'])
        else:
            context = dict(feats=expert_out['img_feats'], lidar2img=self._expert_lidar2img(batch))
        head_out = head.apply({'params': params['head']}, context, b, deterministic=False, rngs={'dropout': rng})
        loss, _ = detection_loss(head_out, batch, self.config.loss)
        return _sg(head_out), params['head'], loss

    def _masked(self, x, region, rng):
        """Masked apprentice feature: 'zero' zeroes the instance area, 'random' zeroes a random
        ``mask.random_ratio`` of it (MGD's mask restricted to the instances). region (..., H, W)."""
        drop = region[..., None]
        if self.cfg.mask.mode == 'random':
            drop = drop * (1.0 - losses.random_mask(rng, drop.shape, self.cfg.mask.random_ratio))
        elif self.cfg.mask.mode != 'zero':
            raise ConfigError(f"config.distill.mask.mode must be 'zero' or 'random', got {self.cfg.mask.mode!r}")
        return x * (1.0 - drop)

    def _fd3d(self, params, expert_params, f, expert_out, batch, rng):
        c, e = self.cfg, self.exp_cfg
        head_rng, bev_rng, pv_rng = jax.random.split(rng, 3)
        terms, diag = {}, {}
        head_out, head_params, head_loss = self._distill_head(params, expert_params, expert_out, batch, head_rng)
        if head_loss is not None:
            terms['distill/head'] = c.head.loss_weight * head_loss
        cls, code = head_out['cls_scores'][-1], head_out['bbox_preds'][-1]
        matched = None
        if c.mask.select == 'gt':
            matched = matching.match(cls, code, batch['gt_boxes'], batch['gt_labels'], batch['gt_mask'],
                                     self.config.loss.cls_weight, self.config.loss.bbox_weight,
                                     self.config.loss.focal_alpha, self.config.loss.focal_gamma) >= 0
        keep, scores = masks.select_queries(cls, c.mask.select, c.mask.score_thresh, c.mask.topk, matched)
        boxes = denormalize_bbox(code)
        diag['distill/selected'] = jnp.mean(jnp.sum(keep, -1))
        gen_bev, gen_pv = None, None
        if self.is_bev and self._gen_bev():
            region = masks.bev_box_mask(boxes, keep, (e.bev_h, e.bev_w), tuple(e.pc_range), c.mask.box_scale)
            gen_bev = self._apply(params, 'bev_gen', Generator(self.bev_c), self._masked(f['bev_s'], region, bev_rng))
            diag['distill/mask_bev'] = jnp.mean(region)
            if c.generative.bev_weight:
                terms['distill/gen_bev'] = c.generative.bev_weight * losses.generative_loss(
                    gen_bev, f['bev_t'], region, c.generative.normalize)
        if self.pairs and self._gen_pv():
            regions = masks.pv_box_mask(boxes, keep, self._expert_lidar2img(batch), self.exp_img_hw,
                                        [t.shape[2:4] for t in f['pv_t']], c.mask.box_scale)
            keys = jax.random.split(pv_rng, len(self.pairs))
            gen_pv = [self._apply(params, f'pv_gen_{k}', Generator(t.shape[-1]), self._masked(s, r, keys[k]))
                      for k, (s, t, r) in enumerate(zip(f['pv_s'], f['pv_t'], regions))]
            diag['distill/mask_pv'] = jnp.mean(jnp.stack([jnp.mean(r) for r in regions]))
            if c.generative.pv_weight:
                terms['distill/gen_pv'] = c.generative.pv_weight * sum(
                    losses.generative_loss(g, t, r, c.generative.normalize) for g, t, r in zip(gen_pv, f['pv_t'], regions))
        if c.focal.weight:
            if c.focal.source not in ('raw', 'generated'):
                raise ConfigError(f"config.distill.focal.source must be 'raw' or 'generated', got {c.focal.source!r}")
            if c.focal.queries not in ('all', 'selected'):
                raise ConfigError(f"config.distill.focal.queries must be 'all' or 'selected', got {c.focal.queries!r}")
            weights = None if c.focal.queries == 'all' else keep * scores
            generated = c.focal.source == 'generated'
            if self.is_bev:
                value_s = gen_bev if generated else f['bev_s']
                ft, fs = bev_focal_features(head_params, head_out['sampling'], f['bev_t'], value_s, e.num_heads)
            else:
                feats_t, feats_s = list(expert_out['img_feats']), [None] * self.num_exp_levels
                for k, (_, lvl) in enumerate(self.pairs):
                    feats_t[lvl] = f['pv_t'][k]
                    feats_s[lvl] = gen_pv[k] if generated else f['pv_s'][k]
                ft, fs = pv_focal_features(head_out['sampling'], feats_t, feats_s)
            terms['distill/focal'] = c.focal.weight * losses.focal_loss(ft, fs, weights)
        return terms, diag


def build_distillation(config):
    """``(distiller, expert_params)`` for ``config``: (None, None) without ``config.distill`` or for
    method 'none' (then ``expert_params`` is still loaded when ``distill.init_apprentice_head`` and a
    checkpoint are set, so that "apprentice alone" starts from the same head). The expert comes from
    ``config.distill.expert_checkpoint`` (``fd3d_jax.distill.expert.load_expert_params``)."""
    from fd3d_jax.distill import uses_expert
    from fd3d_jax.distill.expert import load_expert_params
    if 'distill' not in config:
        return None, None
    if not uses_expert(config):
        d = config.distill
        if d.init_apprentice_head and d.expert_checkpoint:
            abstract = Distiller(config, abstract_only=True).expert_abstract_params
            return None, load_expert_params(d.expert_checkpoint, config.expert, abstract)
        return None, None
    distiller = Distiller(config)
    params = load_expert_params(config.distill.expert_checkpoint, config.expert, distiller.expert_abstract_params)
    return distiller, params
