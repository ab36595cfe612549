"""Image backbone (ResNet-50/101, optional DCNv2) and neck (FPN), mmdet 2.x semantics, channel-last.

Images and features are (N, H, W, C). Every stride-2 layer maps a size ``n`` to ``ceil(n / 2)``
(explicit symmetric PyTorch paddings, never ``'SAME'``), e.g. 480x800 -> C5 15x25 and
928x1600 -> P3..P6 116x200, 58x100, 29x50, 15x25.

Parameter names mirror torchvision / mmdet state-dict keys one to one (``.`` -> ``_`` between a
module and its index, ``/`` between nesting levels; flax conv kernels are HWIO, torch OIHW):

    conv1, bn1                                  stem (torch ``conv1``, ``bn1``)
    layer{s}_0/conv1, bn1, conv2, bn2, conv3, bn3
    layer{s}_0/downsample_conv, downsample_bn   (torch ``downsample.0``, ``downsample.1``)
    layer{s}_rest/block/...                     blocks 1..n-1 of the stage (identical shapes), run
                                                as one ``nn.scan``: every leaf stacked on axis 0
                                                (torch ``layer{s}.{b}`` is index ``b - 1``)
    layer{s}_{b}/conv2/kernel, conv2/conv_offset/{kernel,bias}   (DCNv2 blocks)
    BN leaves: scale, bias, mean, var           (torch weight, bias, running_mean, running_var)
    FPN: lateral_convs_{i}, fpn_convs_{i}       (mmdet ``lateral_convs.{i}.conv``,
                                                ``fpn_convs.{i}.conv``)

Frozen parts (mmdet ``norm_cfg=dict(requires_grad=False)``, ``norm_eval=True``, ``frozen_stages``):

* BatchNorm is always the inference formula ``(x - mean) / sqrt(var + 1e-5) * scale + bias`` with
  the four statistics stored as (never updated) leaves of ``params``; they pass through
  ``jax.lax.stop_gradient``, so their gradient is exactly zero.
* The output of the stem (``frozen_stages >= 0``) and of each frozen stage ``layer1..layer{f}`` goes
  through ``jax.lax.stop_gradient``: the backward pass stops there (no work spent on frozen convs,
  as in PyTorch where no input requires grad), so frozen conv kernels also get zero gradients.
* The repeated blocks of a stage share one stacked parameter tree (``layer{s}_rest``, an ``nn.scan``).
  With ``remat`` (mmdet ``with_cp``) they run as a loop and every block is rematerialised: the backward
  pass must recompute one block at a time, so only block inputs are kept — an unrolled
  ``jax.checkpoint`` leaves XLA free to hoist all recomputation and (on XLA:CPU) saves nothing.
  Without ``remat``, compiled for the CPU, the scan is fully unrolled (same parameters, no loop): XLA:CPU
  leaves the backward convolutions inside a loop body in non-canonical dimension orders that its fast
  convolution kernels do not take, and runs them in its naive emitter — the ResNet-50 gradient of
  ``bevformer_tiny:full`` (6x480x800) takes 320 s as a loop against 19 s unrolled, at 1.97 against 2.46 GB
  peak (docs/benchmarks.md). On GPUs and TPUs they stay a loop (less memory, faster compiles; the slow path is
  XLA:CPU's, not measured there). ``repeated_blocks`` overrides the choice.
* Zero gradient is not enough with decoupled weight decay (AdamW decays every leaf it is given),
  so the optimizer must skip these leaves: ``resnet_trainable_mask(params, frozen_stages)`` returns
  the boolean pytree (False = frozen) for ``optax.masked`` / ``optax.multi_transform``.
"""
import re
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.models.dcn import ModulatedDeformConv2dPack

BN_EPS = 1e-5
RESNET_STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BOTTLENECK_EXPANSION = 4

# mmcv kaiming_init defaults (ResNet convs): normal, mode='fan_out', nonlinearity='relu'.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# mmdet FPN init_cfg: Xavier uniform, gain 1, bias 0.
xavier_uniform = nn.initializers.xavier_uniform()


def conv2d(features: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
           use_bias: bool = False, name: Optional[str] = None, dtype=None,
           kernel_init=kaiming_fan_out) -> nn.Conv:
    """PyTorch-style Conv2d (symmetric explicit padding) as a flax ``nn.Conv``."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)),
                   kernel_dilation=(dilation, dilation), use_bias=use_bias, dtype=dtype,
                   kernel_init=kernel_init, bias_init=nn.initializers.zeros, name=name)


class FrozenBatchNorm(nn.Module):
    """Inference-mode BatchNorm whose scale/bias/mean/var never change. (..., C) -> (..., C)."""
    eps: float = BN_EPS
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, inputs):
        channels = inputs.shape[-1]
        scale = self.param('scale', self.scale_init, (channels,))
        bias = self.param('bias', nn.initializers.zeros, (channels,))
        mean = self.param('mean', nn.initializers.zeros, (channels,))
        var = self.param('var', nn.initializers.ones, (channels,))
        scale, bias, mean, var = jax.lax.stop_gradient((scale, bias, mean, var))
        mul = scale * jax.lax.rsqrt(var + self.eps)
        add = bias - mean * mul
        return inputs * mul.astype(inputs.dtype) + add.astype(inputs.dtype)


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4). (N, H, W, C_in) -> (N, ceil(H/s), ceil(W/s), 4*planes).

    ``style='pytorch'`` puts the stride on the 3x3 conv (conv2), ``'caffe'`` on the first 1x1
    (conv1); the 1x1 downsample conv always carries it.
    """
    planes: int
    stride: int = 1
    dilation: int = 1
    style: str = 'pytorch'
    dcn: bool = False
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, inputs):
        assert self.style in ('pytorch', 'caffe'), self.style
        s1, s2 = (1, self.stride) if self.style == 'pytorch' else (self.stride, 1)
        dilation = self.dilation
        out = conv2d(self.planes, 1, s1, name='conv1', dtype=self.dtype)(inputs)
        out = nn.relu(FrozenBatchNorm(name='bn1')(out))
        if self.dcn:
            out = ModulatedDeformConv2dPack(self.planes, 3, strides=s2, padding=dilation, dilation=dilation,
                                            use_bias=False, dtype=self.dtype, name='conv2')(out)
        else:
            out = conv2d(self.planes, 3, s2, padding=dilation, dilation=dilation, name='conv2',
                         dtype=self.dtype)(out)
        out = nn.relu(FrozenBatchNorm(name='bn2')(out))
        out = conv2d(self.planes * BOTTLENECK_EXPANSION, 1, name='conv3', dtype=self.dtype)(out)
        bn3_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        out = FrozenBatchNorm(scale_init=bn3_init, name='bn3')(out)
        identity = inputs
        if self.downsample:
            identity = conv2d(self.planes * BOTTLENECK_EXPANSION, 1, self.stride,
                              name='downsample_conv', dtype=self.dtype)(inputs)
            identity = FrozenBatchNorm(name='downsample_bn')(identity)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """mmdet 2.x ``ResNet`` with frozen BN. (N, H, W, 3) -> tuple of C{i+2} for i in out_indices.

    C2..C5 have ``base_width * 4 * 2**i`` channels (256, 512, 1024, 2048) at strides 4, 8, 16, 32.

    Attributes:
      depth: 50 or 101 (selects the stage blocks unless ``stage_blocks`` is given).
      style: 'pytorch' | 'caffe' (where the stride sits in a bottleneck).
      out_indices: subset of 0..3.
      frozen_stages: -1 nothing, 0 stem, k stem + layer1..layerk (stop_gradient after them).
      dcn_stages: per stage, DCNv2 for the 3x3 conv of every block.
      remat: ``jax.checkpoint`` each block (mmdet ``with_cp``).
      repeated_blocks: 'loop' or 'unrolled', how a stage's repeated blocks run; 'auto' (default): unrolled
        only without ``remat`` on the CPU backend (module docstring).
      base_width, stage_blocks: overrides for tiny test/toy variants (e.g. 8, (1, 1, 1, 1)).
      zero_init_residual: bn3 scale initialised to 0 (mmdet's default is True; the default here
        is False because BN is frozen, so a from-scratch model would keep every residual branch
        dead; irrelevant when pretrained weights are loaded).
    """
    depth: int = 50
    style: str = 'pytorch'
    out_indices: Sequence[int] = (0, 1, 2, 3)
    frozen_stages: int = -1
    dcn_stages: Sequence[bool] = (False, False, False, False)
    strides: Sequence[int] = (1, 2, 2, 2)
    dilations: Sequence[int] = (1, 1, 1, 1)
    remat: bool = False
    repeated_blocks: str = 'auto'
    base_width: int = 64
    stage_blocks: Optional[Sequence[int]] = None
    zero_init_residual: bool = False
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, feat) -> Tuple[jnp.ndarray, ...]:
        blocks = tuple(self.stage_blocks or RESNET_STAGE_BLOCKS[self.depth])
        assert len(blocks) == len(self.dcn_stages) == len(self.strides) == len(self.dilations)
        assert all(0 <= i < len(blocks) for i in self.out_indices), self.out_indices
        feat = conv2d(self.base_width, 7, 2, 3, name='conv1', dtype=self.dtype)(feat)
        feat = nn.relu(FrozenBatchNorm(name='bn1')(feat))
        feat = nn.max_pool(feat, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if self.frozen_stages >= 0:
            feat = jax.lax.stop_gradient(feat)
        if self.repeated_blocks not in ('auto', 'loop', 'unrolled'):
            raise ValueError(f"model.backbone.repeated_blocks must be 'auto', 'loop' or 'unrolled', "
                             f"got {self.repeated_blocks!r}")
        loop = (self.repeated_blocks == 'loop'
                or (self.repeated_blocks == 'auto' and (self.remat or jax.default_backend() != 'cpu')))
        block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
        step_cls = nn.remat(_BlockStep, prevent_cse=False) if self.remat else _BlockStep
        inplanes = self.base_width
        outs = []
        for stage, num_blocks in enumerate(blocks):
            planes = self.base_width * 2 ** stage
            kwargs = dict(dilation=self.dilations[stage], style=self.style, dcn=bool(self.dcn_stages[stage]),
                          zero_init_residual=self.zero_init_residual, dtype=self.dtype)
            downsample = self.strides[stage] != 1 or inplanes != planes * BOTTLENECK_EXPANSION
            feat = block_cls(planes, stride=self.strides[stage], downsample=downsample, **kwargs,
                             name=f'layer{stage + 1}_0')(feat)
            inplanes = planes * BOTTLENECK_EXPANSION
            if num_blocks > 1:
                scan = nn.scan(step_cls, variable_axes={'params': 0}, split_rngs={'params': True},
                               length=num_blocks - 1, unroll=1 if loop else num_blocks - 1)
                feat, _ = scan(dict(planes=planes, **kwargs), name=f'layer{stage + 1}_rest')(feat, None)
            if stage < self.frozen_stages:
                feat = jax.lax.stop_gradient(feat)
            if stage in self.out_indices:
                outs.append(feat)
        return tuple(outs)


class _BlockStep(nn.Module):
    """Scan body over a stage's repeated blocks: (feat, _) -> (Bottleneck(feat), None)."""
    block: dict

    @nn.compact
    def __call__(self, feat, _):
        return Bottleneck(**self.block, name='block')(feat), None


_BN_NAME = re.compile(r'^(bn\d+|downsample_bn)$')


def resnet_trainable_mask(params, frozen_stages: int):
    """Boolean pytree like ``params``: True for leaves the optimizer may update.

    ``params`` is the ResNet's own tree (optionally wrapped as ``{'params': ...}``). False for every
    BatchNorm leaf (scale, bias, mean, var) and, per mmdet ``_freeze_stages``, for the stem
    (``conv1``, ``bn1``) when ``frozen_stages >= 0`` and ``layer1..layer{frozen_stages}``.
    """
    frozen_top = set()
    if frozen_stages >= 0:
        frozen_top |= {'conv1', 'bn1'}
    frozen_layers = tuple(f'layer{i}_' for i in range(1, frozen_stages + 1))

    def trainable(path, _):
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        if names and names[0] == 'params':
            names = names[1:]
        if any(_BN_NAME.match(str(n)) for n in names):
            return False
        top = str(names[0]) if names else ''
        return not (top in frozen_top or top.startswith(frozen_layers))

    return jax.tree_util.tree_map_with_path(trainable, params)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of PyTorch ``F.interpolate(size=out_size, mode='nearest')`` (torch 1.x kernel:
    ``min(floor(dst * float(in / out)), in - 1)`` evaluated in float32)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def resize_nearest(feat, size: Tuple[int, int]):
    """(N, h, w, C) -> (N, H, W, C) nearest resize to an explicit size (PyTorch semantics)."""
    rows = nearest_indices(feat.shape[1], size[0])
    cols = nearest_indices(feat.shape[2], size[1])
    return feat[:, rows][:, :, cols]


class FPN(nn.Module):
    """mmdet 2.x ``FPN`` (no norm, no activation in the convs). Sequence of (N, H_i, W_i, C_i) ->
    tuple of ``num_outs`` maps (N, H_l, W_l, out_channels), finest first.

    add_extra_convs: False (extra levels by 1x1 max-pool stride 2, i.e. subsampling), True (==
    'on_input'), 'on_input' (C of the last used input), 'on_lateral' (last lateral), 'on_output'
    (last FPN output). relu_before_extra_convs applies a ReLU before the 2nd+ extra conv only.
    """
    in_channels: Sequence[int]
    out_channels: int
    num_outs: int
    start_level: int = 0
    end_level: int = -1
    add_extra_convs: Union[bool, str] = False
    relu_before_extra_convs: bool = False
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, inputs: Sequence[jnp.ndarray]) -> Tuple[jnp.ndarray, ...]:
        assert len(inputs) == len(self.in_channels), (len(inputs), self.in_channels)
        num_ins = len(self.in_channels)
        if self.end_level == -1:
            backbone_end = num_ins
            assert self.num_outs >= num_ins - self.start_level
        else:
            backbone_end = self.end_level
            assert self.end_level <= num_ins and self.num_outs == self.end_level - self.start_level
        extra = self.add_extra_convs
        if extra is True:
            extra = 'on_input'
        assert extra in (False, 'on_input', 'on_lateral', 'on_output'), extra

        def conv(kernel, stride, name):
            return conv2d(self.out_channels, kernel, stride, padding=kernel // 2, use_bias=True, name=name,
                          dtype=self.dtype, kernel_init=xavier_uniform)

        laterals = [conv(1, 1, f'lateral_convs_{i}')(inputs[self.start_level + i])
                    for i in range(backbone_end - self.start_level)]
        used = len(laterals)
        for level in range(used - 1, 0, -1):
            up = resize_nearest(laterals[level], laterals[level - 1].shape[1:3])
            laterals[level - 1] = laterals[level - 1] + up
        outs = [conv(3, 1, f'fpn_convs_{i}')(laterals[i]) for i in range(used)]
        if self.num_outs > used:
            if not extra:
                for _ in range(self.num_outs - used):
                    outs.append(outs[-1][:, ::2, ::2])  # F.max_pool2d(x, 1, stride=2)
            else:
                source = {'on_input': lambda: inputs[backbone_end - 1],
                          'on_lateral': lambda: laterals[-1],
                          'on_output': lambda: outs[-1]}[extra]()
                outs.append(conv(3, 2, f'fpn_convs_{used}')(source))
                for level in range(used + 1, self.num_outs):
                    src = nn.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(conv(3, 2, f'fpn_convs_{level}')(src))
        return tuple(outs)
