"""The object-query decoder and detection head shared by BEVFormer and DETR3D.

``DetectionTransformerDecoder`` / ``Detr3DTransformerDecoder`` + ``BEVFormerHead`` / ``Detr3DHead``:
900 learned queries (``query_pos | query`` split of one embedding), reference points
``sigmoid(Linear(query_pos))``, post-norm layers ``self-attn -> LN -> cross-attn -> LN -> FFN -> LN``,
iterative box refinement (``with_box_refine``: one reg/cls branch per layer, new references
detached), and per-layer outputs for the auxiliary losses. The cross-attention is the detector's
(BEV deformable attention or DETR3D's camera sampling), given as a module factory.

Init notes: Linear biases are zero where PyTorch's default is U(±1/sqrt(fan_in)); kernels follow
the original (xavier-uniform for transformer weights; PyTorch default for the branch Linears).
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.models import box_coder
from fd3d_jax.models.deformable_attention import MSDeformableAttention

LN_EPS = 1e-5
xavier_uniform = nn.initializers.xavier_uniform()
torch_default = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')  # nn.Linear weight
# torch packs q, k, v into one (3C, C) ``in_proj_weight`` and the transformer's init_weights draws xavier-uniform
# on that: bound sqrt(6 / (C + 3C)), sqrt(2) narrower than xavier on each (C, C) kernel alone.
packed_qkv_xavier = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')


def attention_softmax_float32(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
                              broadcast_dropout=True, deterministic=False, dtype=None, precision=None):
    """flax's ``dot_product_attention`` with the softmax in float32 and its weights cast back to the values'
    dtype *before* the dropout and the product with the values. (flax's ``force_fp32_for_softmax`` keeps the
    weights float32 through both, which runs the product and keeps the backward pass's copies of the weights in
    float32: at 900 queries 26 MB per head-batch, layer and copy.) Identical to flax's in float32: same dropout
    draw, same products."""
    weights = nn.dot_product_attention_weights(query, key, mask=mask, deterministic=True, dtype=dtype,
                                               precision=precision, force_fp32_for_softmax=True).astype(value.dtype)
    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        shape = tuple([1] * (key.ndim - 2)) + weights.shape[-2:] if broadcast_dropout else weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        weights = weights * (keep.astype(weights.dtype) / jnp.asarray(keep_prob, dtype=weights.dtype))
    return jnp.einsum('...hqk,...khd->...qhd', weights, value, precision=precision)


def layer_norm(name=None, dtype=jnp.float32):
    """torch ``nn.LayerNorm`` (eps 1e-5); statistics in float32 whatever ``dtype`` (the output's)."""
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


class FFN(nn.Module):
    """mmcv FFN: ``inputs + Dropout(Linear(Dropout(ReLU(Linear(inputs)))))``."""
    embed_dims: int = 256
    ffn_dims: int = 512
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, deterministic=True):
        hidden = nn.relu(nn.Dense(self.ffn_dims, kernel_init=xavier_uniform, dtype=self.dtype, name='fc1')(inputs))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        hidden = nn.Dense(self.embed_dims, kernel_init=xavier_uniform, dtype=self.dtype, name='fc2')(hidden)
        return inputs + nn.Dropout(self.dropout)(hidden, deterministic=deterministic)


class SelfAttention(nn.Module):
    """mmcv ``MultiheadAttention`` (torch ``nn.MultiheadAttention``): q = k = query + pos, v = query;
    ``dropout=0.1`` drops attention weights and the residual branch. Init: q/k/v kernels as xavier on torch's
    packed (3C, C) ``in_proj_weight`` (``packed_qkv_xavier``), the output kernel xavier on (C, C). The softmax
    runs in float32 whatever ``dtype``."""
    embed_dims: int = 256
    num_heads: int = 8
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query, pos, deterministic=True):
        qk = query + pos
        out = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.embed_dims, out_features=self.embed_dims,
            dropout_rate=self.dropout, broadcast_dropout=False, deterministic=deterministic,
            dtype=self.dtype, attention_fn=attention_softmax_float32,
            kernel_init=packed_qkv_xavier, out_kernel_init=xavier_uniform, name='attn')(qk, qk, query)
        return query + nn.Dropout(self.dropout)(out, deterministic=deterministic)


class DecoderLayer(nn.Module):
    embed_dims: int
    num_heads: int
    ffn_dims: int
    dropout: float
    cross_attn: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query, query_pos, reference, context, deterministic=True):
        hidden = SelfAttention(self.embed_dims, self.num_heads, self.dropout, self.dtype, name='self_attn')(
            query, query_pos, deterministic)
        hidden = layer_norm('norm1', self.dtype)(hidden)
        hidden, sampling = self.cross_attn(name='cross_attn')(hidden, query_pos, reference, context, deterministic)
        hidden = layer_norm('norm2', self.dtype)(hidden)
        hidden = FFN(self.embed_dims, self.ffn_dims, self.dropout, self.dtype, name='ffn')(hidden, deterministic)
        return layer_norm('norm3', self.dtype)(hidden), sampling


def prior_prob_bias(prob=0.01):
    """``bias_init_with_prob``: the classification bias giving sigmoid = prob."""
    return nn.initializers.constant(-float(np.log((1 - prob) / prob)))


class ClsBranch(nn.Module):
    """``[Linear, LayerNorm, ReLU] x 2 + Linear(K)``; the last Linear in float32 (float32 logits)."""
    embed_dims: int
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        for layer in range(2):
            hidden = nn.relu(layer_norm(f'norm{layer}', self.dtype)(
                nn.Dense(self.embed_dims, kernel_init=torch_default, dtype=self.dtype, name=f'fc{layer}')(hidden)))
        return nn.Dense(self.num_classes, kernel_init=torch_default, bias_init=prior_prob_bias(), dtype=jnp.float32,
                        name='out')(hidden)


class RegBranch(nn.Module):
    """``[Linear, ReLU] x 2 + Linear(code_size)``; the last Linear in float32 (box codes are geometry)."""
    embed_dims: int
    code_size: int = box_coder.CODE_SIZE
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        for layer in range(2):
            hidden = nn.relu(nn.Dense(self.embed_dims, kernel_init=torch_default, dtype=self.dtype,
                                      name=f'fc{layer}')(hidden))
        return nn.Dense(self.code_size, kernel_init=torch_default, dtype=jnp.float32, name='out')(hidden)


class DetectionHead(nn.Module):
    """Object queries -> per-layer class logits and box codes.

    Returns a dict: ``cls_scores`` (L, B, NQ, K), ``bbox_preds`` (L, B, NQ, 10) with metric centres,
    ``queries`` (L, B, NQ, C) (each layer's output), ``references`` (L + 1, B, NQ, 3) (the normalised
    reference of layer l is ``references[l]``; the last is the final refinement), and
    ``sampling`` (per layer, whatever the cross-attention returns: locations and weights). Queries run in
    ``dtype`` (``fd3d_jax.models.precision``); references, logits and box codes are float32.
    """
    num_query: int = 900
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 512
    num_layers: int = 6
    num_classes: int = 10
    dropout: float = 0.1
    pc_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    cross_attn: Callable[..., nn.Module] = None
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, context, batch_size, deterministic=True):
        embed_dims, dtype = self.embed_dims, self.dtype
        embed = self.param('query_embedding', nn.initializers.normal(1.0), (self.num_query, 2 * embed_dims))
        query_pos = jnp.broadcast_to(embed[:, :embed_dims], (batch_size, self.num_query, embed_dims))
        query = jnp.broadcast_to(embed[:, embed_dims:], (batch_size, self.num_query, embed_dims)).astype(dtype)
        reference = jax.nn.sigmoid(nn.Dense(3, kernel_init=xavier_uniform, dtype=jnp.float32,
                                            name='reference_points')(query_pos))
        query_pos = query_pos.astype(dtype)
        layer_cls = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat else DecoderLayer
        cls_out, reg_out, queries, refs, samplings = [], [], [], [reference], []
        for layer in range(self.num_layers):
            query, sampling = layer_cls(embed_dims, self.num_heads, self.ffn_dims, self.dropout, self.cross_attn,
                                        dtype, name=f'layers_{layer}')(query, query_pos, reference, context,
                                                                       deterministic)
            raw = RegBranch(embed_dims, dtype=dtype, name=f'reg_branches_{layer}')(query)
            cls_out.append(ClsBranch(embed_dims, self.num_classes, dtype, name=f'cls_branches_{layer}')(query))
            reg_out.append(box_coder.decode_centers(raw, reference, self.pc_range))
            reference = box_coder.refine_reference(raw, reference)
            queries.append(query)
            refs.append(reference)
            samplings.append(sampling)
        return dict(cls_scores=jnp.stack(cls_out), bbox_preds=jnp.stack(reg_out), queries=jnp.stack(queries),
                    references=jnp.stack(refs), sampling=samplings)


class BEVCrossAttention(nn.Module):
    """BEVFormer's decoder cross-attention (``CustomMSDeformableAttention``): deformable attention
    on the BEV at the (x, y) of the 3D reference. context: dict(bev=(B, Q, C))."""
    bev_hw: Sequence[int]
    embed_dims: int = 256
    num_heads: int = 8
    num_points: int = 4
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query, query_pos, reference, context, deterministic=True):
        return MSDeformableAttention(self.embed_dims, self.num_heads, 1, self.num_points, self.dropout, self.dtype,
                                     name='attn')(query, context['bev'], reference[..., None, :2],
                                                  (tuple(self.bev_hw),), query_pos=query_pos,
                                                  deterministic=deterministic)
