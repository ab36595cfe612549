"""Feature-distillation losses: pure, jit-able functions of channels-last arrays, the public face of
``fd3d_jax.distill`` for anyone who tests or reuses a loss on its own (also exported by the package).

One argument order for all of them: the apprentice's features (or the generator's output that stands for
them), the expert's features (the target), then masks / regions, then per-query weights and options:

    fitnet_loss(apprentice, expert)
    generative_loss(apprentice, expert, region=None, area='full')
    masked_l2_loss(apprentice, expert, mask)
    cwd_loss(apprentice, expert, tau=2.0)
    focal_loss(apprentice, expert, query_weights=None, eps=1e-6)

Conventions: features are ``(..., H, W, C)`` (``focal_loss``: ``(L, B, Q, C)``); "spatial" means the two axes
before ``C``. Every function computes in float32 and returns an unweighted float32 scalar: the loss weights are
applied in one place, by the caller (``fd3d_jax.distill.distiller.Distiller.loss``), and so is
``jax.lax.stop_gradient`` on the expert's features. docs/distillation.md has the table of shapes, reductions
and the published formula each one follows.

One scale: every squared-error term is a mean per feature value (per element), so that a weight of 1
means the same for every term, feature map and model size: the squared error of one feature value counts
1 (times the fraction of the map the term covers). The released formulas sum over channels or over whole
maps (MGD ``Σ / N``, the heatmap L2's ``Σ / ΣM``, FD3D's per-vector ``‖·‖²``); each docstring gives the
factor between the two, so a released weight converts to a per-element one (``docs/distillation.md``).
CWD is the exception: a cross-entropy between per-channel spatial distributions, it is per (image,
channel) as released.

Sources (read, not paraphrased from papers):
- MGD: ``yzd-v/MGD`` ``det/mmdet/distillation/losses/mgd.py`` (``FeatureLoss.get_dis_loss``).
- Released FocalDistiller baseline: ``OpenDriveLab/Birds-eye-view-Perception``
  ``nuScenes_playground/FocalDistiller/projects/mmdet3d_plugin/kd/losses/{cwd,l2loss}.py`` and
  ``.../kd/distillers/heatmap_detection_distiller.py`` (``forward_train``), commit 705b01f.
- FD3D's own focal and generative losses were never released: ``focal_loss`` and ``generative_loss``'s
  ``area='instance'`` are reconstructions (docs/fd3d_reconstruction.md).
"""
import jax
import jax.numpy as jnp

__all__ = ['cwd_loss', 'fitnet_loss', 'focal_loss', 'generative_loss', 'masked_l2_loss']


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _spatial_region(region, ndim):
    """(..., H, W) or (..., H, W, 1) -> (..., H, W, 1), broadcastable over the channel axis."""
    region = jnp.asarray(region, jnp.float32)
    if region.ndim == ndim - 1:
        region = region[..., None]
    if region.ndim != ndim:
        raise ValueError(f'region of rank {region.ndim} does not fit features of rank {ndim}')
    return region


def fitnet_loss(apprentice, expert):
    """FitNet hint loss (Romero et al. 2015): mean squared error (``F.mse_loss``, mean reduction).

    Args:
      apprentice: the aligned apprentice features, any shape.
      expert: the expert's features, the same shape.
    Returns:
      float32 scalar: ``mean((apprentice - expert)²)`` over every element.
    """
    apprentice, expert = _f32(apprentice, expert)
    return jnp.mean(jnp.square(apprentice - expert))


def generative_loss(apprentice, expert, region=None, area='full'):
    """Masked-generation loss (MGD, Yang et al. 2022) between the generator's output and the expert's features.

    Args:
      apprentice: the generator's output ``G(align(S) * M)``, ``(..., H, W, C)``; it stands for the apprentice.
      expert: the expert's features, the same shape.
      region: ``(..., H, W)`` or ``(..., H, W, 1)`` (broadcast over C); used by ``area='instance'`` only.
      area:
        - ``'full'``: the mean over every element of the map, as MGD counts the whole map. MGD's released
          ``MSELoss(reduction='sum')(new_fea, preds_T) / N`` (mgd.py ``get_dis_loss``, N images) is this
          times the number of elements per image ``H * W * C``: MGD's ``alpha_mgd`` is a per-element
          weight of ``alpha_mgd * H * W * C``.
        - ``'instance'``: ``Σ region * (apprentice - expert)² / max(Σ region * C, 1)``, the mean over
          the region's elements (FD3D's instance regions: a reconstruction); ``region=None`` gives the
          plain mean.
    Returns:
      float32 scalar.
    Raises:
      ValueError: ``area`` is neither 'full' nor 'instance', or ``region`` does not fit the features' rank.
    """
    apprentice, expert = _f32(apprentice, expert)
    sq = jnp.square(apprentice - expert)
    if area not in ('full', 'instance'):
        raise ValueError(f"area must be 'full' or 'instance', got {area!r}")
    if area == 'full' or region is None:
        return jnp.mean(sq)
    region = jnp.broadcast_to(_spatial_region(region, sq.ndim), sq.shape)
    return jnp.sum(region * sq) / jnp.maximum(jnp.sum(region), 1.0)


def masked_l2_loss(apprentice, expert, mask):
    """The released baseline's heatmap-masked BEV L2 (``heatmap_detection_distiller.py``), per element.

    Released: ``(1 / mask_heatmap.sum()) * L2Loss(bevFeats_stu * mask, bevFeats_tch * mask)`` with
    ``L2Loss = ((S - T)**2).sum()`` (``kd/losses/l2loss.py``); the mask is (B, 1, H, W), so the
    numerator sums ``M² (S - T)²`` over (B, C, H, W) and the denominator ΣM runs over (B, H, W)
    only. M is the soft Gaussian heatmap, so ``M² ≠ M``. Here the denominator is ``C ΣM`` (one scale:
    the released value divided by C, so the released weight 0.1 is a per-element weight of 0.1 C).
    Deviations: an empty mask gives 0 here (the original divides 0 by 0 -> NaN), and under jit ΣM is
    over the global batch (the original: per GPU with 1 sample, then averaged).

    Args:
      apprentice: the aligned apprentice BEV, ``(B, H, W, C)`` (any leading dims).
      expert: the expert's BEV, the same shape.
      mask: ``(B, H, W)`` or ``(B, H, W, 1)``, broadcast over C.
    Returns:
      float32 scalar: ``Σ (M S - M T)² / (C ΣM)`` (0 for an all-zero mask).
    Raises:
      ValueError: ``mask`` does not fit the features' rank.
    """
    apprentice, expert = _f32(apprentice, expert)
    mask = _spatial_region(mask, apprentice.ndim)
    num = jnp.sum(jnp.square(apprentice * mask - expert * mask))
    den = jnp.sum(mask) * apprentice.shape[-1]
    return num / jnp.where(den > 0, den, 1.0)


def cwd_loss(apprentice, expert, tau=2.0):
    """Channel-wise distillation (Shu et al. 2021) as the released baseline computes it (``kd/losses/cwd.py``).

    Per image and channel, softmax over the H*W positions at temperature τ, then
    ``Σ -softmax(T/τ) * log_softmax(S/τ) * τ² / (N * C)`` with N the number of images, T the expert's and S
    the apprentice's features. This is the cross-entropy: the released code keeps the KL line commented out
    and drops the expert-entropy term ``Σ p_T log p_T``, so the loss of identical features is the (positive)
    expert entropy, not 0; its gradient w.r.t. the apprentice equals that of the KL (0 at S = T).
    The loss weight (0.25 in the released config, τ = 2) is not applied here.

    Args:
      apprentice: the aligned apprentice features, ``(..., H, W, C)``; every leading axis counts as images
        (e.g. FPN levels ``(B, N_cam, H, W, C)`` give ``N = B * N_cam``, as mmdet3d's ``B*N_cam`` image batch).
      expert: the expert's features, the same shape.
      tau: temperature τ.
    Returns:
      float32 scalar: the sum over images, channels and positions divided by ``N * C`` (a mean per
      (image, channel) distribution).
    """
    apprentice, expert = _f32(apprentice, expert)
    channels = apprentice.shape[-1]
    # (N, H*W, C)
    apprentice_logits = apprentice.reshape(-1, apprentice.shape[-3] * apprentice.shape[-2], channels) / tau
    expert_logits = expert.reshape(-1, expert.shape[-3] * expert.shape[-2], channels) / tau
    expert_prob = jax.nn.softmax(expert_logits, axis=1)
    loss = jnp.sum(-expert_prob * jax.nn.log_softmax(apprentice_logits, axis=1)) * tau ** 2
    return loss / (apprentice_logits.shape[0] * channels)


def focal_loss(apprentice, expert, query_weights=None, eps=1e-6):
    """FD3D focal distillation: L2 between the apprentice's and the expert's features aggregated at the
    distillation queries' deformable sampling points (``fd3d_jax.distill.focal``). A reconstruction
    (docs/fd3d_reconstruction.md): the loss itself was never released; only the feature pairs are
    (``distill_branch/decoderDistiller.py`` appends ``(nan_to_num(output_T), nan_to_num(output_S))`` per layer).

    ``Σ_{l,b,q} w[b,q] ‖T[l,b,q] - S[l,b,q]‖² / max(L C Σ_{b,q} w[b,q], eps)``: the weighted mean over
    layers, queries and channels (one scale; a per-vector sum would be C times larger).

    Args:
      apprentice: ``(L, B, Q, C)`` the apprentice's per-layer aggregated features S (NaN/inf cleaned with
        ``nan_to_num`` as in the released branch).
      expert: ``(L, B, Q, C)`` the expert's, T, cleaned the same way.
      query_weights: ``(B, Q)`` per-query weights w (e.g. 0/1 selection or scores); None = all ones.
      eps: floor of the normaliser (all-zero weights give 0).
    Returns:
      float32 scalar.
    """
    expert, apprentice = (jnp.nan_to_num(x) for x in _f32(expert, apprentice))
    num_layers = expert.shape[0]
    dist = jnp.sum(jnp.square(expert - apprentice), axis=-1)  # (L, B, Q)
    if query_weights is None:
        query_weights = jnp.ones(dist.shape[1:], jnp.float32)
    query_weights = jnp.asarray(query_weights, jnp.float32)
    channels = expert.shape[-1]
    return jnp.sum(query_weights[None] * dist) / jnp.maximum(num_layers * channels * jnp.sum(query_weights), eps)
