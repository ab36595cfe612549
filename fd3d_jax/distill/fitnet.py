"""FitNet hints (Romero et al., ICLR 2015) as a baseline: the mean squared error between the aligned apprentice
features and the expert's, on the BEV (upsampled to the expert's grid) and on every paired FPN level.

Weights: ``config.distill.fitnet.bev_weight`` and ``pv_weight``.
"""
from fd3d_jax.distill import losses
from fd3d_jax.distill.distiller import Distiller


class FitNet(Distiller):
    @staticmethod
    def weights(distill_cfg):
        return dict(fitnet_bev=distill_cfg.fitnet.bev_weight, fitnet_pv=distill_cfg.fitnet.pv_weight)

    def terms(self, params, expert_params, feats, expert_out, batch, rng):
        terms = {}
        if self.has_bev and self.active('fitnet_bev'):
            terms['fitnet_bev'] = losses.fitnet_loss(feats.apprentice_bev, feats.expert_bev)
        if self.pairs and self.active('fitnet_pv'):
            terms['fitnet_pv'] = [losses.fitnet_loss(apprentice, expert)
                                  for apprentice, expert in zip(feats.apprentice_pv, feats.expert_pv)]
        return terms, {}
