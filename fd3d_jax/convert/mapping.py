"""Official state-dict key <-> our Flax param path, with the layout transform of each tensor.

``plan(model_cfg)`` maps every key of ``official_keys.official_shapes(model_cfg)`` to either a list
of ``Target``s (the Flax leaves it fills) or ``Ignored(reason)`` (keys that carry no parameter of our
model). Layouts (``Target.kind``; every transform is a transpose/reshape or a sign flip, so both
directions are exact):

==============  ===================================  =========================================
kind            PyTorch tensor                       Flax leaf
==============  ===================================  =========================================
copy            any (embeddings, biases, LN, BN)      same shape
linear          ``nn.Linear.weight`` (out, in)        ``Dense.kernel`` (in, out)
conv            ``Conv2d.weight`` (O, I, kh, kw)      ``Conv.kernel`` (kh, kw, I, O) (also DCNv2
                                                      ``weight`` and its ``conv_offset``)
heads_in        q/k/v rows of ``in_proj_weight``      ``DenseGeneral`` (C_in, M, C/M)
heads_bias      q/k/v rows of ``in_proj_bias``        (M, C/M)
heads_out       ``out_proj.weight`` (C_out, C)        (M, C/M, C_out)
reg_out(_bias)  ``reg_branches.{l}.4`` (10, C)/(10,)  like linear/copy, yaw rows converted
==============  ===================================  =========================================

Our param tree (``fd3d_jax/models``): ResNet ``layer{s}.0`` -> ``layer{s}_0``, blocks 1..n-1 ->
``layer{s}_rest/block`` stacked on axis 0 (``Target.index = b - 1``; one ``nn.scan``), BN
``weight, bias, running_mean, running_var`` -> ``scale, bias, mean, var`` (frozen BN: plain
``params`` leaves, no ``batch_stats`` collection); FPN ``lateral_convs.{i}.conv`` ->
``lateral_convs_{i}``; BEVFormer encoder layers -> ``encoder/layers`` stacked on axis 0 (TSA ``tsa``,
SCA ``sca/deformable_attention_*`` + ``sca/output_proj``, ``ffn/fc1|fc2``, ``norm1..3``); decoder
layers -> ``head/layers_{l}`` (``self_attn/attn/{query,key,value,out}`` = flax
``MultiHeadDotProductAttention``: torch's packed ``in_proj`` split in thirds q, k, v, head ``m``
taking features ``m*C/M:(m+1)*C/M`` as ``nn.MultiheadAttention``'s ``view``; ``cross_attn/attn/*``
for BEVFormer, ``cross_attn/{attention_weights,output_proj,position_encoder_*}`` for DETR3D);
``head/{cls,reg}_branches_{l}/{fc0,norm0,fc1,norm1,out}``; ``can_bus_mlp.{0,2,norm}`` ->
``can_bus_fc0|fc1|norm``; ``positional_encoding.{row,col}_embed`` -> ``row_embed``/``col_embed``.

No output permutation is needed for the attention Linears: our modules reshape the Dense outputs in
the originals' ``.view`` order (TSA offsets ``(M, queue, L, P, 2)``, weights ``(M, queue, L*P)``;
SCA offsets ``(M, L, P, 2)`` with ``P = (P/D, D)`` anchor fastest; MSDA ``(M, L, P, 2)``; DETR3D
weights ``(cams, points, levels)``), and DCNv2's ``conv_offset`` channels are used as mmcv does
(``chunk(3)`` + ``cat`` of the first two = the first 18 channels, interleaved (dy, dx)).

Where our model deviates from the original and a converted checkpoint depends on it:

* ``level_embeds``: the original always has ``num_feature_levels = 4`` rows and adds only the first
  L (= ``model.num_levels``; 1 for tiny/small); ours has L rows. Rows L..3 are dropped (listed as
  ignored) and written back from ``fill`` or as zeros by ``flax_to_torch``.
* Box code yaw: the released checkpoints regress mmdet3d-0.x's ``yaw_0x = -yaw - pi/2`` (same
  ``w, l`` order and LiDAR-frame velocity as ours, ``fd3d_jax/data/nuscenes_meta.py``), so their
  code entries 6, 7 are ``(sin, cos)(yaw_0x) = (-cos yaw, -sin yaw)``. With ``convert_yaw`` (the
  default) the last Linear of every ``reg_branches.{l}`` is converted: our row 6 = -their row 7,
  row 7 = -their row 6 (an involution; entries 6, 7 feed only the decoded yaw and the loss, never
  the reference refinement, which reads entries 0, 1, 4), so the converted model predicts our yaw.
* ``code_weights`` (loss weights, an ``nn.Parameter`` with ``requires_grad=False``) and BN
  ``num_batches_tracked`` carry nothing our model uses (``Ignored``).
* Not parameters, but needed for parity with the released BEVFormer checkpoints (config flags, not
  conversions): they were presumably trained before the ``shift_ref_2d`` fix (set
  ``model.reproduce_shift_bug=True``; docs/models.md), with ``rotate_center=(100, 100)`` for
  every BEV size (our configs' default); ``tsa_batch_bug`` / ``sca_batch0_hits`` / ``prev_bev_batch0`` only matter for
  batch > 1 (the originals trained one sample per GPU). Image normalisation (tiny: torchvision RGB;
  small/base/DETR3D-R101: caffe BGR) is in ``config.data``.
"""
import dataclasses
import re
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from fd3d_jax.convert.official_keys import official_shapes
from fd3d_jax.models import detector_class

BN_COUNTER = ('BatchNorm step counter: our frozen BatchNorm uses only the running statistics '
              '(the counter matters only for momentum=None training)')
CODE_WEIGHTS = ('loss weights of the box-code entries (nn.Parameter, requires_grad=False), unused at '
                'inference; here they are config.loss.code_weights')
UNUSED_LEVEL_EMBEDS = ('rows >= model.num_levels of level_embeds: PerceptionTransformer always has '
                       'num_feature_levels=4 rows but adds only the first num_levels to the features')
YAW_ROWS = (6, 7)                      # (sin, cos) of the box code


@dataclasses.dataclass(frozen=True)
class Target:
    """A Flax leaf (or the ``index``-th slice of a scan-stacked leaf) filled from rows ``rows`` of the
    PyTorch tensor (all of it when None) with layout ``kind`` (``heads``: attention heads)."""
    path: Tuple[str, ...]
    kind: str
    index: Optional[int] = None
    rows: Optional[Tuple[int, int]] = None
    heads: int = 1

    def describe(self):
        return '/'.join(self.path) + ('' if self.index is None else f'[{self.index}]')


@dataclasses.dataclass(frozen=True)
class Ignored:
    reason: str


Entry = Union[List[Target], Ignored]


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------

def swap_yaw(array):
    """mmdet3d-0.x code rows (sin, cos)(yaw_0x) <-> ours (sin, cos)(yaw) on axis 0 (self-inverse)."""
    swapped = np.array(array, copy=True)
    sin_row, cos_row = YAW_ROWS
    swapped[sin_row], swapped[cos_row] = -array[cos_row], -array[sin_row]
    return swapped


def flax_shape(target: Target, torch_shape):
    """The Flax (slice) shape ``target`` produces from a PyTorch tensor (slice) of ``torch_shape``."""
    shape, heads = tuple(torch_shape), target.heads
    return {'copy': lambda: shape, 'reg_out_bias': lambda: shape,
            'linear': lambda: (shape[1], shape[0]), 'reg_out': lambda: (shape[1], shape[0]),
            'conv': lambda: (shape[2], shape[3], shape[1], shape[0]),
            'heads_in': lambda: (shape[1], heads, shape[0] // heads),
            'heads_bias': lambda: (heads, shape[0] // heads),
            'heads_out': lambda: (heads, shape[1] // heads, shape[0])}[target.kind]()


def to_flax(target: Target, torch_array):
    """PyTorch layout -> Flax layout (exact)."""
    torch_array = np.asarray(torch_array)
    if target.kind in ('copy', 'heads_bias'):
        flax_array = torch_array
    elif target.kind == 'reg_out_bias':
        flax_array = swap_yaw(torch_array)
    elif target.kind in ('linear', 'heads_in', 'heads_out'):
        flax_array = torch_array.T
    elif target.kind == 'reg_out':
        flax_array = swap_yaw(torch_array).T
    elif target.kind == 'conv':
        flax_array = torch_array.transpose(2, 3, 1, 0)
    else:
        raise ValueError(target.kind)
    return np.array(flax_array, order='C').reshape(flax_shape(target, torch_array.shape))


def to_torch(target: Target, flax_array, torch_shape):
    """Flax layout -> PyTorch layout (exact inverse of ``to_flax``)."""
    shape = tuple(torch_shape)
    flax_array = np.asarray(flax_array)
    if target.kind in ('copy', 'heads_bias'):
        torch_array = flax_array.reshape(shape)
    elif target.kind == 'reg_out_bias':
        torch_array = swap_yaw(flax_array.reshape(shape))
    elif target.kind in ('linear', 'heads_in', 'heads_out'):
        torch_array = flax_array.reshape(shape[1], shape[0]).T
    elif target.kind == 'reg_out':
        torch_array = swap_yaw(flax_array.reshape(shape[1], shape[0]).T)
    elif target.kind == 'conv':
        torch_array = flax_array.reshape(shape[2], shape[3], shape[1], shape[0]).transpose(3, 2, 0, 1)
    else:
        raise ValueError(target.kind)
    return np.array(torch_array, order='C')


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------

_LEAVES = {
    'linear': {'weight': ('kernel', 'linear'), 'bias': ('bias', 'copy')},
    'conv': {'weight': ('kernel', 'conv'), 'bias': ('bias', 'copy')},
    'ln': {'weight': ('scale', 'copy'), 'bias': ('bias', 'copy')},
    'bn': {'weight': ('scale', 'copy'), 'bias': ('bias', 'copy'), 'running_mean': ('mean', 'copy'),
           'running_var': ('var', 'copy')},
}


def _leaf(module, path, leaf, index=None):
    name, kind = _LEAVES[module][leaf]
    return [Target(tuple(path) + (name,), kind, index)]


def _backbone(rest, base):
    match = re.fullmatch(r'(conv1|bn1)\.(\w+)', rest)
    if match:
        return _leaf('conv' if match[1] == 'conv1' else 'bn', base + (match[1],), match[2])
    match = re.fullmatch(r'layer(\d+)\.(\d+)\.(.+)', rest)
    if not match:
        return None
    block_index = int(match[2])
    block = base + ((f'layer{match[1]}_0',) if block_index == 0 else (f'layer{match[1]}_rest', 'block'))
    index = None if block_index == 0 else block_index - 1
    sub = match[3]
    for pattern, module, name in ((r'(conv\d)\.(weight)', 'conv', None),
                                  (r'conv2\.conv_offset\.(weight|bias)', 'conv', ('conv2', 'conv_offset')),
                                  (r'(bn\d)\.(\w+)', 'bn', None),
                                  (r'downsample\.0\.(weight)', 'conv', ('downsample_conv',)),
                                  (r'downsample\.1\.(\w+)', 'bn', ('downsample_bn',))):
        sub_match = re.fullmatch(pattern, sub)
        if sub_match:
            names = name or (sub_match[1],)
            return _leaf(module, block + names, sub_match.groups()[-1], index)
    return None


def _neck(rest, base):
    match = re.fullmatch(r'(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)', rest)
    return _leaf('conv', base + (f'{match[1]}_{match[2]}',), match[3]) if match else None


def _ffn_and_norms(rest, base, index=None):
    match = re.fullmatch(r'ffns\.0\.layers\.(0\.0|1)\.(weight|bias)', rest)
    if match:
        return _leaf('linear', base + ('ffn', 'fc1' if match[1] == '0.0' else 'fc2'), match[2], index)
    match = re.fullmatch(r'norms\.(\d)\.(weight|bias)', rest)
    if match:
        return _leaf('ln', base + (f'norm{int(match[1]) + 1}',), match[2], index)
    return None


def _encoder_layer(rest, index):
    base = ('encoder', 'layers')
    match = re.fullmatch(r'attentions\.0\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)',
                         rest)
    if match:
        return _leaf('linear', base + ('tsa', match[1]), match[2], index)
    match = re.fullmatch(r'attentions\.1\.deformable_attention\.(sampling_offsets|attention_weights|value_proj)'
                         r'\.(weight|bias)', rest)
    if match:
        return _leaf('linear', base + ('sca', f'deformable_attention_{match[1]}'), match[2], index)
    match = re.fullmatch(r'attentions\.1\.output_proj\.(weight|bias)', rest)
    if match:
        return _leaf('linear', base + ('sca', 'output_proj'), match[1], index)
    return _ffn_and_norms(rest, base, index)


def _decoder_layer(rest, layer, model_cfg):
    base = ('head', f'layers_{layer}')
    channels, heads = model_cfg.embed_dims, model_cfg.num_heads
    attn = base + ('self_attn', 'attn')
    match = re.fullmatch(r'attentions\.0\.attn\.in_proj_(weight|bias)', rest)
    if match:
        kind, leaf = ('heads_in', 'kernel') if match[1] == 'weight' else ('heads_bias', 'bias')
        return [Target(attn + (name, leaf), kind, rows=(i * channels, (i + 1) * channels), heads=heads)
                for i, name in enumerate(('query', 'key', 'value'))]
    match = re.fullmatch(r'attentions\.0\.attn\.out_proj\.(weight|bias)', rest)
    if match:
        return [Target(attn + ('out', 'kernel'), 'heads_out', heads=heads) if match[1] == 'weight'
                else Target(attn + ('out', 'bias'), 'copy')]
    cross = base + ('cross_attn',)
    if detector_class(model_cfg).has_bev:   # BEVFormer's deformable cross-attention
        match = re.fullmatch(r'attentions\.1\.(sampling_offsets|attention_weights|value_proj|output_proj)'
                             r'\.(weight|bias)', rest)
        if match:
            return _leaf('linear', cross + ('attn', match[1]), match[2])
    else:
        match = re.fullmatch(r'attentions\.1\.(attention_weights|output_proj)\.(weight|bias)', rest)
        if match:
            return _leaf('linear', cross + (match[1],), match[2])
        match = re.fullmatch(r'attentions\.1\.position_encoder\.([0134])\.(weight|bias)', rest)
        if match:
            module, name = {'0': ('linear', 'fc0'), '1': ('ln', 'norm0'), '3': ('linear', 'fc1'),
                            '4': ('ln', 'norm1')}[match[1]]
            return _leaf(module, cross + (f'position_encoder_{name}',), match[2])
    return _ffn_and_norms(rest, base)


def _branch(rest, convert_yaw):
    match = re.fullmatch(r'(cls|reg)_branches\.(\d+)\.(\d+)\.(weight|bias)', rest)
    if not match:
        return None
    base = ('head', f'{match[1]}_branches_{match[2]}')
    layers = ({'0': ('linear', 'fc0'), '1': ('ln', 'norm0'), '3': ('linear', 'fc1'), '4': ('ln', 'norm1'),
               '6': ('linear', 'out')} if match[1] == 'cls' else
              {'0': ('linear', 'fc0'), '2': ('linear', 'fc1'), '4': ('linear', 'out')})
    if match[3] not in layers:
        return None
    module, name = layers[match[3]]
    if match[1] == 'reg' and name == 'out' and convert_yaw:
        return [Target(base + (name, 'kernel' if match[4] == 'weight' else 'bias'),
                       'reg_out' if match[4] == 'weight' else 'reg_out_bias')]
    return _leaf(module, base + (name,), match[4])


def _head(rest, model_cfg, convert_yaw):
    bevformer = detector_class(model_cfg).has_bev
    if rest == 'query_embedding.weight':
        return [Target(('head', 'query_embedding'), 'copy')]
    if bevformer and rest == 'bev_embedding.weight':
        return [Target(('bev_embedding',), 'copy')]
    match = re.fullmatch(r'positional_encoding\.(row|col)_embed\.weight', rest)
    if bevformer and match:
        return [Target((f'{match[1]}_embed',), 'copy')]
    found = _branch(rest, convert_yaw)
    if found:
        return found
    if not rest.startswith('transformer.'):
        return None
    rest = rest[len('transformer.'):]
    match = re.fullmatch(r'reference_points\.(weight|bias)', rest)
    if match:
        return _leaf('linear', ('head', 'reference_points'), match[1])
    match = re.fullmatch(r'decoder\.layers\.(\d+)\.(.+)', rest)
    if match:
        return _decoder_layer(match[2], int(match[1]), model_cfg)
    if not bevformer:
        return None
    if rest == 'level_embeds':
        return [Target(('level_embeds',), 'copy', rows=(0, model_cfg.num_levels))]
    if rest == 'cams_embeds':
        return [Target(('cams_embeds',), 'copy')]
    match = re.fullmatch(r'can_bus_mlp\.(0|2|norm)\.(weight|bias)', rest)
    if match:
        module, name = {'0': ('linear', 'can_bus_fc0'), '2': ('linear', 'can_bus_fc1'),
                        'norm': ('ln', 'can_bus_norm')}[match[1]]
        return _leaf(module, (name,), match[2])
    match = re.fullmatch(r'encoder\.layers\.(\d+)\.(.+)', rest)
    if match:
        return _encoder_layer(match[2], int(match[1]))
    return None


def translate(key, model_cfg, convert_yaw=True) -> Optional[Entry]:
    """The entry of one official key (None: a name this mapping does not know)."""
    if key.endswith('.num_batches_tracked'):
        return Ignored(BN_COUNTER)
    if key == 'pts_bbox_head.code_weights':
        return Ignored(CODE_WEIGHTS)
    if key.startswith('img_backbone.'):
        return _backbone(key[len('img_backbone.'):], ('image_features', 'backbone'))
    if key.startswith('img_neck.'):
        return _neck(key[len('img_neck.'):], ('image_features', 'neck'))
    if key.startswith('pts_bbox_head.'):
        return _head(key[len('pts_bbox_head.'):], model_cfg, convert_yaw)
    return None


def plan(model_cfg, convert_yaw=True) -> Dict[str, Optional[Entry]]:
    """Every official key of ``model_cfg`` -> its entry (None only for a key this mapping lacks)."""
    return {k: translate(k, model_cfg, convert_yaw) for k in official_shapes(model_cfg)}
