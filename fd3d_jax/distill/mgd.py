"""MGD, masked generative distillation (Yang et al., ECCV 2022; yzd-v/MGD ``det/mmdet/distillation/losses/
mgd.py``) as a baseline: the aligned apprentice features under a random spatial mask (a fraction
``distill.mgd.ratio`` of the positions dropped, shared over channels) go through a generator (3x3 conv, ReLU,
3x3 conv) that must reproduce the expert's features; the loss counts the full map, on the BEV and on every
paired FPN level. It is the per-element mean (``losses.generative_loss(area='full')``) weighted by
``distill.mgd.weight``: MGD's released ``alpha_mgd`` (2e-5 for one-stage detectors, ratio 0.65) weights a sum per
image, i.e. a per-element weight of ``alpha_mgd * H * W * C`` (about 1.3 for the ``:demo`` expert BEV).
"""
import jax

from fd3d_jax.distill import losses, masks
from fd3d_jax.distill.distiller import Distiller


class MGD(Distiller):
    generates_bev = True
    generates_pv = True

    @staticmethod
    def weights(distill_cfg):
        return dict(mgd_bev=distill_cfg.mgd.weight, mgd_pv=distill_cfg.mgd.weight)

    def terms(self, params, expert_params, feats, expert_out, batch, rng):
        ratio, terms = self.distill_cfg.mgd.ratio, {}
        keys = iter(jax.random.split(rng, 1 + len(self.pairs)))

        def mgd(apprentice, expert, generate):
            # images (B or B*N_cams, H, W, C): one random mask per image
            apprentice = apprentice.reshape((-1,) + apprentice.shape[-3:])
            expert = expert.reshape((-1,) + expert.shape[-3:])
            keep = masks.random_mask(next(keys), apprentice.shape[:-1] + (1,), ratio)
            return losses.generative_loss(generate(apprentice * keep), expert, area='full')

        if self.has_bev and self.active('mgd_bev'):
            terms['mgd_bev'] = mgd(feats.apprentice_bev, feats.expert_bev, lambda x: self.generate_bev(params, x))
        if self.pairs and self.active('mgd_pv'):
            terms['mgd_pv'] = [mgd(apprentice, expert, lambda x, level=level: self.generate_pv(params, level, x))
                               for level, (apprentice, expert) in enumerate(zip(feats.apprentice_pv, feats.expert_pv))]
        return terms, {}
