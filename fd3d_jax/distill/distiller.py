"""``Distiller``: what every distillation method shares, and the one place where loss weights are applied.

A method (``fd3d_jax.distill.METHODS``, one module each) subclasses ``Distiller`` and declares
- ``weights(distill_cfg)``: ``{term: weight}`` from ``config.distill`` (a term of weight 0 is not computed);
- ``terms(params, expert_params, feats, expert_out, batch, rng)``: the *unweighted* terms of the active names
  (a scalar, or a list of per-FPN-level scalars) and diagnostics that are not summed;
- optionally ``generates_bev`` / ``generates_pv`` (MGD generators to create) and extra ``init`` params.

``loss(params, expert_params, out, expert_out, batch, rng) -> (loss, metrics)`` takes the apprentice's and the
(stop-gradient) expert's model outputs, pairs and aligns their features (``Features``), asks the method for its
terms and returns ``Σ weight · term`` (a per-level list is weighted level by level, then summed) with the
metrics ``distill/<term>`` (weighted; they sum to the loss), ``distill_unweighted/<term>`` and
``distill_stats/<name>`` (diagnostics). The distiller's own trainable params (``params['distill']`` of the
training state: aligners, BEV upsampler, generators, optionally a distillation head) are made by ``init`` and
never exported with the apprentice.

Features: the BEV (detectors with ``has_bev``) is aligned to the expert's channels (1x1 conv when they differ)
and upsampled to the expert's grid (the released BEV upsampler); FPN levels are paired by equal spatial size
(``level_pairs``) and aligned. ``distill.feature_norm`` standardises the expert's features ('expert') and also
the apprentice's FPN levels before alignment ('both'). Level pairs and sizes are found once from abstract
shapes; configuration values are checked by ``fd3d_jax.validate`` before anything runs.
"""
from typing import List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fd3d_jax.detection.losses import detection_loss
from fd3d_jax.distill.expert import expert_batch
from fd3d_jax.distill.modules import Align, BEVUpsampler, Generator
from fd3d_jax.errors import ConfigError
from fd3d_jax.models import build
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.models.precision import compute_dtype


def standardization(feats, eps=1e-5):
    """(mean, std) per channel over all other axes (keepdims) of ``standardize``, in at least float32."""
    feats = feats.astype(jnp.promote_types(feats.dtype, jnp.float32))
    axes = tuple(range(feats.ndim - 1))
    mean = jnp.mean(feats, axes, keepdims=True)
    var = jnp.var(feats, axes, keepdims=True)
    return mean, jnp.sqrt(var + eps)


def standardize(feats, eps=1e-5):
    """BatchNorm without affine params, batch statistics (``distill.feature_norm``): per channel over
    all other axes. The released distiller offers ``bev_feats_norm='bn'`` on the expert BEV (its config
    sets None); without learned scale/shift it cannot be shrunk to fake a small loss."""
    mean, std = standardization(feats, eps)
    return (feats - mean) / std


def destandardize(standardized, raw, eps=1e-5):
    """``standardized`` features mapped back to the scale of ``raw`` (the features whose statistics
    ``standardize`` used): ``standardized * std(raw) + mean(raw)``."""
    mean, std = standardization(raw, eps)
    return standardized * std + mean


def level_pairs(apprentice_hws, expert_hws):
    """[(apprentice level, expert level)] with equal (H, W), each apprentice level paired with the first
    expert level of its size. (With the released x2-upsampled expert input, e.g. BEVFormer-tiny's one
    C5 level at stride 32 pairs with BEVFormer-base's stride-64 level.)"""
    expert_hws = [tuple(hw) for hw in expert_hws]
    return [(a, expert_hws.index(tuple(hw))) for a, hw in enumerate(apprentice_hws) if tuple(hw) in expert_hws]


class Features(NamedTuple):
    """The paired features a method distils, channels-last, expert and apprentice of equal shapes.

    expert_bev, apprentice_bev: (B, H_e, W_e, C_e) on the expert's BEV grid (None without a BEV);
    expert_pv, apprentice_pv: one (B, N, H_l, W_l, C_l) per paired FPN level (``Distiller.pairs``);
    expert_bev_raw: the expert BEV before ``distill.feature_norm`` (what its decoder reads); equal to
    ``expert_bev`` without it."""
    expert_bev: Optional[jax.Array]
    apprentice_bev: Optional[jax.Array]
    expert_pv: List[jax.Array]
    apprentice_pv: List[jax.Array]
    expert_bev_raw: Optional[jax.Array] = None


def apply_weights(terms, weights):
    """``(weighted, unweighted)`` dicts of scalars from the method's unweighted ``terms`` (scalars or lists of
    per-level scalars): a list is weighted level by level, then summed."""
    weighted, unweighted = {}, {}
    for name, value in terms.items():
        if isinstance(value, (list, tuple)):
            weighted[name] = sum(weights[name] * v for v in value)
            unweighted[name] = sum(value)
        else:
            weighted[name] = weights[name] * value
            unweighted[name] = value
    return weighted, unweighted


class Distiller:
    """The shared part of every method (see the module docstring); a subclass per method."""
    generates_bev = False   # an MGD generator on the BEV (``params['bev_gen']``)
    generates_pv = False    # one per paired FPN level (``params['pv_gen_<k>']``)

    @staticmethod
    def weights(distill_cfg):
        """``{term: weight}`` of the method from ``config.distill``."""
        raise TypeError('a distillation method declares its weights')

    def __init__(self, config, abstract_only=False):
        self.config = config
        self.distill_cfg = config.distill
        self.apprentice_cfg, self.expert_cfg = config.model, config.expert.model
        # One precision for all three (config.model.dtype): the expert runs in the apprentice's.
        self.apprentice = build(self.apprentice_cfg)
        self.expert = build(self.expert_cfg, dtype=self.apprentice.dtype)
        self.dtype = compute_dtype(self.apprentice.dtype)
        self.has_bev = self.apprentice.has_bev
        self.upsample = int(self.distill_cfg.expert_upsample)
        batch = dummy_batch(config, 1, queue_length=1, expert_model=self.expert_cfg)
        rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(0)}
        apprentice_out = jax.eval_shape(lambda b: self.apprentice.init_with_output(rngs, b)[0], batch)
        expert_out, expert_vars = jax.eval_shape(
            lambda b: self.expert.init_with_output(rngs, self.expert_batch(b)), batch)
        self.expert_abstract_params = expert_vars['params']
        if abstract_only:
            return
        self.term_weights = dict(self.weights(self.distill_cfg))
        self.expert_img_hw = tuple(jax.eval_shape(self.expert_batch, batch)['img'].shape[-3:-1])
        apprentice_hws = [f.shape[2:4] for f in apprentice_out['img_feats']]
        expert_hws = [f.shape[2:4] for f in expert_out['img_feats']]
        self.pairs = level_pairs(apprentice_hws, expert_hws)
        self.pv_channels = [expert_out['img_feats'][e].shape[-1] for _, e in self.pairs]
        self.num_expert_levels = len(expert_hws)
        if not self.pairs and not self.has_bev:
            raise ConfigError(f'no FPN level of the apprentice {apprentice_hws} has the size of one of the expert '
                              f'{expert_hws} (check config.distill.expert_upsample and the image scales)')
        if self.has_bev:
            expert_h, _, self.bev_channels = self.expert.bev_shape()
            self.bev_factor = expert_h // self.apprentice.bev_shape()[0]   # a power of two (validate)

    def active(self, term):
        """Whether ``term`` is computed (its weight is not 0)."""
        return bool(self.term_weights.get(term, 0))

    # -- inputs and params ----------------------------------------------------------------------
    def expert_batch(self, batch):
        """The apprentice's batch as the expert sees it (``fd3d_jax.distill.expert.expert_batch``)."""
        return expert_batch(batch, self.config.data, self.config.expert, self.upsample)

    def init(self, rng, expert_params):
        """The trainable distillation params (PyTorch default init), in this order of keys: BEV align,
        upsampler, generator, then per level align and generator."""
        keys = iter(jax.random.split(rng, 4 + 2 * len(self.pairs)))
        params = {}

        def add(name, module, example):
            variables = module.init(next(keys), example)
            if variables.get('params'):
                params[name] = variables['params']

        apprentice_channels = self.apprentice_cfg.embed_dims
        if self.has_bev:
            add('bev_align', Align(self.bev_channels, self.dtype), jnp.zeros((1, 2, 2, apprentice_channels)))
            if self.bev_factor > 1:
                add('bev_up', BEVUpsampler(self.bev_channels, self.bev_factor, self.dtype),
                    jnp.zeros((1, 2, 2, self.bev_channels)))
            if self.generates_bev:
                add('bev_gen', Generator(self.bev_channels, self.dtype), jnp.zeros((1, 4, 4, self.bev_channels)))
        apprentice_pv_channels = self.apprentice_cfg.neck.out_channels
        for level, channels in enumerate(self.pv_channels):
            add(f'pv_align_{level}', Align(channels, self.dtype), jnp.zeros((1, 2, 2, apprentice_pv_channels)))
            if self.generates_pv:
                add(f'pv_gen_{level}', Generator(channels, self.dtype), jnp.zeros((1, 4, 4, channels)))
        return params

    @staticmethod
    def apply_module(params, name, module, feats):
        """``module`` applied with ``params[name]`` (a module without params, like an identity ``Align``, has
        no entry)."""
        return module.apply({'params': params[name]}, feats) if name in params else module.apply({}, feats)

    def generate_bev(self, params, masked_bev):
        """The BEV generator's output for the masked apprentice BEV (B, H_e, W_e, C_e)."""
        return self.apply_module(params, 'bev_gen', Generator(self.bev_channels, self.dtype), masked_bev)

    def generate_pv(self, params, level, masked_pv):
        """The generator of paired level ``level`` applied to the masked apprentice level."""
        return self.apply_module(params, f'pv_gen_{level}', Generator(masked_pv.shape[-1], self.dtype), masked_pv)

    # -- the loss ---------------------------------------------------------------------------------
    def features(self, params, out, expert_out):
        """The paired, aligned ``Features`` of the apprentice's ``out`` and the expert's ``expert_out``."""
        batch_size = out['img_feats'][0].shape[0]
        expert_bev = apprentice_bev = None
        if self.has_bev:
            expert_bev = expert_out['bev'].reshape((batch_size,) + self.expert.bev_shape())
            aligned = self.apply_module(params, 'bev_align', Align(self.bev_channels, self.dtype),
                                        out['bev'].reshape((batch_size,) + self.apprentice.bev_shape()))
            upsampler = BEVUpsampler(self.bev_channels, self.bev_factor, self.dtype)
            apprentice_bev = (self.apply_module(params, 'bev_up', upsampler,
                                                aligned) if self.bev_factor > 1 else aligned)
        expert_bev_raw = expert_bev
        expert_pv = [expert_out['img_feats'][e] for _, e in self.pairs]
        norm = self.distill_cfg.feature_norm
        if norm != 'none':
            expert_pv = [standardize(level) for level in expert_pv]
            if self.has_bev:
                expert_bev = standardize(expert_bev)
        apprentice_pv = [out['img_feats'][a] for a, _ in self.pairs]
        if norm == 'both':  # the apprentice's FPN levels too, before they are aligned
            apprentice_pv = [standardize(level) for level in apprentice_pv]
        apprentice_pv = [self.apply_module(params, f'pv_align_{level}', Align(channels, self.dtype), feats)
                         for level, (feats, channels) in enumerate(zip(apprentice_pv, self.pv_channels))]
        return Features(expert_bev, apprentice_bev, expert_pv, apprentice_pv, expert_bev_raw)

    def terms(self, params, expert_params, feats, expert_out, batch, rng):
        """``(terms, diagnostics)``: the method's unweighted terms (see the module docstring)."""
        raise TypeError('a distillation method computes its terms')

    def loss(self, params, expert_params, out, expert_out, batch, rng):
        params = params or {}
        expert_out = jax.lax.stop_gradient(expert_out)
        feats = self.features(params, out, expert_out)
        terms, diagnostics = self.terms(params, expert_params, feats, expert_out, batch, rng)
        weighted, unweighted = apply_weights(terms, self.term_weights)
        total = sum(weighted.values()) if weighted else jnp.zeros((), jnp.float32)
        metrics = {f'distill/{k}': v for k, v in weighted.items()}
        metrics.update({f'distill_unweighted/{k}': v for k, v in unweighted.items()})
        metrics.update({f'distill_stats/{k}': v for k, v in diagnostics.items()})
        return total, metrics

    def feature_grad_norms(self, params, head_params, expert_params, out, expert_out, batch, rng):
        """Which term drives training: ``{'grad_norm/<term>/<features>': norm}``, the L2 norm of the gradient of
        each weighted distillation term and of the detection loss with respect to the apprentice's shared
        features (``bev``: its BEV; ``fpn``: all its FPN levels), at the apprentice outputs ``out`` (``params``:
        the distillation params, ``head_params``: the apprentice's ``params['head']``). The
        detection loss is taken through the head alone in inference mode (a diagnostic: no dropout), so it
        reaches the FPN levels only for a head that reads them (DETR3D); its path through BEVFormer's encoder
        is not counted."""
        names = ['img_feats'] + (['bev'] if self.has_bev else [])
        shared = {name: jax.lax.stop_gradient(out[name]) for name in names}

        def distill_terms(features):
            _, metrics = self.loss(params, expert_params, dict(out, **features), expert_out, batch, rng)
            return {k.split('/', 1)[1]: v for k, v in metrics.items() if k.startswith('distill/')}

        def detection_term(features):
            head = self.apprentice.build_head(batch['img'].shape[-3:-1])
            context = self.apprentice.head_context(dict(out, **features), batch['lidar2img'][:, -1])
            head_out = head.apply({'params': jax.lax.stop_gradient(head_params)}, context, batch['img'].shape[0])
            return detection_loss(head_out, batch, self.config.loss)[0]

        # One backward pass per term from one forward (``jax.jacrev`` would vmap them over the terms, and that
        # vmapped axis merged with the sharded batch in the convolutions makes XLA gather the batch).
        values, backward = jax.vjp(distill_terms, shared)
        grads = {term: backward({name: jnp.ones_like(value) if name == term else jnp.zeros_like(value)
                                 for name, value in values.items()})[0] for term in values}
        grads['detection'] = jax.grad(detection_term)(shared)
        norms = {}
        for term, grad in grads.items():
            norms[f'grad_norm/{term}/fpn'] = optax.tree.norm(grad['img_feats'])
            if self.has_bev:
                norms[f'grad_norm/{term}/bev'] = optax.tree.norm(grad['bev'])
        return norms
