"""Numeric parity with PyTorch on random weights, through the checkpoint converter.

Each test builds a random plain-torch module whose ``state_dict`` has the official key names
(mmdet 2.x ``ResNet`` / ``FPN``, mmcv 1.x ``ModulatedDeformConv2dPack``, ``MultiheadAttention``,
``MultiScaleDeformableAttention``, BEVFormer's decoder layer), converts it with our mapping
(``torch_to_flax`` on a whole official state dict, or ``mapping.translate`` + ``mapping.to_flax`` for
a lone module), runs our Flax module with the converted params and compares in float32:
``max |ours - torch| / max |torch| <= 1e-4`` (``check``; each value is printed, ``pytest -s``).

The torch references are restatements written here from the originals (facts only): mmdet 2.x
``ResNet``/``Bottleneck`` (caffe style: stride on the 1x1 ``conv1``; pytorch style: on the 3x3
``conv2``) with frozen BN (eval mode), ``FPN`` (``F.interpolate(size=..., mode='nearest')``
top-down, extra 3x3 stride-2 convs, ReLU before the 2nd+ extra conv), mmcv
``ModulatedDeformConv2dPack`` (``chunk(3)``/``cat`` of ``conv_offset``, interleaved (dy, dx) per
kernel point, bilinear with zero padding, here with ``F.grid_sample(align_corners=False)``), mmcv's
``multi_scale_deformable_attn_pytorch`` and the ``torch.nn.MultiheadAttention`` that mmcv wraps.
The DCN restatement is pinned to ``F.conv2d`` (zero and unit offsets).

Section 6 uses torchvision (the test extra pins torch 2.14.1 + torchvision 0.29.1) as an independent
reference: ``torchvision.models.resnet50/101`` (pytorch style at the real 64-base widths, all four
stages), the same ResNet-101 made caffe style with DCNv2 in stages 3-4 (the BEVFormer-base /
DETR3D-R101 backbone) from torchvision's own ``Bottleneck`` with the stride moved to ``conv1`` and
``conv2`` run by ``torchvision.ops.deform_conv2d``, and ``deform_conv2d`` against our DCNv2 module.
Sizes are toys (CPU seconds); torch runs on one thread.
"""
import functools
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs.common import resnet
from fd3d_jax.convert import convert, mapping, torch_to_flax
from fd3d_jax.convert.official_keys import official_shapes
from fd3d_jax.models.backbone import FPN, ResNet
from fd3d_jax.models.bevformer import ImageFeatures
from fd3d_jax.models.dcn import ModulatedDeformConv2dPack
from fd3d_jax.models.decoder import BEVCrossAttention, DecoderLayer, SelfAttention
from fd3d_jax.models.deformable_attention import MSDeformableAttention, ms_deform_attn, ms_deform_attn_reference
from tests.experiments import load_script

torch = pytest.importorskip('torch')
F = torch.nn.functional
tnn = torch.nn

TOL = 1e-4


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def check(name, ours, ref, tol=TOL):
    err = rel_err(ours, ref)
    print(f'parity {name}: max rel err {err:.2e}')
    assert err <= tol, f'{name}: max |ours - torch| / max |torch| = {err:.3e} > {tol}'
    return err


def t2n(t):
    return t.detach().numpy().copy()


def nchw_to_nhwc(t):
    return jnp.asarray(t2n(t).transpose(0, 2, 3, 1))


def torch_sd(module, prefix=''):
    """A torch module's state dict as numpy arrays, keys prefixed."""
    return {prefix + k: t2n(v) for k, v in module.state_dict().items()}


def apply(module, params, *arrays, **static):
    """``module.apply`` jitted once (one XLA compile instead of one per eager op); ``static``: keyword
    arguments that are not arrays (closed over)."""
    return jax.jit(lambda p, *a: module.apply({'params': p}, *a, **static))(params, *arrays)


def get_config(name, arg='toy'):
    return importlib.import_module(f'configs.{name}').get_config(arg)


def random_official(model_cfg, seed=0):
    """A random official state dict for ``model_cfg`` (the keys no test overrides)."""
    rng = np.random.default_rng(seed)
    return {k: (np.zeros(s, np.int64) if k.endswith('num_batches_tracked')
                else rng.uniform(0.5, 1.5, size=s).astype(np.float32) if k.endswith('running_var')
                else 0.1 * rng.standard_normal(size=s, dtype=np.float32))
            for k, s in official_shapes(model_cfg).items()}


def convert_official(cfg, abstract, overrides):
    """``torch_to_flax`` of a random official state dict of ``cfg`` with ``overrides`` (a torch
    module's keys) in it; every override must be an official key of the config."""
    sd = random_official(cfg.model)
    extra = sorted(set(overrides) - set(sd))
    assert not extra, f'not official keys of this config: {extra[:5]}'
    sd.update(overrides)
    return torch_to_flax(sd, cfg, abstract=abstract)


def via_mapping(sd, model_cfg, prefix):
    """Converts single (unstacked) official keys with ``mapping.translate`` + ``mapping.to_flax``;
    returns the params below the Flax path ``prefix``."""
    out = {}
    for key, x in sd.items():
        entry = mapping.translate(key, model_cfg)
        assert isinstance(entry, list), (key, entry)
        for t in entry:
            assert t.index is None and t.rows is None and t.path[:len(prefix)] == prefix, (key, t)
            out[t.path[len(prefix):]] = mapping.to_flax(t, x)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def toy():
    """bevformer_tiny:toy and its abstract params (one ``jax.eval_shape`` of the whole model)."""
    cfg = get_config('bevformer_tiny')
    return cfg, convert.abstract_params(cfg)


def with_image_features(abstract, backbone=None, neck=None):
    """The toy abstract params with the backbone and/or neck subtree replaced."""
    feats = dict(abstract['image_features'])
    if backbone is not None:
        feats['backbone'] = backbone
    if neck is not None:
        feats['neck'] = neck
    return {**abstract, 'image_features': feats}


def init_like_torch(module, seed):
    """Random weights with O(1) activations: conv/linear weights N(0, 2/fan_in), biases N(0, 0.1^2),
    BN weight U(0.5, 1.5), running mean N(0, 0.1^2), running var U(0.5, 1.5); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module.eval()


# ------------------------------------------------------------------------------------------------
# torch restatements
# ------------------------------------------------------------------------------------------------

def torch_modulated_deform_conv2d(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1):
    """mmcv ``modulated_deform_conv2d`` (one deformable group, one conv group), NCHW.

    offset (N, 2K, Ho, Wo) with channel ``2k`` = dy and ``2k + 1`` = dx of kernel point
    ``k = i * kw + j`` (mmcv's ``modulated_deformable_im2col`` kernel); mask (N, K, Ho, Wo). Point k of
    output (ho, wo) samples pixel ``(ho*s - p + i*d + dy, wo*s - p + j*d + dx)`` bilinearly, corners
    outside the map count 0 = ``grid_sample(align_corners=False, padding_mode='zeros')`` at
    normalised ``(2 * pixel + 1) / size - 1``."""
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    base_y = (torch.arange(ho, dtype=x.dtype) * stride - padding)[:, None]
    base_x = (torch.arange(wo, dtype=x.dtype) * stride - padding)[None, :]
    cols = []
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            py = base_y + i * dilation + offset[:, 2 * k]                      # (N, Ho, Wo)
            px = base_x + j * dilation + offset[:, 2 * k + 1]
            grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1)
            s = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
            cols.append(s * mask[:, k:k + 1])                                   # (N, C, Ho, Wo)
    out = torch.einsum('nckhw,ock->nohw', torch.stack(cols, 2), weight.reshape(cout, c, kh * kw))
    return out if bias is None else out + bias[None, :, None, None]


class TorchDCNv2(tnn.Module):
    """mmcv ``ModulatedDeformConv2dPack``: ``weight`` (O, I, k, k), optional ``bias``, ``conv_offset``
    (``3 * k * k`` outputs with bias); forward: ``o1, o2, mask = chunk(conv_offset(x), 3)``,
    ``offset = cat(o1, o2)``, ``mask = sigmoid(mask)``."""

    def __init__(self, cin, cout, k=3, stride=1, padding=1, dilation=1, bias=False):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = tnn.Parameter(torch.zeros(cout, cin, k, k))
        self.bias = tnn.Parameter(torch.zeros(cout)) if bias else None
        self.conv_offset = tnn.Conv2d(cin, 3 * k * k, k, stride, padding, dilation, bias=True)

    def forward(self, x):
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return self.deform_conv(x, torch.cat((o1, o2), dim=1), torch.sigmoid(mask))

    def deform_conv(self, x, offset, mask):
        return torch_modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                             self.dilation)


class TorchBottleneck(tnn.Module):
    """mmdet 2.x ``Bottleneck`` (expansion 4) with ``norm_eval`` BN."""

    def __init__(self, inplanes, planes, stride, style, dcn, downsample):
        super().__init__()
        s1, s2 = (stride, 1) if style == 'caffe' else (1, stride)
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, s1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = (TorchDCNv2(planes, planes, 3, s2, 1) if dcn
                      else tnn.Conv2d(planes, planes, 3, s2, 1, bias=False))
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = (tnn.Sequential(tnn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                          tnn.BatchNorm2d(planes * 4)) if downsample else None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class TorchResNet(tnn.Module):
    """mmdet 2.x ``ResNet`` (``deep_stem=False``, ``avg_down=False``): 7x7/2 ``conv1``, ``bn1``, ReLU,
    3x3/2 max-pool (pad 1), stages ``layer{s}`` of Bottlenecks (width ``base * 2**s``, strides
    1, 2, 2, 2; block 0 downsamples with ``downsample.0/1`` when the stride or width changes)."""

    def __init__(self, base_width, stage_blocks, style, dcn_stages, out_indices):
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.conv1 = tnn.Conv2d(3, base_width, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(base_width)
        inplanes = base_width
        for s, n in enumerate(stage_blocks):
            planes, stride = base_width * 2 ** s, (1, 2, 2, 2)[s]
            blocks = [TorchBottleneck(inplanes if b == 0 else planes * 4, planes, stride if b == 0 else 1, style,
                                      dcn_stages[s], b == 0 and (stride != 1 or inplanes != planes * 4))
                      for b in range(n)]
            self.add_module(f'layer{s + 1}', tnn.Sequential(*blocks))
            inplanes = planes * 4
        self.num_stages = len(stage_blocks)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        outs = []
        for s in range(self.num_stages):
            x = getattr(self, f'layer{s + 1}')(x)
            if s in self.out_indices:
                outs.append(x)
        return outs


class ConvModule(tnn.Module):
    """mmcv ``ConvModule`` without norm/activation: just ``.conv`` (with bias)."""

    def __init__(self, cin, cout, k, stride=1):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, k, stride, k // 2, bias=True)

    def forward(self, x):
        return self.conv(x)


class TorchFPN(tnn.Module):
    """mmdet 2.x ``FPN`` (``end_level=-1``, no norm, ``upsample_cfg=dict(mode='nearest')``)."""

    def __init__(self, in_channels, out_channels, num_outs, start_level=0, add_extra_convs=False,
                 relu_before_extra_convs=False):
        super().__init__()
        self.num_outs, self.start_level = num_outs, start_level
        self.add_extra_convs = 'on_input' if add_extra_convs is True else add_extra_convs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.end = len(in_channels)
        self.lateral_convs = tnn.ModuleList(ConvModule(in_channels[i], out_channels, 1)
                                            for i in range(start_level, self.end))
        self.fpn_convs = tnn.ModuleList(ConvModule(out_channels, out_channels, 3) for _ in range(start_level, self.end))
        extra = num_outs - self.end + start_level
        if self.add_extra_convs and extra >= 1:
            for i in range(extra):
                cin = in_channels[self.end - 1] if i == 0 and self.add_extra_convs == 'on_input' else out_channels
                self.fpn_convs.append(ConvModule(cin, out_channels, 3, stride=2))

    def forward(self, inputs):
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        for i in range(used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode='nearest')
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                source = {'on_input': inputs[self.end - 1], 'on_lateral': laterals[-1],
                          'on_output': outs[-1]}[self.add_extra_convs]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    src = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](src))
        return outs


class MmcvMultiheadAttention(tnn.Module):
    """mmcv 1.x ``MultiheadAttention`` (``batch_first=False``, no dropout): ``attn`` =
    ``nn.MultiheadAttention``; key = value = query when not given, key_pos = query_pos, q/k get
    their positions, v does not; ``identity + out``."""

    def __init__(self, embed_dims, num_heads):
        super().__init__()
        self.attn = tnn.MultiheadAttention(embed_dims, num_heads, dropout=0.0)

    def forward(self, query, key=None, value=None, identity=None, query_pos=None, key_pos=None):
        key = query if key is None else key
        value = key if value is None else value
        identity = query if identity is None else identity
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        return identity + self.attn(query=query, key=key, value=value)[0]


# mmcv ``multi_scale_deformable_attn_pytorch``: value (B, S, M, D), locations (B, Q, M, L, P, 2), weights
# (B, Q, M, L, P) -> (B, Q, M*D); the same torch restatement is bench_msda's reference.
torch_msda_core = load_script('bench_msda').torch_msda


class TorchMSDA(tnn.Module):
    """mmcv 1.x ``MultiScaleDeformableAttention`` = BEVFormer's ``CustomMSDeformableAttention``
    (``batch_first=False``, no dropout, 2-d reference points)."""

    def __init__(self, embed_dims, num_heads, num_levels, num_points):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = tnn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = tnn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = tnn.Linear(embed_dims, embed_dims)
        self.output_proj = tnn.Linear(embed_dims, embed_dims)

    def forward(self, query, key=None, value=None, identity=None, query_pos=None, reference_points=None,
                spatial_shapes=None):
        value = query if value is None else value
        identity = query if identity is None else identity
        if query_pos is not None:
            query = query + query_pos
        query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        num_value = value.shape[1]
        value = self.value_proj(value).view(bs, num_value, self.num_heads, -1)
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(bs, num_query, m, lv, p, 2)
        weights = self.attention_weights(query).view(bs, num_query, m, lv * p).softmax(-1).view(
            bs, num_query, m, lv, p)
        shapes = torch.as_tensor(spatial_shapes, dtype=torch.long)
        normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        output = self.output_proj(torch_msda_core(value, spatial_shapes, locations, weights))
        return output.permute(1, 0, 2) + identity


class TorchFFN(tnn.Module):
    """mmcv ``FFN`` (``num_fcs=2``, no dropout): ``layers = [[Linear, ReLU, Dropout], Linear, Dropout]``,
    ``identity + layers(x)``."""

    def __init__(self, embed_dims, ffn_dims):
        super().__init__()
        self.layers = tnn.Sequential(tnn.Sequential(tnn.Linear(embed_dims, ffn_dims), tnn.ReLU(), tnn.Identity()),
                                     tnn.Linear(ffn_dims, embed_dims), tnn.Identity())

    def forward(self, x):
        return x + self.layers(x)


class TorchDecoderLayer(tnn.Module):
    """mmdet 2.x ``DetrTransformerDecoderLayer`` as BEVFormer configures it: ``operation_order =
    (self_attn, norm, cross_attn, norm, ffn, norm)``, ``attentions = [MultiheadAttention,
    CustomMSDeformableAttention]``, ``ffns``, ``norms`` (LayerNorm); sequence-first tensors."""

    def __init__(self, embed_dims, num_heads, ffn_dims, num_points):
        super().__init__()
        self.attentions = tnn.ModuleList([MmcvMultiheadAttention(embed_dims, num_heads),
                                          TorchMSDA(embed_dims, num_heads, 1, num_points)])
        self.ffns = tnn.ModuleList([TorchFFN(embed_dims, ffn_dims)])
        self.norms = tnn.ModuleList(tnn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query, value, query_pos, reference_points, spatial_shapes):
        x = self.norms[0](self.attentions[0](query, query_pos=query_pos, key_pos=query_pos))
        x = self.norms[1](self.attentions[1](x, value=value, query_pos=query_pos, reference_points=reference_points,
                                             spatial_shapes=spatial_shapes))
        return self.norms[2](self.ffns[0](x))


# ------------------------------------------------------------------------------------------------
# 1. Self-attention: torch.nn.MultiheadAttention (mmcv wrapper)
# ------------------------------------------------------------------------------------------------

def test_decoder_self_attention_vs_torch_multihead_attention(toy):
    """Decoder self-attention vs mmcv MultiheadAttention(nn.MultiheadAttention), via torch_to_flax."""
    cfg, abstract = toy
    c, m = cfg.model.embed_dims, cfg.model.num_heads
    ref_mod = init_like_torch(MmcvMultiheadAttention(c, m), seed=1)
    prefix = 'pts_bbox_head.transformer.decoder.layers.1.attentions.0.'
    params = convert_official(cfg, abstract, torch_sd(ref_mod, prefix))['head']['layers_1']['self_attn']
    g = torch.Generator().manual_seed(2)
    x, pos = torch.randn(2, 2, 7, c, generator=g)                           # (B, NQ, C)
    with torch.no_grad():
        ref = ref_mod(x.transpose(0, 1), query_pos=pos.transpose(0, 1)).transpose(0, 1)
    ours = apply(SelfAttention(c, m, 0.1), params, jnp.asarray(t2n(x)), jnp.asarray(t2n(pos)))
    check('self-attention (nn.MultiheadAttention)', ours, t2n(ref))


# ------------------------------------------------------------------------------------------------
# 2. ResNet (mmdet Bottleneck/stem, frozen BN), end to end through the backbone key mapping
# ------------------------------------------------------------------------------------------------

BACKBONES = {
    'pytorch': dict(style='pytorch', stage_blocks=(3, 1, 2, 1), dcn_stages=(False,) * 4, out_indices=(0, 1, 2, 3)),
    'caffe_dcn': dict(style='caffe', stage_blocks=(1, 2, 3, 1), dcn_stages=(False, False, True, True),
                      out_indices=(1, 2, 3)),
}


@pytest.mark.parametrize('variant', sorted(BACKBONES))
def test_resnet_vs_torch_restatement(toy, variant):
    """ResNet (pytorch / caffe+DCNv2 stages 3-4, width 8, multi-block stages) vs a torch mmdet ResNet restatement."""
    cfg, abstract = toy
    cfg = cfg.copy_and_resolve_references()
    spec = BACKBONES[variant]
    cfg.model.backbone = ml_collections.ConfigDict(dict(depth=50, base_width=8, frozen_stages=1, remat=False, **spec))
    bb = dict(cfg.model.backbone)
    ref_mod = init_like_torch(TorchResNet(8, spec['stage_blocks'], spec['style'], spec['dcn_stages'],
                                          spec['out_indices']), seed=3)
    sd = torch_sd(ref_mod, 'img_backbone.')
    assert set(sd) == {k for k in official_shapes(cfg.model) if k.startswith('img_backbone.')}
    x = torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(4))  # C2..C5: 13x18, 7x9, 4x5, 2x3
    x_ours = nchw_to_nhwc(x)
    bb_abstract = jax.eval_shape(lambda: ResNet(**bb).init(jax.random.PRNGKey(0), x_ours))['params']
    params = convert_official(cfg, with_image_features(abstract, backbone=bb_abstract), sd)
    with torch.no_grad():
        refs = ref_mod(x)
    ours = apply(ResNet(**bb), params['image_features']['backbone'], x_ours)
    assert len(ours) == len(refs) == len(spec['out_indices'])
    for i, o, r in zip(spec['out_indices'], ours, refs):
        check(f'resnet {variant} C{i + 2}', o, t2n(r).transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------------------
# 3. FPN
# ------------------------------------------------------------------------------------------------

NECKS = {
    # bevformer_tiny:toy's neck: 2 inputs, one extra conv on the output
    'toy': dict(in_channels=(128, 256), out_channels=32, num_outs=3, start_level=0,
                add_extra_convs='on_output', relu_before_extra_convs=True),
    # DETR3D-style start_level=1, two extra convs (the 2nd after a ReLU)
    'start1_two_extra': dict(in_channels=(16, 32, 64, 128), out_channels=24, num_outs=5, start_level=1,
                             add_extra_convs='on_output', relu_before_extra_convs=True),
    'on_input_no_relu': dict(in_channels=(32, 64, 128), out_channels=16, num_outs=5, start_level=0,
                             add_extra_convs='on_input', relu_before_extra_convs=False),
    'maxpool': dict(in_channels=(32, 64), out_channels=16, num_outs=4, start_level=0,
                    add_extra_convs=False, relu_before_extra_convs=False),
}
FEATURE_HW = ((25, 35), (13, 18), (7, 9), (4, 5))     # odd sizes: top-down F.interpolate(size=...) is not 2x


@pytest.mark.parametrize('variant', sorted(NECKS))
def test_fpn_vs_torch_restatement(toy, variant):
    """FPN (top-down nearest by size, extra stride-2 convs / max-pool levels) vs a torch mmdet FPN restatement."""
    cfg, abstract = toy
    cfg = cfg.copy_and_resolve_references()
    spec = NECKS[variant]
    cfg.model.neck = ml_collections.ConfigDict(spec)
    ref_mod = init_like_torch(TorchFPN(**spec), seed=5)
    sd = torch_sd(ref_mod, 'img_neck.')
    assert set(sd) == {k for k in official_shapes(cfg.model) if k.startswith('img_neck.')}
    hw = FEATURE_HW[-len(spec['in_channels']):]
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(1, ci, h, w, generator=g) for ci, (h, w) in zip(spec['in_channels'], hw)]
    xs_ours = [nchw_to_nhwc(x) for x in xs]
    neck_abstract = jax.eval_shape(lambda: FPN(**spec).init(jax.random.PRNGKey(0), xs_ours))['params']
    params = convert_official(cfg, with_image_features(abstract, neck=neck_abstract), sd)
    with torch.no_grad():
        refs = ref_mod(xs)
    ours = apply(FPN(**spec), params['image_features']['neck'], xs_ours)
    assert len(ours) == len(refs) == spec['num_outs']
    for i, (o, r) in enumerate(zip(ours, refs)):
        check(f'fpn {variant} P{i}', o, t2n(r).transpose(0, 2, 3, 1))


def test_image_features_toy_vs_torch(toy):
    """bevformer_tiny:toy ImageFeatures (ResNet + FPN) vs the torch ResNet -> FPN chain, one official state dict."""
    cfg, abstract = toy
    bb, neck = dict(cfg.model.backbone), dict(cfg.model.neck)
    resnet = init_like_torch(TorchResNet(bb['base_width'], bb['stage_blocks'], bb['style'], bb['dcn_stages'],
                                         bb['out_indices']), seed=7)
    fpn = init_like_torch(TorchFPN(**neck), seed=8)
    params = convert_official(cfg, abstract, {**torch_sd(resnet, 'img_backbone.'), **torch_sd(fpn, 'img_neck.')})
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(9))   # 2 cameras of one sample
    with torch.no_grad():
        refs = fpn(resnet(x))
    ours = apply(ImageFeatures(bb, neck), params['image_features'], nchw_to_nhwc(x)[None])
    for i, (o, r) in enumerate(zip(ours, refs)):
        check(f'image features toy level {i}', o[0], t2n(r).transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------------------
# 4. DCNv2
# ------------------------------------------------------------------------------------------------

def test_torch_dcn_restatement_pinned_to_conv2d():
    """The torch DCNv2 restatement itself: zero offsets = 0.5 * F.conv2d; dy=+1 / dx=+1 = F.conv2d on a shifted pad."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 9, 11, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    for s, p, d in ((1, 1, 1), (2, 2, 2)):
        ho = (9 + 2 * p - 2 * d - 1) // s + 1
        wo = (11 + 2 * p - 2 * d - 1) // s + 1
        zeros = torch.zeros(2, 18, ho, wo)
        ones = torch.ones(2, 9, ho, wo)
        got = torch_modulated_deform_conv2d(x, zeros, 0.5 * ones, w, None, s, p, d)
        check(f'dcn restatement zero offset s{s}', t2n(got), t2n(0.5 * F.conv2d(x, w, None, s, p, d)), 1e-5)
        for axis, pad in ((0, (p, p, p - 1, p + 1)), (1, (p - 1, p + 1, p, p))):   # channel 2k = dy, 2k+1 = dx
            off = zeros.clone()
            off[:, axis::2] = 1.0
            got = torch_modulated_deform_conv2d(x, off, ones, w, None, s, p, d)
            want = F.conv2d(F.pad(x, pad), w, None, s, 0, d)
            check(f'dcn restatement unit {"dy" if axis == 0 else "dx"} s{s}', t2n(got), t2n(want), 1e-5)


# ------------------------------------------------------------------------------------------------
# 5. Multi-scale deformable attention
# ------------------------------------------------------------------------------------------------

MSDA_SHAPES = ((6, 10), (3, 5), (2, 3))


def test_msda_core_vs_mmcv_pytorch():
    """ms_deform_attn (chunked, padded) and ms_deform_attn_reference vs mmcv multi_scale_deformable_attn_pytorch."""
    rng = np.random.default_rng(14)
    b, q, m, d, p = 2, 9, 2, 4, 3
    s = sum(h * w for h, w in MSDA_SHAPES)
    value = rng.standard_normal((b, s, m, d), dtype=np.float32)
    loc = rng.uniform(-0.15, 1.15, (b, q, m, len(MSDA_SHAPES), p, 2)).astype(np.float32)
    loc[0, 0, 0, :, 0] = (0.0, 0.0)                                          # image corner / edges
    loc[0, 0, 1, :, 0] = (1.0, 1.0)
    attn = rng.uniform(0.0, 1.0, (b, q, m, len(MSDA_SHAPES), p)).astype(np.float32)
    ref = t2n(torch_msda_core(*(torch.from_numpy(a) if isinstance(a, np.ndarray) else a
                                for a in (value, MSDA_SHAPES, loc, attn))))
    check('msda core (chunked, chunk 4 of 18 rows)', ms_deform_attn(value, MSDA_SHAPES, loc, attn, query_chunk=4), ref)
    check('msda core (default chunk)', ms_deform_attn(value, MSDA_SHAPES, loc, attn), ref)
    check('msda core (reference)', ms_deform_attn_reference(value, MSDA_SHAPES, loc, attn), ref)


def _random_msda(c, m, lv, p, seed):
    ref_mod = init_like_torch(TorchMSDA(c, m, lv, p), seed=seed)
    with torch.no_grad():                                                  # offsets of a few pixels
        ref_mod.sampling_offsets.bias.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(seed + 1))
    return ref_mod


def test_msda_module_multilevel_vs_torch(toy):
    """MSDeformableAttention at 3 levels vs mmcv MultiScaleDeformableAttention (torch), decoder key mapping."""
    cfg, _ = toy
    c, m, p = 16, 2, 3
    ref_mod = _random_msda(c, m, len(MSDA_SHAPES), p, seed=15)
    sd = torch_sd(ref_mod, 'pts_bbox_head.transformer.decoder.layers.0.attentions.1.')
    params = via_mapping(sd, cfg.model, ('head', 'layers_0', 'cross_attn', 'attn'))
    g = torch.Generator().manual_seed(17)
    b, q = 2, 7
    query, pos = torch.randn(2, q, b, c, generator=g)                        # sequence first
    value = torch.randn(sum(h * w for h, w in MSDA_SHAPES), b, c, generator=g)
    refpts = torch.rand(b, q, len(MSDA_SHAPES), 2, generator=g) * 1.1 - 0.05
    with torch.no_grad():
        ref = ref_mod(query, value=value, query_pos=pos, reference_points=refpts,
                      spatial_shapes=MSDA_SHAPES).transpose(0, 1)
    ours, _ = apply(MSDeformableAttention(c, m, len(MSDA_SHAPES), p), params,
                    jnp.asarray(t2n(query.transpose(0, 1))), jnp.asarray(t2n(value.transpose(0, 1))),
                    jnp.asarray(t2n(refpts)), spatial_shapes=MSDA_SHAPES,
                    query_pos=jnp.asarray(t2n(pos.transpose(0, 1))))
    check('msda module 3 levels', ours, t2n(ref))


def test_bevformer_decoder_cross_attention_vs_torch(toy):
    """BEVCrossAttention vs CustomMSDeformableAttention (torch) on the 8x10 BEV, via torch_to_flax."""
    cfg, abstract = toy
    mc = cfg.model
    c, m, p, bev_hw = mc.embed_dims, mc.num_heads, mc.decoder_points, (mc.bev_h, mc.bev_w)
    ref_mod = _random_msda(c, m, 1, p, seed=18)
    prefix = 'pts_bbox_head.transformer.decoder.layers.1.attentions.1.'
    params = convert_official(cfg, abstract, torch_sd(ref_mod, prefix))['head']['layers_1']['cross_attn']
    g = torch.Generator().manual_seed(19)
    b, q = 2, mc.num_query
    query, pos = torch.randn(2, b, q, c, generator=g)
    bev = torch.randn(b, bev_hw[0] * bev_hw[1], c, generator=g)
    reference = torch.rand(b, q, 3, generator=g)                             # sigmoid outputs; z unused
    with torch.no_grad():
        ref = ref_mod(query.transpose(0, 1), value=bev.transpose(0, 1), query_pos=pos.transpose(0, 1),
                      reference_points=reference[..., :2].unsqueeze(2), spatial_shapes=(bev_hw,)).transpose(0, 1)
    cross = BEVCrossAttention(bev_hw, c, m, p, mc.dropout)
    ours, _ = apply(cross, params, *(jnp.asarray(t2n(t)) for t in (query, pos, reference)),
                    dict(bev=jnp.asarray(t2n(bev))))
    check('bevformer decoder cross-attention', ours, t2n(ref))


def test_bevformer_decoder_layer_vs_torch(toy):
    """DecoderLayer (self-attn, LN, cross-attn, LN, FFN, LN) vs torch DetrTransformerDecoderLayer, via torch_to_flax."""
    cfg, abstract = toy
    mc = cfg.model
    c, bev_hw = mc.embed_dims, (mc.bev_h, mc.bev_w)
    ref_mod = init_like_torch(TorchDecoderLayer(c, mc.num_heads, mc.ffn_dims, mc.decoder_points), seed=20)
    with torch.no_grad():
        ref_mod.attentions[1].sampling_offsets.bias.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(21))
        for norm in ref_mod.norms:
            norm.weight.add_(1.0)
    prefix = 'pts_bbox_head.transformer.decoder.layers.0.'
    params = convert_official(cfg, abstract, torch_sd(ref_mod, prefix))['head']['layers_0']
    g = torch.Generator().manual_seed(22)
    b, q = 2, mc.num_query
    query, pos = torch.randn(2, b, q, c, generator=g)
    bev = torch.randn(b, bev_hw[0] * bev_hw[1], c, generator=g)
    reference = torch.rand(b, q, 3, generator=g)
    with torch.no_grad():
        ref = ref_mod(query.transpose(0, 1), bev.transpose(0, 1), pos.transpose(0, 1),
                      reference[..., :2].unsqueeze(2), (bev_hw,)).transpose(0, 1)
    cross = functools.partial(BEVCrossAttention, bev_hw, c, mc.num_heads, mc.decoder_points, mc.dropout)
    layer = DecoderLayer(c, mc.num_heads, mc.ffn_dims, mc.dropout, cross)
    ours, _ = apply(layer, params, *(jnp.asarray(t2n(t)) for t in (query, pos, reference)),
                    dict(bev=jnp.asarray(t2n(bev))))
    check('bevformer decoder layer', ours, t2n(ref))


# ------------------------------------------------------------------------------------------------
# 6. torchvision references: ResNet-50/101 (pytorch style), ResNet-101 caffe + DCNv2, deform_conv2d
# ------------------------------------------------------------------------------------------------

def _torchvision():
    return pytest.importorskip('torchvision')


class TorchvisionDCNv2(TorchDCNv2):
    """mmcv ``ModulatedDeformConv2dPack`` (same keys: ``weight``, optional ``bias``, ``conv_offset``) whose
    deformable conv is ``torchvision.ops.deform_conv2d`` (offset channels ``2k`` = dy, ``2k + 1`` = dx
    of kernel point ``k = i * kw + j``, as mmcv; pinned by ``test_torchvision_deform_conv2d_layout``)."""

    def deform_conv(self, x, offset, mask):
        from torchvision.ops import deform_conv2d
        return deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)


def torchvision_resnet(depth, seed):
    """``torchvision.models.resnet{depth}(weights=None)`` with its own random init (kaiming convs),
    seeded without touching torch's global RNG; eval mode."""
    models = _torchvision().models
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return {50: models.resnet50, 101: models.resnet101}[depth](weights=None).eval()


def make_caffe_dcn(model, dcn_layers, seed):
    """torchvision ResNet -> mmdet caffe style with DCNv2: in every stage's block 0 the stride moves from
    the 3x3 ``conv2`` to the 1x1 ``conv1`` (the downsample keeps it); in ``dcn_layers`` every ``conv2``
    becomes a ``TorchvisionDCNv2`` with the same weight and a random ``conv_offset`` (mmdet zero-initialises
    it): bias N(0, 1) and weight 0.2 N(0, 2/fan_in), so offsets up to ~4 px (some off the map), spread masks,
    and input-dependent offsets of ~0.2 px. With weight N(0, 2/fan_in) (~1 px input-dependent) the 26 DCN
    blocks are chaotic: 1e-6 relative noise on the input changes torch's own C4/C5 by 2-15%, and ours and
    torch's then differ by O(1) from float32 rounding alone; with this weight that sensitivity is < 2e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in range(1, 5):
            for b, block in enumerate(getattr(model, f'layer{s}')):
                stride = block.conv2.stride[0]
                if stride != 1:
                    conv1 = block.conv1
                    block.conv1 = tnn.Conv2d(conv1.in_channels, conv1.out_channels, 1, stride, bias=False)
                    block.conv1.weight.copy_(conv1.weight)
                    block.conv2.stride = (1, 1)
                if s in dcn_layers:
                    width = block.conv2.out_channels
                    dcn = TorchvisionDCNv2(width, width, 3, 1, 1, 1)
                    dcn.weight.copy_(block.conv2.weight)
                    fan_in = dcn.conv_offset.weight[0].numel()
                    dcn.conv_offset.weight.copy_(torch.randn(dcn.conv_offset.weight.shape, generator=g)
                                                 * 0.2 * (2.0 / fan_in) ** 0.5)
                    dcn.conv_offset.bias.copy_(torch.randn(dcn.conv_offset.bias.shape, generator=g))
                    block.conv2 = dcn
    return model.eval()


def randomise_bn(model, x, seed):
    """Random frozen BN with O(1) activations through 33 bottlenecks: weight U(0.5, 1.5) (the residual
    branches' ``bn3`` U(0.2, 0.5), small as in trained ResNets), bias N(0, 0.1^2); running stats = the
    batch statistics of ``x`` (one train-mode forward, momentum 1), then perturbed (mean += 0.3 std
    N(0, 1), var *= U(0.5, 2)); eval mode. Conditioning: with O(1) ``bn3`` the 23-block stage 3 makes
    torch's own caffe R101 C5 move by ~1e-4 relative under 1e-6 relative input noise (no DCN; ~1e-5 with
    these ``bn3``), which float32 rounding differences approach."""
    g = torch.Generator().manual_seed(seed)
    bns = {name: m for name, m in model.named_modules() if isinstance(m, tnn.BatchNorm2d)}
    with torch.no_grad():
        for name, m in bns.items():
            lo, hi = (0.2, 0.5) if name.endswith('bn3') else (0.5, 1.5)
            m.weight.copy_(lo + (hi - lo) * torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            m.reset_running_stats()
            m.momentum = 1.0
        model.train()(x)
        for m in bns.values():
            m.momentum = 0.1
            m.running_mean.add_(0.3 * m.running_var.sqrt() * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.mul_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
    return model.eval()


TORCHVISION_BACKBONES = {
    # detr3d_r50's backbone (bevformer_tiny's with C2..C5 out) and its R101 twin: torchvision's own
    'r50_pytorch': dict(depth=50, style='pytorch', dcn=False, hw=(64, 96)),
    'r101_pytorch': dict(depth=101, style='pytorch', dcn=False, hw=(64, 96)),
    # detr3d_r101 / bevformer_base: caffe style, DCNv2 in stages 3-4 (C4 6x8, C5 3x4 at 96x128)
    'r101_caffe_dcn': dict(depth=101, style='caffe', dcn=True, hw=(96, 128)),
}


@pytest.mark.parametrize('variant', sorted(TORCHVISION_BACKBONES))
def test_resnet_vs_torchvision(toy, variant):
    """ResNet at the real widths (C2..C5) vs torchvision resnet50/101 (+ caffe/DCNv2 via deform_conv2d)."""
    _torchvision()
    from torchvision.models._utils import IntermediateLayerGetter

    spec = TORCHVISION_BACKBONES[variant]
    cfg, abstract = toy
    cfg = cfg.copy_and_resolve_references()
    cfg.model.backbone = resnet(spec['depth'], spec['style'], (0, 1, 2, 3), dcn=spec['dcn'])
    if variant == 'r101_caffe_dcn':                   # the backbone of the detr3d_r101 / bevformer_base configs
        ref_bb = dict(get_config('detr3d_r101', 'full').model.backbone)
        assert dict(cfg.model.backbone) == ref_bb, ref_bb
    bb = dict(cfg.model.backbone)
    model = torchvision_resnet(spec['depth'], seed=30)
    if spec['dcn']:
        model = make_caffe_dcn(model, dcn_layers=(3, 4), seed=31)
    g = torch.Generator().manual_seed(32)
    x_calib = torch.randn(2, 3, *spec['hw'], generator=g)
    x = torch.randn(1, 3, *spec['hw'], generator=g)
    model = randomise_bn(model, x_calib, seed=33)
    ref_mod = IntermediateLayerGetter(model, {f'layer{s}': f'C{s + 1}' for s in range(1, 5)}).eval()
    sd = torch_sd(ref_mod, 'img_backbone.')                    # the getter drops avgpool and fc
    assert set(torch_sd(model, 'img_backbone.')) - set(sd) == {'img_backbone.fc.weight', 'img_backbone.fc.bias'}
    assert set(sd) == {k for k in official_shapes(cfg.model) if k.startswith('img_backbone.')}
    x_ours = nchw_to_nhwc(x)
    bb_abstract = jax.eval_shape(lambda: ResNet(**bb).init(jax.random.PRNGKey(0), x_ours))['params']
    params = convert_official(cfg, with_image_features(abstract, backbone=bb_abstract), sd)
    offsets = []                                       # max |dy|, |dx| of every DCN block
    hooks = [m.register_forward_hook(lambda m, i, o: offsets.append(float(o[:, :18].abs().max())))
             for name, m in model.named_modules() if name.endswith('conv2.conv_offset')]
    with torch.no_grad():
        refs = list(ref_mod(x).values())
    for h in hooks:
        h.remove()
    assert len(offsets) == (23 + 3 if spec['dcn'] else 0)
    assert not offsets or min(offsets) > 1.0 and max(offsets) > 3.0, offsets
    ours = apply(ResNet(**bb), params['image_features']['backbone'], x_ours)
    assert len(ours) == len(refs) == 4
    for i, (o, r) in enumerate(zip(ours, refs)):
        check(f'torchvision {variant} C{i + 2} {tuple(r.shape[1:])}', o, t2n(r).transpose(0, 2, 3, 1))


def test_torchvision_deform_conv2d_layout():
    """torchvision.ops.deform_conv2d's conventions = mmcv's: zero offsets + mask = masked F.conv2d, channel 2k
    = dy and 2k+1 = dx of kernel point k (unit shifts = F.conv2d on a shifted pad), and random fractional
    offsets agree with the mmcv restatement (bilinear, zero outside)."""
    deform_conv2d = _torchvision().ops.deform_conv2d
    g = torch.Generator().manual_seed(34)
    x = torch.randn(2, 3, 9, 11, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g)
    for s, p, d in ((1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 2)):
        ho = (9 + 2 * p - 2 * d - 1) // s + 1
        wo = (11 + 2 * p - 2 * d - 1) // s + 1
        zeros, ones = torch.zeros(2, 18, ho, wo), torch.ones(2, 9, ho, wo)
        got = deform_conv2d(x, zeros, w, None, (s, s), (p, p), (d, d), mask=0.5 * ones)
        check(f'deform_conv2d zero offset s{s} p{p} d{d}', t2n(got), t2n(0.5 * F.conv2d(x, w, None, s, p, d)), 1e-5)
        for axis, pad in ((0, (p, p, p - 1, p + 1)), (1, (p - 1, p + 1, p, p))):   # F.pad: (left, right, top, bottom)
            off = zeros.clone()
            off[:, axis::2] = 1.0
            got = deform_conv2d(x, off, w, None, (s, s), (p, p), (d, d), mask=ones)
            want = F.conv2d(F.pad(x, pad), w, None, s, 0, d)
            check(f'deform_conv2d unit {"dy" if axis == 0 else "dx"} s{s} p{p} d{d}', t2n(got), t2n(want), 1e-5)
        off = 3.0 * torch.randn(2, 18, ho, wo, generator=g)
        mask = torch.rand(2, 9, ho, wo, generator=g)
        got = deform_conv2d(x, off, w, b, (s, s), (p, p), (d, d), mask=mask)
        want = torch_modulated_deform_conv2d(x, off, mask, w, b, s, p, d)
        check(f'deform_conv2d vs mmcv restatement s{s} p{p} d{d}', t2n(got), t2n(want), 1e-5)


@pytest.mark.parametrize('stride,padding,dilation', [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize('reference', ['mmcv_restatement', 'torchvision'])
def test_dcn_vs_torch(toy, reference, stride, padding, dilation):
    """ModulatedDeformConv2dPack vs conv_offset (mmcv chunk/cat/sigmoid) + the torch mmcv restatement or
    torchvision.ops.deform_conv2d (offsets up to a few px), conv2 DCN key mapping."""
    if reference == 'torchvision':
        _torchvision()
    cfg, _ = toy
    module = TorchvisionDCNv2 if reference == 'torchvision' else TorchDCNv2
    ref_mod = init_like_torch(module(6, 5, 3, stride, padding, dilation), seed=35)
    with torch.no_grad():                                                  # offsets ~ +-3 px, masks spread
        ref_mod.conv_offset.weight.mul_(3.0)
        ref_mod.conv_offset.bias.normal_(0.0, 1.5, generator=torch.Generator().manual_seed(36))
    sd = torch_sd(ref_mod, 'img_backbone.layer3.0.conv2.')
    params = via_mapping(sd, cfg.model, ('image_features', 'backbone', 'layer3_0', 'conv2'))
    x = torch.randn(2, 6, 10, 13, generator=torch.Generator().manual_seed(37))
    with torch.no_grad():
        ref = ref_mod(x)
        offsets = torch.chunk(ref_mod.conv_offset(x), 3, 1)[0]
    assert offsets.abs().max() > 2.0                                       # some samples leave the map
    ours = apply(ModulatedDeformConv2dPack(5, 3, stride, padding, dilation), params, nchw_to_nhwc(x))
    check(f'dcnv2 vs {reference} s{stride} p{padding} d{dilation}', ours, t2n(ref).transpose(0, 2, 3, 1))