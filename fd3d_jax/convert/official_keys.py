"""State-dict keys and shapes of the official PyTorch checkpoints, derived from a model config.

``official_shapes(model_cfg)`` lists every key of ``model.state_dict()`` of the original detector
(mmdet3d 0.17 ``MVXTwoStageDetector`` subclasses: ``img_backbone``, ``img_neck``, ``pts_bbox_head``)
that corresponds to ``model_cfg`` (``config.model`` of ``configs/{bevformer_tiny,bevformer_small,
bevformer_base,detr3d_r50,detr3d_r101}.py``), with the PyTorch shape. Facts from the original code
(names are registered module attribute names, joined by ``.``; ``ModuleList``/``Sequential`` children
by their index):

* mmdet 2.x ``ResNet``: stem ``conv1`` (bias-free), ``bn1``; ``layer{s}.{b}`` Bottlenecks with
  ``conv1/bn1`` (1x1), ``conv2/bn2`` (3x3), ``conv3/bn3`` (1x1, 4x planes) and, in block 0 when the
  stride or the width changes, ``downsample.0`` (1x1 conv) + ``downsample.1`` (BN). ``dcn=DCNv2``
  makes ``conv2`` an mmcv ``ModulatedDeformConv2dPack``: ``conv2.weight`` (no bias) plus the
  ``conv2.conv_offset`` ``nn.Conv2d`` (``3 * 3 * 3 = 27`` outputs, with bias). Every
  ``BatchNorm2d`` has ``weight, bias, running_mean, running_var, num_batches_tracked`` (the latter a
  0-d int64 buffer). Stage blocks: R50 (3, 4, 6, 3), R101 (3, 4, 23, 3).
* mmdet 2.x ``FPN`` with ``ConvModule``s (no norm, so conv bias): ``lateral_convs.{i}.conv``
  (1x1, one per used input) and ``fpn_convs.{i}.conv`` (3x3; the extra levels are appended to
  ``fpn_convs``; with ``add_extra_convs='on_output'`` they read ``out_channels``).
* mmcv 1.x transformer layers: ``attentions.{k}`` in operation order, ``ffns.0.layers.0.0``
  (Linear C->F) and ``ffns.0.layers.1`` (Linear F->C) (mmcv ``FFN`` with ``num_fcs=2``),
  ``norms.{0,1,2}`` (LayerNorm). ``MultiheadAttention`` wraps ``nn.MultiheadAttention`` as ``attn``:
  ``in_proj_weight`` (3C, C), ``in_proj_bias`` (3C,), ``out_proj.weight``, ``out_proj.bias``.
* BEVFormer (``projects/mmdet3d_plugin/bevformer``): ``BEVFormerHead`` (``cls_branches.{l}`` =
  ``[Linear, LayerNorm, ReLU] x 2 + Linear`` -> indices 0, 1, 3, 4, 6; ``reg_branches.{l}`` =
  ``[Linear, ReLU] x 2 + Linear`` -> 0, 2, 4; ``bev_embedding``, ``query_embedding`` (NQ, 2C),
  ``code_weights`` (an ``nn.Parameter`` with ``requires_grad=False``), ``positional_encoding`` =
  ``LearnedPositionalEncoding`` ``row_embed``/``col_embed``); ``PerceptionTransformer``
  (``level_embeds`` (num_feature_levels = 4, never overridden by the configs, C), ``cams_embeds``,
  ``reference_points`` Linear(C, 3), ``can_bus_mlp`` = ``Linear(18, C/2), ReLU, Linear(C/2, C),
  ReLU`` + ``norm`` LayerNorm); encoder layer ``attentions.0`` = ``TemporalSelfAttention``
  (``sampling_offsets`` Linear(2C, 2*M*1*P*2), ``attention_weights`` Linear(2C, 2*M*1*P),
  ``value_proj``, ``output_proj``), ``attentions.1`` = ``SpatialCrossAttention`` (``output_proj`` and
  ``deformable_attention`` = ``MSDeformableAttention3D`` with ``sampling_offsets``,
  ``attention_weights``, ``value_proj``; its ``output_proj`` is ``None``); decoder layer
  ``attentions.1`` = ``CustomMSDeformableAttention`` (the four Linears of mmcv's MSDA).
* DETR3D (``projects/mmdet3d_plugin/models``): ``Detr3DHead`` (same branches, ``query_embedding``,
  ``code_weights``; its ``SinePositionalEncoding`` has no parameters), ``Detr3DTransformer``
  (``reference_points`` only), decoder ``attentions.1`` = ``Detr3DCrossAtten``
  (``attention_weights`` Linear(C, cams * levels * points), ``output_proj``, ``position_encoder`` =
  ``Linear(3, C), LN, ReLU, Linear(C, C), LN, ReLU`` -> indices 0, 1, 3, 4).

Toy configs (``base_width`` < 64) get the same layout with their sizes (stem width = ``base_width``,
as in our ResNet); there is no official checkpoint for them. ``detr3d_r50`` has no official release
in WangYueFt/detr3d either: its list is DETR3D's head and neck on an mmdet ResNet-50 (pytorch style,
no DCN), i.e. what the original code builds for that config.
"""
from typing import Dict, Tuple

Shape = Tuple[int, ...]

# mmdet ResNet.arch_settings (Bottleneck, expansion 4).
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4
STAGE_STRIDES = (1, 2, 2, 2)
DCN_OFFSET_CHANNELS = 3 * 3 * 3        # deform_groups * 3 * kh * kw (ModulatedDeformConv2dPack)
CAN_BUS_DIMS = 18
NUM_FEATURE_LEVELS = 4                 # PerceptionTransformer default, kept by every BEVFormer config
CODE_SIZE = 10
BN_LEAVES = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def linear(prefix, out_features, in_features) -> Dict[str, Shape]:
    return {f'{prefix}.weight': (out_features, in_features), f'{prefix}.bias': (out_features,)}


def layer_norm(prefix, c) -> Dict[str, Shape]:
    return {f'{prefix}.weight': (c,), f'{prefix}.bias': (c,)}


def batch_norm(prefix, c) -> Dict[str, Shape]:
    return {f'{prefix}.{leaf}': (() if leaf == 'num_batches_tracked' else (c,)) for leaf in BN_LEAVES}


def conv(prefix, out_c, in_c, k, bias=False) -> Dict[str, Shape]:
    keys = {f'{prefix}.weight': (out_c, in_c, k, k)}
    if bias:
        keys[f'{prefix}.bias'] = (out_c,)
    return keys


def resnet(prefix, backbone) -> Dict[str, Shape]:
    """mmdet ``ResNet`` (Bottleneck, ``deep_stem=False``, ``avg_down=False``)."""
    blocks = tuple(backbone.get('stage_blocks') or STAGE_BLOCKS[backbone['depth']])
    width = backbone.get('base_width', 64)
    dcn = tuple(backbone.get('dcn_stages', (False,) * len(blocks)))
    strides = tuple(backbone.get('strides', STAGE_STRIDES))
    keys = dict(conv(f'{prefix}.conv1', width, 3, 7))
    keys.update(batch_norm(f'{prefix}.bn1', width))
    inplanes = width
    for s, num_blocks in enumerate(blocks):
        planes = width * 2 ** s
        for b in range(num_blocks):
            p = f'{prefix}.layer{s + 1}.{b}'
            cin = inplanes if b == 0 else planes * EXPANSION
            keys.update(conv(f'{p}.conv1', planes, cin, 1))
            keys.update(batch_norm(f'{p}.bn1', planes))
            keys.update(conv(f'{p}.conv2', planes, planes, 3))
            if dcn[s]:
                keys.update(conv(f'{p}.conv2.conv_offset', DCN_OFFSET_CHANNELS, planes, 3, bias=True))
            keys.update(batch_norm(f'{p}.bn2', planes))
            keys.update(conv(f'{p}.conv3', planes * EXPANSION, planes, 1))
            keys.update(batch_norm(f'{p}.bn3', planes * EXPANSION))
            if b == 0 and (strides[s] != 1 or inplanes != planes * EXPANSION):
                keys.update(conv(f'{p}.downsample.0', planes * EXPANSION, inplanes, 1))
                keys.update(batch_norm(f'{p}.downsample.1', planes * EXPANSION))
        inplanes = planes * EXPANSION
    return keys


def fpn(prefix, neck) -> Dict[str, Shape]:
    """mmdet ``FPN`` (``end_level=-1``, no norm)."""
    ins, out_c = tuple(neck['in_channels']), neck['out_channels']
    start = neck.get('start_level', 0)
    used = len(ins) - start
    keys = {}
    for i in range(used):
        keys.update(conv(f'{prefix}.lateral_convs.{i}.conv', out_c, ins[start + i], 1, bias=True))
    for i in range(used):
        keys.update(conv(f'{prefix}.fpn_convs.{i}.conv', out_c, out_c, 3, bias=True))
    extra = neck['num_outs'] - used
    mode = neck.get('add_extra_convs', False)
    if mode and extra > 0:
        for j in range(extra):
            cin = ins[-1] if (j == 0 and mode in (True, 'on_input')) else out_c
            keys.update(conv(f'{prefix}.fpn_convs.{used + j}.conv', out_c, cin, 3, bias=True))
    return keys


def msda(prefix, c, heads, levels, points, out_proj=True) -> Dict[str, Shape]:
    """mmcv ``MultiScaleDeformableAttention``-style Linears (``CustomMSDeformableAttention``,
    ``MSDeformableAttention3D`` without ``output_proj``)."""
    keys = dict(linear(f'{prefix}.sampling_offsets', heads * levels * points * 2, c))
    keys.update(linear(f'{prefix}.attention_weights', heads * levels * points, c))
    keys.update(linear(f'{prefix}.value_proj', c, c))
    if out_proj:
        keys.update(linear(f'{prefix}.output_proj', c, c))
    return keys


def temporal_self_attention(prefix, c, heads, points, queue=2, levels=1) -> Dict[str, Shape]:
    keys = dict(linear(f'{prefix}.sampling_offsets', queue * heads * levels * points * 2, queue * c))
    keys.update(linear(f'{prefix}.attention_weights', queue * heads * levels * points, queue * c))
    keys.update(linear(f'{prefix}.value_proj', c, c))
    keys.update(linear(f'{prefix}.output_proj', c, c))
    return keys


def multihead_attention(prefix, c) -> Dict[str, Shape]:
    """mmcv ``MultiheadAttention``: ``attn`` = ``nn.MultiheadAttention`` (packed q/k/v)."""
    return {f'{prefix}.attn.in_proj_weight': (3 * c, c), f'{prefix}.attn.in_proj_bias': (3 * c,),
            f'{prefix}.attn.out_proj.weight': (c, c), f'{prefix}.attn.out_proj.bias': (c,)}


def ffn_and_norms(prefix, c, ffn) -> Dict[str, Shape]:
    keys = dict(linear(f'{prefix}.ffns.0.layers.0.0', ffn, c))
    keys.update(linear(f'{prefix}.ffns.0.layers.1', c, ffn))
    for k in range(3):
        keys.update(layer_norm(f'{prefix}.norms.{k}', c))
    return keys


def detr3d_cross_attention(prefix, c, cams, levels, points) -> Dict[str, Shape]:
    keys = dict(linear(f'{prefix}.attention_weights', cams * levels * points, c))
    keys.update(linear(f'{prefix}.output_proj', c, c))
    keys.update(linear(f'{prefix}.position_encoder.0', c, 3))
    keys.update(layer_norm(f'{prefix}.position_encoder.1', c))
    keys.update(linear(f'{prefix}.position_encoder.3', c, c))
    keys.update(layer_norm(f'{prefix}.position_encoder.4', c))
    return keys


def branches(prefix, m) -> Dict[str, Shape]:
    """``cls_branches`` and ``reg_branches`` (one clone per decoder layer, ``with_box_refine``)."""
    c = m.embed_dims
    keys = {}
    for l in range(m.decoder_layers):
        keys.update(linear(f'{prefix}.cls_branches.{l}.0', c, c))
        keys.update(layer_norm(f'{prefix}.cls_branches.{l}.1', c))
        keys.update(linear(f'{prefix}.cls_branches.{l}.3', c, c))
        keys.update(layer_norm(f'{prefix}.cls_branches.{l}.4', c))
        keys.update(linear(f'{prefix}.cls_branches.{l}.6', m.num_classes, c))
    for l in range(m.decoder_layers):
        keys.update(linear(f'{prefix}.reg_branches.{l}.0', c, c))
        keys.update(linear(f'{prefix}.reg_branches.{l}.2', c, c))
        keys.update(linear(f'{prefix}.reg_branches.{l}.4', CODE_SIZE, c))
    return keys


def bevformer_head(m) -> Dict[str, Shape]:
    c, h = m.embed_dims, 'pts_bbox_head'
    t = f'{h}.transformer'
    keys = {f'{h}.positional_encoding.row_embed.weight': (m.bev_h, c // 2),
            f'{h}.positional_encoding.col_embed.weight': (m.bev_w, c // 2)}
    for i in range(m.encoder_layers):
        p = f'{t}.encoder.layers.{i}'
        keys.update(temporal_self_attention(f'{p}.attentions.0', c, m.num_heads, m.tsa_points))
        keys.update(msda(f'{p}.attentions.1.deformable_attention', c, m.num_heads, m.num_levels, m.sca_points,
                         out_proj=False))
        keys.update(linear(f'{p}.attentions.1.output_proj', c, c))
        keys.update(ffn_and_norms(p, c, m.ffn_dims))
    for l in range(m.decoder_layers):
        p = f'{t}.decoder.layers.{l}'
        keys.update(multihead_attention(f'{p}.attentions.0', c))
        keys.update(msda(f'{p}.attentions.1', c, m.num_heads, 1, m.decoder_points))
        keys.update(ffn_and_norms(p, c, m.ffn_dims))
    keys[f'{t}.level_embeds'] = (max(NUM_FEATURE_LEVELS, m.num_levels), c)
    keys[f'{t}.cams_embeds'] = (m.num_cams, c)
    keys.update(linear(f'{t}.reference_points', 3, c))
    keys.update(linear(f'{t}.can_bus_mlp.0', c // 2, CAN_BUS_DIMS))
    keys.update(linear(f'{t}.can_bus_mlp.2', c, c // 2))
    keys.update(layer_norm(f'{t}.can_bus_mlp.norm', c))
    keys.update(branches(h, m))
    keys[f'{h}.bev_embedding.weight'] = (m.bev_h * m.bev_w, c)
    keys[f'{h}.query_embedding.weight'] = (m.num_query, 2 * c)
    keys[f'{h}.code_weights'] = (CODE_SIZE,)
    return keys


def detr3d_head(m) -> Dict[str, Shape]:
    c, h = m.embed_dims, 'pts_bbox_head'
    t = f'{h}.transformer'
    keys = {}
    for l in range(m.decoder_layers):
        p = f'{t}.decoder.layers.{l}'
        keys.update(multihead_attention(f'{p}.attentions.0', c))
        keys.update(detr3d_cross_attention(f'{p}.attentions.1', c, m.num_cams, m.num_levels, m.num_points))
        keys.update(ffn_and_norms(p, c, m.ffn_dims))
    keys.update(linear(f'{t}.reference_points', 3, c))
    keys.update(branches(h, m))
    keys[f'{h}.query_embedding.weight'] = (m.num_query, 2 * c)
    keys[f'{h}.code_weights'] = (CODE_SIZE,)
    return keys


def official_shapes(model_cfg) -> Dict[str, Shape]:
    """Every state-dict key of the original detector for ``model_cfg`` -> its PyTorch shape."""
    heads = {'bevformer': bevformer_head, 'detr3d': detr3d_head}
    if model_cfg.name not in heads:
        raise ValueError(f"no official checkpoint layout for model {model_cfg.name!r}")
    keys = dict(resnet('img_backbone', dict(model_cfg.backbone)))
    keys.update(fpn('img_neck', dict(model_cfg.neck)))
    keys.update(heads[model_cfg.name](model_cfg))
    return keys


def official_dtype(key):
    """numpy dtype name of a key in the original checkpoints (fp32 training; BN step counters int64)."""
    return 'int64' if key.endswith('.num_batches_tracked') else 'float32'
