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


def layer_norm(prefix, channels) -> Dict[str, Shape]:
    return {f'{prefix}.weight': (channels,), f'{prefix}.bias': (channels,)}


def batch_norm(prefix, channels) -> Dict[str, Shape]:
    return {f'{prefix}.{leaf}': (() if leaf == 'num_batches_tracked' else (channels,)) for leaf in BN_LEAVES}


def conv(prefix, out_c, in_c, kernel_size, bias=False) -> Dict[str, Shape]:
    keys = {f'{prefix}.weight': (out_c, in_c, kernel_size, kernel_size)}
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
    for stage, num_blocks in enumerate(blocks):
        planes = width * 2 ** stage
        for block in range(num_blocks):
            block_prefix = f'{prefix}.layer{stage + 1}.{block}'
            cin = inplanes if block == 0 else planes * EXPANSION
            keys.update(conv(f'{block_prefix}.conv1', planes, cin, 1))
            keys.update(batch_norm(f'{block_prefix}.bn1', planes))
            keys.update(conv(f'{block_prefix}.conv2', planes, planes, 3))
            if dcn[stage]:
                keys.update(conv(f'{block_prefix}.conv2.conv_offset', DCN_OFFSET_CHANNELS, planes, 3, bias=True))
            keys.update(batch_norm(f'{block_prefix}.bn2', planes))
            keys.update(conv(f'{block_prefix}.conv3', planes * EXPANSION, planes, 1))
            keys.update(batch_norm(f'{block_prefix}.bn3', planes * EXPANSION))
            if block == 0 and (strides[stage] != 1 or inplanes != planes * EXPANSION):
                keys.update(conv(f'{block_prefix}.downsample.0', planes * EXPANSION, inplanes, 1))
                keys.update(batch_norm(f'{block_prefix}.downsample.1', planes * EXPANSION))
        inplanes = planes * EXPANSION
    return keys


def fpn(prefix, neck) -> Dict[str, Shape]:
    """mmdet ``FPN`` (``end_level=-1``, no norm)."""
    ins, out_c = tuple(neck['in_channels']), neck['out_channels']
    start = neck.get('start_level', 0)
    used = len(ins) - start
    keys = {}
    for level in range(used):
        keys.update(conv(f'{prefix}.lateral_convs.{level}.conv', out_c, ins[start + level], 1, bias=True))
    for level in range(used):
        keys.update(conv(f'{prefix}.fpn_convs.{level}.conv', out_c, out_c, 3, bias=True))
    extra = neck['num_outs'] - used
    mode = neck.get('add_extra_convs', False)
    if mode and extra > 0:
        for extra_index in range(extra):
            cin = ins[-1] if (extra_index == 0 and mode in (True, 'on_input')) else out_c
            keys.update(conv(f'{prefix}.fpn_convs.{used + extra_index}.conv', out_c, cin, 3, bias=True))
    return keys


def msda(prefix, channels, heads, levels, points, out_proj=True) -> Dict[str, Shape]:
    """mmcv ``MultiScaleDeformableAttention``-style Linears (``CustomMSDeformableAttention``,
    ``MSDeformableAttention3D`` without ``output_proj``)."""
    keys = dict(linear(f'{prefix}.sampling_offsets', heads * levels * points * 2, channels))
    keys.update(linear(f'{prefix}.attention_weights', heads * levels * points, channels))
    keys.update(linear(f'{prefix}.value_proj', channels, channels))
    if out_proj:
        keys.update(linear(f'{prefix}.output_proj', channels, channels))
    return keys


def temporal_self_attention(prefix, channels, heads, points, queue=2, levels=1) -> Dict[str, Shape]:
    keys = dict(linear(f'{prefix}.sampling_offsets', queue * heads * levels * points * 2, queue * channels))
    keys.update(linear(f'{prefix}.attention_weights', queue * heads * levels * points, queue * channels))
    keys.update(linear(f'{prefix}.value_proj', channels, channels))
    keys.update(linear(f'{prefix}.output_proj', channels, channels))
    return keys


def multihead_attention(prefix, channels) -> Dict[str, Shape]:
    """mmcv ``MultiheadAttention``: ``attn`` = ``nn.MultiheadAttention`` (packed q/k/v)."""
    return {f'{prefix}.attn.in_proj_weight': (3 * channels, channels), f'{prefix}.attn.in_proj_bias': (3 * channels,),
            f'{prefix}.attn.out_proj.weight': (channels, channels), f'{prefix}.attn.out_proj.bias': (channels,)}


def ffn_and_norms(prefix, channels, ffn) -> Dict[str, Shape]:
    keys = dict(linear(f'{prefix}.ffns.0.layers.0.0', ffn, channels))
    keys.update(linear(f'{prefix}.ffns.0.layers.1', channels, ffn))
    for norm_index in range(3):
        keys.update(layer_norm(f'{prefix}.norms.{norm_index}', channels))
    return keys


def detr3d_cross_attention(prefix, channels, cams, levels, points) -> Dict[str, Shape]:
    keys = dict(linear(f'{prefix}.attention_weights', cams * levels * points, channels))
    keys.update(linear(f'{prefix}.output_proj', channels, channels))
    keys.update(linear(f'{prefix}.position_encoder.0', channels, 3))
    keys.update(layer_norm(f'{prefix}.position_encoder.1', channels))
    keys.update(linear(f'{prefix}.position_encoder.3', channels, channels))
    keys.update(layer_norm(f'{prefix}.position_encoder.4', channels))
    return keys


def branches(prefix, model_cfg) -> Dict[str, Shape]:
    """``cls_branches`` and ``reg_branches`` (one clone per decoder layer, ``with_box_refine``)."""
    channels = model_cfg.embed_dims
    keys = {}
    for layer in range(model_cfg.decoder_layers):
        keys.update(linear(f'{prefix}.cls_branches.{layer}.0', channels, channels))
        keys.update(layer_norm(f'{prefix}.cls_branches.{layer}.1', channels))
        keys.update(linear(f'{prefix}.cls_branches.{layer}.3', channels, channels))
        keys.update(layer_norm(f'{prefix}.cls_branches.{layer}.4', channels))
        keys.update(linear(f'{prefix}.cls_branches.{layer}.6', model_cfg.num_classes, channels))
    for layer in range(model_cfg.decoder_layers):
        keys.update(linear(f'{prefix}.reg_branches.{layer}.0', channels, channels))
        keys.update(linear(f'{prefix}.reg_branches.{layer}.2', channels, channels))
        keys.update(linear(f'{prefix}.reg_branches.{layer}.4', CODE_SIZE, channels))
    return keys


def bevformer_head(model_cfg) -> Dict[str, Shape]:
    channels, head = model_cfg.embed_dims, 'pts_bbox_head'
    transformer = f'{head}.transformer'
    keys = {f'{head}.positional_encoding.row_embed.weight': (model_cfg.bev_h, channels // 2),
            f'{head}.positional_encoding.col_embed.weight': (model_cfg.bev_w, channels // 2)}
    for layer in range(model_cfg.encoder_layers):
        prefix = f'{transformer}.encoder.layers.{layer}'
        keys.update(temporal_self_attention(f'{prefix}.attentions.0', channels, model_cfg.num_heads,
                                            model_cfg.tsa_points))
        keys.update(msda(f'{prefix}.attentions.1.deformable_attention', channels, model_cfg.num_heads,
                         model_cfg.num_levels, model_cfg.sca_points, out_proj=False))
        keys.update(linear(f'{prefix}.attentions.1.output_proj', channels, channels))
        keys.update(ffn_and_norms(prefix, channels, model_cfg.ffn_dims))
    for layer in range(model_cfg.decoder_layers):
        prefix = f'{transformer}.decoder.layers.{layer}'
        keys.update(multihead_attention(f'{prefix}.attentions.0', channels))
        keys.update(msda(f'{prefix}.attentions.1', channels, model_cfg.num_heads, 1, model_cfg.decoder_points))
        keys.update(ffn_and_norms(prefix, channels, model_cfg.ffn_dims))
    keys[f'{transformer}.level_embeds'] = (max(NUM_FEATURE_LEVELS, model_cfg.num_levels), channels)
    keys[f'{transformer}.cams_embeds'] = (model_cfg.num_cams, channels)
    keys.update(linear(f'{transformer}.reference_points', 3, channels))
    keys.update(linear(f'{transformer}.can_bus_mlp.0', channels // 2, CAN_BUS_DIMS))
    keys.update(linear(f'{transformer}.can_bus_mlp.2', channels, channels // 2))
    keys.update(layer_norm(f'{transformer}.can_bus_mlp.norm', channels))
    keys.update(branches(head, model_cfg))
    keys[f'{head}.bev_embedding.weight'] = (model_cfg.bev_h * model_cfg.bev_w, channels)
    keys[f'{head}.query_embedding.weight'] = (model_cfg.num_query, 2 * channels)
    keys[f'{head}.code_weights'] = (CODE_SIZE,)
    return keys


def detr3d_head(model_cfg) -> Dict[str, Shape]:
    channels, head = model_cfg.embed_dims, 'pts_bbox_head'
    transformer = f'{head}.transformer'
    keys = {}
    for layer in range(model_cfg.decoder_layers):
        prefix = f'{transformer}.decoder.layers.{layer}'
        keys.update(multihead_attention(f'{prefix}.attentions.0', channels))
        keys.update(detr3d_cross_attention(f'{prefix}.attentions.1', channels, model_cfg.num_cams, model_cfg.num_levels,
                                           model_cfg.num_points))
        keys.update(ffn_and_norms(prefix, channels, model_cfg.ffn_dims))
    keys.update(linear(f'{transformer}.reference_points', 3, channels))
    keys.update(branches(head, model_cfg))
    keys[f'{head}.query_embedding.weight'] = (model_cfg.num_query, 2 * channels)
    keys[f'{head}.code_weights'] = (CODE_SIZE,)
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
