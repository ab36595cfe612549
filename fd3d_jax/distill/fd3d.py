"""FD3D (Zeng et al., CVPR 2023): query-guided masked generative distillation and focal distillation.

1. A distillation head (the frozen expert's own head, or with ``distill.head.train`` a copy trained on the GT
   with the stop-gradient expert features) predicts boxes; the queries chosen by ``distill.mask.select``
   (score >= threshold, top-k, or Hungarian-matched to the GT) define instance regions on the BEV grid and on
   every paired FPN level (``fd3d_jax.distill.masks``).
2. Generative terms ``gen_bev``, ``gen_pv``: the aligned apprentice features, masked in those regions
   (``distill.mask.mode``: 'zero' zeroes the region, 'random' an MGD random mask inside it), go through a
   generator that must reproduce the expert's features (``losses.generative_loss``, ``distill.generative``):
   by default the loss counts the whole map (``generative.area='full'``, as MGD), so the generator learns to
   rebuild the zeroed instance interiors from their surroundings and to keep the rest; ``'instance'`` counts
   only the masked region (with the 'zero' mask only its border cells are then reachable by a 3x3-3x3
   generator, which is why it is not the default).
3. Focal term ``focal``: the distillation head's deformable sampling points read the expert's and the
   apprentice's features at the same locations with the same weights (``fd3d_jax.distill.focal``); their
   squared distance is the loss (``losses.focal_loss``), over all or the selected queries. On the BEV the
   expert's features are the raw BEV its decoder reads (before ``distill.feature_norm``) and the apprentice's
   are mapped to that scale (``destandardize``), so both go through the expert's own ``value_proj``.

The paper's code for these losses was never released: every choice above that is not in the released
distillation branch is a reconstruction and a switch of ``config.distill`` (docs/fd3d_reconstruction.md).
Weights: ``generative.bev_weight``, ``generative.pv_weight``, ``focal.weight``, ``head.loss_weight``.
"""
import jax
import jax.numpy as jnp

from fd3d_jax.detection.losses import detection_loss
from fd3d_jax.detection.matching import match
from fd3d_jax.distill import losses, masks
from fd3d_jax.distill.distiller import Distiller, destandardize
from fd3d_jax.distill.expert import upsampled_lidar2img
from fd3d_jax.distill.focal import bev_focal_features, pv_focal_features
from fd3d_jax.models.box_coder import denormalize_bbox


class FD3D(Distiller):
    @staticmethod
    def weights(distill_cfg):
        weights = dict(gen_bev=distill_cfg.generative.bev_weight, gen_pv=distill_cfg.generative.pv_weight,
                       focal=distill_cfg.focal.weight)
        if distill_cfg.head.train:
            weights = dict(head=distill_cfg.head.loss_weight, **weights)   # first: the order of the sum
        return weights

    @property
    def generates_bev(self):
        return self.active('gen_bev') or (self.active('focal') and self.distill_cfg.focal.source == 'generated')

    @property
    def generates_pv(self):
        return self.active('gen_pv') or (
            not self.has_bev and self.active('focal') and self.distill_cfg.focal.source == 'generated')

    def init(self, rng, expert_params):
        params = super().init(rng, expert_params)
        if self.distill_cfg.head.train:
            params['head'] = jax.tree_util.tree_map(jnp.array, expert_params['head'])
        return params

    def expert_lidar2img(self, batch):
        """The current frame's ``lidar2img`` of the expert's (upsampled) images."""
        return upsampled_lidar2img(batch['lidar2img'][:, -1], self.upsample)

    def distillation_head(self, params, expert_params, expert_out, batch, rng):
        """(head outputs, head params, unweighted GT loss or None) of the distillation head."""
        if not self.distill_cfg.head.train:
            return expert_out, expert_params['head'], None
        head = self.expert.build_head(self.expert_img_hw)
        context = self.expert.head_context(expert_out, self.expert_lidar2img(batch))
        head_out = head.apply({'params': params['head']}, context, batch['img'].shape[0], deterministic=False,
                              rngs={'dropout': rng})
        loss, _ = detection_loss(head_out, batch, self.config.loss)
        return jax.lax.stop_gradient(head_out), params['head'], loss

    def masked(self, feats, region, rng):
        """The apprentice feature ``feats`` (..., H, W, C) masked in ``region`` (..., H, W): 'zero' zeroes the
        region, 'random' a random ``mask.random_ratio`` of it (MGD's mask restricted to the instances)."""
        drop = region[..., None]
        if self.distill_cfg.mask.mode == 'random':
            drop = drop * (1.0 - masks.random_mask(rng, drop.shape, self.distill_cfg.mask.random_ratio))
        return feats * (1.0 - drop)

    def terms(self, params, expert_params, feats, expert_out, batch, rng):
        cfg, expert_cfg, loss_cfg = self.distill_cfg, self.expert_cfg, self.config.loss
        head_rng, bev_rng, pv_rng = jax.random.split(rng, 3)
        terms, diagnostics = {}, {}
        head_out, head_params, head_loss = self.distillation_head(params, expert_params, expert_out, batch, head_rng)
        if head_loss is not None:
            terms['head'] = head_loss
        cls_logits, box_code = head_out['cls_scores'][-1], head_out['bbox_preds'][-1]
        matched = None
        if cfg.mask.select == 'gt':
            matched = match(cls_logits, box_code, batch['gt_boxes'], batch['gt_labels'], batch['gt_mask'],
                            loss_cfg.cls_weight, loss_cfg.bbox_weight, loss_cfg.focal_alpha, loss_cfg.focal_gamma,
                            matcher=getattr(loss_cfg, 'matcher', 'scipy')) >= 0
        keep, scores = masks.select_queries(cls_logits, cfg.mask.select, cfg.mask.score_thresh, cfg.mask.topk, matched)
        boxes = denormalize_bbox(box_code)
        diagnostics['selected'] = jnp.mean(jnp.sum(keep, -1))
        generated_bev, generated_pv = None, None
        if self.has_bev and self.generates_bev:
            region = masks.bev_box_mask(boxes, keep, self.expert.bev_shape()[:2], tuple(expert_cfg.pc_range),
                                        cfg.mask.box_scale)
            generated_bev = self.generate_bev(params, self.masked(feats.apprentice_bev, region, bev_rng))
            diagnostics['mask_bev'] = jnp.mean(region)
            if self.active('gen_bev'):
                terms['gen_bev'] = losses.generative_loss(generated_bev, feats.expert_bev, region, cfg.generative.area)
        if self.pairs and self.generates_pv:
            regions = masks.pv_box_mask(boxes, keep, self.expert_lidar2img(batch), self.expert_img_hw,
                                        [level.shape[2:4] for level in feats.expert_pv], cfg.mask.box_scale)
            keys = jax.random.split(pv_rng, len(self.pairs))
            generated_pv = [self.generate_pv(params, level, self.masked(apprentice, region, keys[level]))
                            for level, (apprentice, region) in enumerate(zip(feats.apprentice_pv, regions))]
            diagnostics['mask_pv'] = jnp.mean(jnp.stack([jnp.mean(region) for region in regions]))
            if self.active('gen_pv'):
                terms['gen_pv'] = [losses.generative_loss(generated, expert, region, cfg.generative.area)
                                   for generated, expert, region in zip(generated_pv, feats.expert_pv, regions)]
        if self.active('focal'):
            terms['focal'] = self.focal_term(head_params, head_out, expert_out, feats, generated_bev, generated_pv,
                                             None if cfg.focal.queries == 'all' else keep * scores)
        return terms, diagnostics

    def focal_term(self, head_params, head_out, expert_out, feats, generated_bev, generated_pv, query_weights):
        """The unweighted focal loss between the expert's and the apprentice's features (raw, or generated with
        ``focal.source='generated'``) read at the distillation head's sampling points."""
        generated = self.distill_cfg.focal.source == 'generated'
        if self.has_bev:
            apprentice = generated_bev if generated else feats.apprentice_bev
            if self.distill_cfg.feature_norm != 'none':   # back to the scale the expert's decoder reads
                apprentice = destandardize(apprentice, feats.expert_bev_raw)
            focal_apprentice, focal_expert = bev_focal_features(head_params, head_out['sampling'], apprentice,
                                                                feats.expert_bev_raw, self.expert_cfg.num_heads)
        else:
            expert_levels = list(expert_out['img_feats'])
            apprentice_levels = [None] * self.num_expert_levels
            for pair, (_, level) in enumerate(self.pairs):
                expert_levels[level] = feats.expert_pv[pair]
                apprentice_levels[level] = generated_pv[pair] if generated else feats.apprentice_pv[pair]
            focal_apprentice, focal_expert = pv_focal_features(head_out['sampling'], apprentice_levels, expert_levels)
        return losses.focal_loss(focal_apprentice, focal_expert, query_weights)
