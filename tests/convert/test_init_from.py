"""``train.init_from``: pretrained torchvision ResNets, FCOS3D-keyed detector checkpoints and our own params
folders load into the right leaves (our backbone / neck outputs equal the torch modules'), and bad sources end
with one error naming the file and the keys."""
import jax
import numpy as np
import pytest
import torch

from configs.common import resnet
from fd3d_jax import params_io
from fd3d_jax.convert import convert
from fd3d_jax.convert.init_from import apply_init_from, missing_source_warning, parse_sources
from fd3d_jax.errors import ConvertError
from fd3d_jax.models.backbone import FPN, ResNet
from fd3d_jax.train import loop
from tests.convert.test_parity import (TorchFPN, TorchResNet, apply, check, get_config, init_like_torch,
                                       nchw_to_nhwc, randomise_bn, t2n, torch_sd, torchvision_resnet)

TOL = 1e-5


def zero_params(cfg):
    """Our params of ``cfg`` as zeros (what ``model.init`` gives is overwritten where a source loads)."""
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), convert.abstract_params(cfg))


def with_source(cfg, spec):
    cfg = cfg.copy_and_resolve_references()
    cfg.train.init_from = spec
    return cfg


def tiny_with_resnet(depth):
    """bevformer_tiny:toy with a real-width pytorch-style ResNet (C5 out) and its one-level FPN."""
    cfg = get_config('bevformer_tiny').copy_and_resolve_references()
    cfg.model.backbone = resnet(depth, 'pytorch', (3,))
    cfg.model.neck.in_channels = (2048,)
    return cfg


@pytest.mark.parametrize('depth', [50, 101])
def test_torchvision_resnet_loads_into_the_backbone(depth, tmp_path):
    """A random torchvision ResNet saved as a .pth: every backbone key loads (``fc`` skipped as unexpected),
    nothing else of the model changes, and our C5 equals torchvision's within 1e-5 relative."""
    cfg = tiny_with_resnet(depth)
    model = torchvision_resnet(depth, seed=40 + depth)
    generator = torch.Generator().manual_seed(3)
    model = randomise_bn(model, torch.randn(2, 3, 64, 96, generator=generator), seed=4)
    path = tmp_path / f'resnet{depth}.pth'
    torch.save(model.state_dict(), path)
    before = zero_params(cfg)
    params, (report,) = apply_init_from(before, with_source(cfg, str(path)))
    assert report.kind == 'torchvision' and not report.missing and not report.mismatched
    assert sorted(report.unexpected) == ['fc.bias (1000,)', 'fc.weight (1000, 2048)']
    keys = [k for k in torch_sd(model) if not k.startswith('fc.')]
    assert len(report.loaded) == len([k for k in keys if not k.endswith('num_batches_tracked')])
    assert len(report.ignored) == len([k for k in keys if k.endswith('num_batches_tracked')]) > 0
    untouched = jax.tree_util.tree_leaves({k: v for k, v in params.items() if k != 'image_features'})
    assert not any(np.any(leaf) for leaf in untouched)
    assert not any(np.any(leaf) for leaf in jax.tree_util.tree_leaves(params['image_features']['neck']))
    x = torch.randn(1, 3, 64, 96, generator=generator)
    with torch.no_grad():
        c5 = torch.nn.Sequential(*list(model.children())[:-2])(x)
    ours = apply(ResNet(**dict(cfg.model.backbone)), params['image_features']['backbone'], nchw_to_nhwc(x))
    check(f'init_from torchvision resnet{depth} C5', ours[-1], t2n(c5).transpose(0, 2, 3, 1), tol=TOL)


def test_fcos3d_keyed_checkpoint_fills_backbone_and_neck(tmp_path):
    """An mmdet detector checkpoint (``backbone.*``, ``neck.*``, a ``bbox_head`` and an extra FPN output we do not
    have): backbone and neck load, the rest is listed as unexpected; our features equal the torch chain's."""
    cfg = get_config('bevformer_tiny')
    bb, neck = dict(cfg.model.backbone), dict(cfg.model.neck)
    backbone = init_like_torch(TorchResNet(bb['base_width'], bb['stage_blocks'], bb['style'], bb['dcn_stages'],
                                           bb['out_indices']), seed=11)
    fpn = init_like_torch(TorchFPN(**neck), seed=12)
    state = {**{k: torch.from_numpy(v) for k, v in torch_sd(backbone, 'backbone.').items()},
             **{k: torch.from_numpy(v) for k, v in torch_sd(fpn, 'neck.').items()},
             'neck.fpn_convs.9.conv.weight': torch.zeros(4, 4, 3, 3), 'bbox_head.cls_convs.0.conv.weight': torch.zeros(3)}
    path = tmp_path / 'fcos3d.pth'
    torch.save({'meta': {}, 'state_dict': state}, path)
    params, (report,) = apply_init_from(zero_params(cfg), with_source(cfg, str(path)))
    assert report.kind == 'detector' and not report.missing and not report.mismatched
    assert sorted(k.split(' ')[0] for k in report.unexpected) == ['bbox_head.cls_convs.0.conv.weight',
                                                                  'img_neck.fpn_convs.9.conv.weight']
    assert not any(np.any(leaf) for leaf in jax.tree_util.tree_leaves(params['head']))
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        refs = fpn(backbone(x))
    feats = apply(ResNet(**bb), params['image_features']['backbone'], nchw_to_nhwc(x))
    ours = apply(FPN(**neck), params['image_features']['neck'], list(feats))
    for level, (o, r) in enumerate(zip(ours, refs)):
        check(f'init_from fcos3d-keyed P{level}', o, t2n(r).transpose(0, 2, 3, 1), tol=TOL)


def test_params_folder_into_a_subtree_and_in_order(tmp_path):
    """Our params folder: ``#SUBTREE`` loads only that subtree; sources apply in order (the later wins)."""
    cfg = get_config('bevformer_tiny')
    ones = jax.tree_util.tree_map(lambda x: np.ones_like(x), zero_params(cfg))
    twos = jax.tree_util.tree_map(lambda x: 2 * np.ones_like(x), zero_params(cfg))
    params_io.save_params(ones, tmp_path / 'ones')
    params_io.save_params(twos, tmp_path / 'twos')
    spec = f"{tmp_path / 'ones'},{tmp_path / 'twos'}#image_features/backbone"
    assert parse_sources(spec)[1] == (str(tmp_path / 'twos'), ('image_features', 'backbone'))
    params, reports = apply_init_from(zero_params(cfg), with_source(cfg, spec))
    assert [r.kind for r in reports] == ['params', 'params'] and not reports[1].missing
    assert all(np.all(leaf == 2) for leaf in jax.tree_util.tree_leaves(params['image_features']['backbone']))
    assert all(np.all(leaf == 1) for leaf in jax.tree_util.tree_leaves(params['head']))
    assert all(name.startswith('image_features/backbone/') for name in reports[1].loaded)


def test_bad_sources_name_the_file_and_the_keys(tmp_path):
    """Missing file, another architecture (a ResNet-101 into a ResNet-50), another shape: one ConvertError each."""
    cfg = tiny_with_resnet(50)
    params = zero_params(cfg)
    with pytest.raises(ConvertError, match='init_from .*nope.pth: no such file'):
        apply_init_from(params, with_source(cfg, str(tmp_path / 'nope.pth')))
    deeper = tmp_path / 'resnet101.pth'
    torch.save(torchvision_resnet(101, seed=1).state_dict(), deeper)
    with pytest.raises(ConvertError, match=r'resnet101.pth: a torchvision checkpoint .* img_backbone.layer3.6'):
        apply_init_from(params, with_source(cfg, str(deeper)))
    narrow = {k: v for k, v in torchvision_resnet(50, seed=1).state_dict().items()}
    narrow['conv1.weight'] = torch.zeros(32, 3, 7, 7)
    torch.save(narrow, tmp_path / 'narrow.pth')
    with pytest.raises(ConvertError, match=r'narrow.pth: .*img_backbone.conv1.weight: checkpoint \(32, 3, 7, 7\)'):
        apply_init_from(params, with_source(cfg, str(tmp_path / 'narrow.pth')))


def test_full_configs_name_the_original_initialisation():
    """Each ``:full`` config names what the original starts from; unset, one warning line says so."""
    for name, want in (('bevformer_tiny', 'resnet50'), ('bevformer_small', 'fcos3d'), ('bevformer_base', 'fcos3d'),
                       ('detr3d_r101', 'fcos3d'), ('detr3d_r50', 'resnet50')):
        cfg = get_config(name, 'full')
        assert want in cfg.train.init_from_original.lower().replace('-', ''), name
        assert 'warning: train.init_from is empty' in missing_source_warning(cfg)
        assert missing_source_warning(with_source(cfg, 'x.pth')) is None
    assert missing_source_warning(get_config('bevformer_tiny', 'toy')) is None


def test_training_starts_from_the_sources_before_the_optimiser(tmp_path):
    """``training_parts`` applies ``train.init_from`` to the initial state (before the expert's head and the
    optimiser) and returns the reports the trainer logs and writes to ``init_from.json``."""
    cfg = get_config('detr3d_r50')
    ones = jax.tree_util.tree_map(lambda x: np.ones_like(x), zero_params(cfg))
    params_io.save_params(ones, tmp_path / 'ones')
    parts = loop.training_parts(with_source(cfg, f"{tmp_path / 'ones'}#image_features"), num_train_samples=4)
    (report,) = parts.init_from
    assert report.loaded and all(name.startswith('image_features/') for name in report.loaded)
    model = parts.state.params['model']
    assert all(np.all(np.asarray(leaf) == 1) for leaf in jax.tree_util.tree_leaves(model['image_features']))
    assert not all(np.all(np.asarray(leaf) == 1) for leaf in jax.tree_util.tree_leaves(model['head']))
    assert loop.training_parts(cfg, num_train_samples=4, abstract=True).init_from == []
