"""Official checkpoint layout <-> our params: coverage and exact round trips at the five full configs
(abstract params only: ``jax.eval_shape``), error reports, layout semantics on toy sizes, and the CLI
through real ``.pth`` files (PyTorch, the ``test`` extra; skipped without it)."""
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import common
from fd3d_jax.convert import (
    ConvertError,
    checkpoint_files,
    convert,
    flax_to_torch,
    ignored_keys,
    mapping,
    torch_io,
    torch_to_flax,
)
from fd3d_jax.convert.official_keys import official_shapes
from fd3d_jax.distill.expert import load_expert_params
from fd3d_jax.models import detector_class
from fd3d_jax.models.backbone import conv2d
from fd3d_jax.models.decoder import SelfAttention

FULL = ('bevformer_tiny', 'bevformer_small', 'bevformer_base', 'detr3d_r50', 'detr3d_r101')
# Keys of the official state dicts (incl. BN num_batches_tracked and code_weights) and the ignored ones.
KEY_COUNTS = dict(bevformer_tiny=(643, 54), bevformer_small=(1001, 105), bevformer_base=(1089, 105),
                  detr3d_r50=(588, 54), detr3d_r101=(946, 105))
# Facts read off the original code/configs (official_keys docstring), as (key, PyTorch shape).
SPOT_CHECKS = dict(
    bevformer_tiny=[('img_backbone.conv1.weight', (64, 3, 7, 7)), ('img_backbone.bn1.num_batches_tracked', ()),
                    ('img_backbone.layer1.0.downsample.0.weight', (256, 64, 1, 1)),
                    ('img_backbone.layer4.2.conv3.weight', (2048, 512, 1, 1)),
                    ('img_neck.lateral_convs.0.conv.weight', (256, 2048, 1, 1)),
                    ('img_neck.fpn_convs.0.conv.bias', (256,)),
                    ('pts_bbox_head.transformer.encoder.layers.2.attentions.0.sampling_offsets.weight', (128, 512)),
                    ('pts_bbox_head.transformer.encoder.layers.0.attentions.1.deformable_attention.'
                     'sampling_offsets.weight', (128, 256)),
                    ('pts_bbox_head.transformer.encoder.layers.0.ffns.0.layers.0.0.weight', (512, 256)),
                    ('pts_bbox_head.transformer.decoder.layers.5.attentions.0.attn.in_proj_weight', (768, 256)),
                    ('pts_bbox_head.transformer.decoder.layers.0.attentions.1.sampling_offsets.weight', (64, 256)),
                    ('pts_bbox_head.transformer.level_embeds', (4, 256)),
                    ('pts_bbox_head.transformer.cams_embeds', (6, 256)),
                    ('pts_bbox_head.transformer.can_bus_mlp.0.weight', (128, 18)),
                    ('pts_bbox_head.transformer.can_bus_mlp.norm.weight', (256,)),
                    ('pts_bbox_head.bev_embedding.weight', (2500, 256)),
                    ('pts_bbox_head.positional_encoding.row_embed.weight', (50, 128)),
                    ('pts_bbox_head.query_embedding.weight', (900, 512)),
                    ('pts_bbox_head.cls_branches.5.6.weight', (10, 256)),
                    ('pts_bbox_head.reg_branches.0.4.bias', (10,)),
                    ('pts_bbox_head.code_weights', (10,))],
    bevformer_small=[('img_backbone.layer3.22.conv2.conv_offset.weight', (27, 256, 3, 3)),
                     ('img_backbone.layer4.0.conv2.conv_offset.bias', (27,)),
                     ('pts_bbox_head.bev_embedding.weight', (22500, 256)),
                     ('pts_bbox_head.positional_encoding.col_embed.weight', (150, 128))],
    bevformer_base=[('img_neck.lateral_convs.0.conv.weight', (256, 512, 1, 1)),
                    ('img_neck.fpn_convs.3.conv.weight', (256, 256, 3, 3)),
                    ('pts_bbox_head.transformer.encoder.layers.5.attentions.1.deformable_attention.'
                     'sampling_offsets.weight', (512, 256)),
                    ('pts_bbox_head.transformer.encoder.layers.5.attentions.1.deformable_attention.'
                     'attention_weights.weight', (256, 256)),
                    ('pts_bbox_head.transformer.encoder.layers.5.attentions.1.output_proj.weight', (256, 256))],
    detr3d_r50=[('img_neck.lateral_convs.0.conv.weight', (256, 512, 1, 1))],
    detr3d_r101=[('img_neck.lateral_convs.2.conv.weight', (256, 2048, 1, 1)),
                 ('img_backbone.layer3.0.conv2.conv_offset.weight', (27, 256, 3, 3)),
                 ('pts_bbox_head.transformer.decoder.layers.5.attentions.1.attention_weights.weight', (24, 256)),
                 ('pts_bbox_head.transformer.decoder.layers.5.attentions.1.position_encoder.0.weight', (256, 3)),
                 ('pts_bbox_head.transformer.decoder.layers.5.attentions.1.position_encoder.4.bias', (256,)),
                 ('pts_bbox_head.transformer.reference_points.weight', (3, 256))],
)
ABSENT = dict(
    bevformer_tiny=['img_backbone.layer3.0.conv2.conv_offset.weight', 'img_neck.fpn_convs.1.conv.weight',
                    'pts_bbox_head.transformer.encoder.layers.0.attentions.1.deformable_attention.output_proj.weight'],
    detr3d_r101=['img_backbone.layer2.0.conv2.conv_offset.weight', 'img_neck.lateral_convs.3.conv.weight',
                 'pts_bbox_head.transformer.level_embeds', 'pts_bbox_head.bev_embedding.weight'],
)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def get_config(name, arg='full'):
    return importlib.import_module(f'configs.{name}').get_config(arg)


def random_state_dict(shapes, seed):
    rng = np.random.default_rng(seed)
    return {k: (rng.integers(0, 10 ** 6, size=s, dtype=np.int64) if k.endswith('num_batches_tracked')
                else rng.standard_normal(size=s, dtype=np.float32)) for k, s in shapes.items()}


def random_params(abstract, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(size=a.shape, dtype=np.float32), abstract)


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_tree(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    bad = ['/'.join(k) for k in fa if not same_bits(fa[k], fb[k])]
    assert not bad, bad[:10]


@pytest.fixture(scope='module')
def toy():
    """bevformer_tiny:toy with its abstract params and a random official state dict."""
    cfg = get_config('bevformer_tiny', 'toy')
    abstract = convert.abstract_params(cfg)
    return cfg, abstract, random_state_dict(official_shapes(cfg.model), 0)


@pytest.mark.parametrize('name', FULL)
def test_full_config_layout_and_exact_round_trips(name):
    cfg = get_config(name)
    shapes = official_shapes(cfg.model)
    plan = mapping.plan(cfg.model)
    assert (len(shapes), sum(isinstance(e, mapping.Ignored) for e in plan.values())) == KEY_COUNTS[name]
    for key, shape in SPOT_CHECKS[name]:
        assert shapes[key] == shape, key
    for key in ABSENT.get(name, []):
        assert key not in shapes, key
    abstract = convert.abstract_params(cfg)

    # torch -> flax: every param filled with the abstract shape/dtype; back: the same keys, bit for bit
    sd = random_state_dict(shapes, seed=1)
    params = torch_to_flax(sd, cfg, abstract=abstract)
    got = traverse_util.flatten_dict(params)
    want = traverse_util.flatten_dict(abstract)
    assert set(got) == set(want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
    back = flax_to_torch(params, cfg, fill=sd, abstract=abstract)
    assert list(back) == list(shapes)
    assert not [k for k in sd if not same_bits(sd[k], back[k])]
    # without ``fill`` only what our model does not hold differs
    ignored = ignored_keys(sd, cfg)
    plain = flax_to_torch(params, cfg, abstract=abstract)
    differ = {k for k in sd if not same_bits(sd[k], plain[k])}
    assert differ == {k.split('[')[0] for k in ignored}
    if detector_class(cfg.model).has_bev and cfg.model.num_levels < 4:
        key = 'pts_bbox_head.transformer.level_embeds'
        assert ignored[f'{key}[{cfg.model.num_levels}:4]'] == mapping.UNUSED_LEVEL_EMBEDS
        assert same_bits(plain[key][:cfg.model.num_levels], sd[key][:cfg.model.num_levels])
        assert not plain[key][cfg.model.num_levels:].any()
    assert plain['img_backbone.bn1.num_batches_tracked'].dtype == np.int64
    np.testing.assert_array_equal(plain['pts_bbox_head.code_weights'], np.float32(cfg.loss.code_weights))
    del sd, back, plain

    # flax -> torch -> flax
    params = random_params(abstract, seed=2)
    assert_same_tree(torch_to_flax(flax_to_torch(params, cfg, abstract=abstract), cfg, abstract=abstract), params)


def test_ignored_keys_are_listed_with_reasons(toy):
    cfg, _, sd = toy
    ignored = ignored_keys(sd, cfg)
    counters = [k for k in sd if k.endswith('num_batches_tracked')]
    assert counters and all(ignored[k] == mapping.BN_COUNTER for k in counters)
    assert ignored['pts_bbox_head.code_weights'] == mapping.CODE_WEIGHTS
    assert ignored['pts_bbox_head.transformer.level_embeds[3:4]'] == mapping.UNUSED_LEVEL_EMBEDS  # toy: 3 levels
    assert len(ignored) == len(counters) + 2


def test_ignored_keys_may_be_absent(toy):
    cfg, abstract, sd = toy
    slim = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked') and k != 'pts_bbox_head.code_weights'}
    assert_same_tree(torch_to_flax(slim, cfg, abstract=abstract), torch_to_flax(sd, cfg, abstract=abstract))


def test_extra_missing_and_misshaped_keys_are_all_named(toy):
    cfg, abstract, sd = toy
    bad = dict(sd)
    bad['img_backbone.layer9.0.conv1.weight'] = np.zeros((3, 3), np.float32)
    del bad['pts_bbox_head.transformer.decoder.layers.1.attentions.0.attn.in_proj_weight']
    bad['img_neck.fpn_convs.0.conv.weight'] = np.zeros((32, 32, 1, 1), np.float32)
    with pytest.raises(ConvertError) as e:
        torch_to_flax(bad, cfg, abstract=abstract)
    msg = str(e.value)
    assert '1 unexpected, 1 missing, 1 of another shape' in msg
    assert 'unexpected (no place in the model): img_backbone.layer9.0.conv1.weight (3, 3)' in msg
    assert ('missing (model param left without a source): pts_bbox_head.transformer.decoder.layers.1.attentions.0'
            '.attn.in_proj_weight (96, 32) -> head/layers_1/self_attn/attn/query/kernel, '
            'head/layers_1/self_attn/attn/key/kernel, head/layers_1/self_attn/attn/value/kernel') in msg
    assert 'shape: img_neck.fpn_convs.0.conv.weight: checkpoint (32, 32, 1, 1), expected (32, 32, 3, 3)' in msg
    assert len(e.value.unexpected) == len(e.value.missing) == len(e.value.mismatched) == 1
    assert isinstance(e.value, ValueError)


def test_missing_stacked_layer_names_its_slice(toy):
    cfg, abstract, sd = toy
    bad = {k: v for k, v in sd.items() if k != 'pts_bbox_head.transformer.encoder.layers.1.norms.2.weight'}
    with pytest.raises(ConvertError, match=r'encoder\.layers\.1\.norms\.2\.weight \(32,\) -> encoder/layers/norm3/scale\[1\]'):
        torch_to_flax(bad, cfg, abstract=abstract)


def test_flax_to_torch_names_bad_params(toy):
    cfg, abstract, sd = toy
    params = torch_to_flax(sd, cfg, abstract=abstract)
    flat = traverse_util.flatten_dict(params)
    del flat[('head', 'reference_points', 'bias')]
    flat[('head', 'extra', 'kernel')] = np.zeros(3, np.float32)
    flat[('cams_embeds',)] = np.zeros((5, 32), np.float32)
    with pytest.raises(ConvertError) as e:
        flax_to_torch(traverse_util.unflatten_dict(flat), cfg, abstract=abstract)
    msg = str(e.value)
    assert 'missing (no value for this model param): head/reference_points/bias (3,)' in msg
    assert 'unexpected (not a param of this model): head/extra/kernel (3,)' in msg
    assert 'shape: cams_embeds: params (5, 32), expected (6, 32)' in msg


def test_config_mismatch_is_reported(toy):
    """A checkpoint of another size: every mis-shaped key is listed."""
    cfg, abstract, sd = toy
    other = get_config('bevformer_tiny', 'toy')
    other.model.bev_h = 6
    with pytest.raises(ConvertError) as e:
        torch_to_flax(sd, other)
    assert sorted(e.value.mismatched) == [
        'pts_bbox_head.bev_embedding.weight: checkpoint (80, 32), expected (60, 32)',
        'pts_bbox_head.positional_encoding.row_embed.weight: checkpoint (8, 16), expected (6, 16)']


def test_normalize_state_dict():
    sd = {'module.img_backbone.layer3.0.conv2_offset.weight': 1, 'module.img_backbone.layer3.0.conv2.weight': 2,
          'module.img_backbone.layer3.1.conv2_offset.bias': 3}
    assert convert.normalize_state_dict({'meta': {}, 'state_dict': sd}) == {
        'img_backbone.layer3.0.conv2.conv_offset.weight': 1, 'img_backbone.layer3.0.conv2.weight': 2,
        'img_backbone.layer3.1.conv2.conv_offset.bias': 3}


def test_yaw_rows_of_the_reg_branches(toy):
    """Our code entries 6, 7 = (sin, cos)(yaw) = (-cos, -sin)(yaw_0x) of the checkpoint's."""
    cfg, abstract, sd = toy
    w, b = sd['pts_bbox_head.reg_branches.1.4.weight'], sd['pts_bbox_head.reg_branches.1.4.bias']
    h = np.random.default_rng(3).standard_normal((5, w.shape[1])).astype(np.float32)
    theirs = h @ w.T + b
    out = torch_to_flax(sd, cfg, abstract=abstract)['head']['reg_branches_1']['out']
    ours = h @ out['kernel'] + out['bias']
    np.testing.assert_allclose(ours[:, :6], theirs[:, :6], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours[:, 8:], theirs[:, 8:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours[:, 6], -theirs[:, 7], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours[:, 7], -theirs[:, 6], rtol=1e-6, atol=1e-6)
    kept = torch_to_flax(sd, cfg, convert_yaw=False, abstract=abstract)['head']['reg_branches_1']['out']
    assert same_bits(kept['kernel'], np.ascontiguousarray(w.T)) and same_bits(kept['bias'], b)
    assert same_bits(flax_to_torch(torch_to_flax(sd, cfg, convert_yaw=False, abstract=abstract), cfg, fill=sd,
                                   convert_yaw=False, abstract=abstract)['pts_bbox_head.reg_branches.1.4.weight'], w)


def torch_mha(x_qk, x_v, in_w, in_b, out_w, out_b, heads):
    """``nn.MultiheadAttention`` (no masks, no dropout) in numpy, (L, C) inputs."""
    c = x_qk.shape[-1]
    q, k, v = (x @ in_w[i * c:(i + 1) * c].T + in_b[i * c:(i + 1) * c] for i, x in enumerate((x_qk, x_qk, x_v)))
    split = lambda t: t.reshape(t.shape[0], heads, c // heads).transpose(1, 0, 2)   # noqa: E731
    q, k, v = split(q) * (c // heads) ** -0.5, split(k), split(v)
    a = q @ k.transpose(0, 2, 1)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return (a @ v).transpose(1, 0, 2).reshape(-1, c) @ out_w.T + out_b


def test_self_attention_matches_torch_semantics(toy):
    """The packed in_proj split: our decoder self-attention with converted weights = torch's MHA."""
    cfg, abstract, sd = toy
    c, m = cfg.model.embed_dims, cfg.model.num_heads
    p = torch_to_flax(sd, cfg, abstract=abstract)['head']['layers_1']['self_attn']
    rng = np.random.default_rng(4)
    x, pos = rng.standard_normal((2, 7, c), dtype=np.float32)
    ours = SelfAttention(c, m, 0.0).apply({'params': p}, jnp.asarray(x)[None], jnp.asarray(pos)[None])[0]
    key = 'pts_bbox_head.transformer.decoder.layers.1.attentions.0.attn.'
    ref = x + torch_mha(x + pos, x, sd[key + 'in_proj_weight'], sd[key + 'in_proj_bias'],
                        sd[key + 'out_proj.weight'], sd[key + 'out_proj.bias'], m)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4)


def test_conv_kernel_layout_matches_torch_semantics(toy):
    """OIHW -> HWIO: the stem (7x7, stride 2, pad 3) with the converted kernel = torch's conv2d."""
    cfg, abstract, sd = toy
    kernel = torch_to_flax(sd, cfg, abstract=abstract)['image_features']['backbone']['conv1']['kernel']
    w = sd['img_backbone.conv1.weight']                                            # (O, I, 7, 7)
    x = np.random.default_rng(5).standard_normal((3, 9, 11), dtype=np.float32)    # (C, H, W)
    ours = conv2d(w.shape[0], 7, 2, 3).apply({'params': {'kernel': kernel}}, jnp.asarray(x.transpose(1, 2, 0))[None])[0]
    xp = np.pad(x, ((0, 0), (3, 3), (3, 3)))
    ref = np.stack([[[np.sum(w[o] * xp[:, 2 * i:2 * i + 7, 2 * j:2 * j + 7]) for j in range(6)] for i in range(5)]
                    for o in range(w.shape[0])])                                   # (O, 5, 6)
    np.testing.assert_allclose(np.asarray(ours), ref.transpose(1, 2, 0), rtol=1e-4, atol=1e-4)


def test_cli_round_trip_through_files(toy, tmp_path, monkeypatch):
    """``python -m fd3d_jax.convert`` writes a params folder that the distillation expert loader reads;
    ``--to-torch`` (here in-process) writes the original state dict back."""
    torch = pytest.importorskip('torch')
    cfg, abstract, sd = toy
    pth = str(tmp_path / 'official.pth')
    torch.save({'meta': {'CLASSES': ('car',)}, 'state_dict': {k: torch.from_numpy(v) for k, v in sd.items()},
                'optimizer': {}}, pth)
    out = str(tmp_path / 'converted')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    run = subprocess.run([sys.executable, '-m', 'fd3d_jax.convert', '--torch-checkpoint', pth,
                          '--config', 'configs/bevformer_tiny.py:toy', '--out', out],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'converted {len(sd) - len(ignored_keys(sd, cfg)) + 1} of {len(sd)} keys' in run.stdout
    report = json.load(open(os.path.join(out, 'conversion.json')))
    assert report['model'] == 'bevformer' and report['ignored'] == ignored_keys(sd, cfg)
    params = load_expert_params(out, common.expert_config(cfg), abstract)
    assert_same_tree(jax.tree_util.tree_map(np.asarray, params), torch_to_flax(sd, cfg, abstract=abstract))

    back = str(tmp_path / 'back.pth')
    assert checkpoint_files.to_torch(out, cfg, back, template=pth) == len(sd)
    saved = torch.load(back, map_location='cpu', weights_only=True)
    assert saved['meta']['CLASSES'] == tuple(cfg.data.class_names)
    assert list(saved['state_dict']) == list(official_shapes(cfg.model))
    assert all(same_bits(saved['state_dict'][k].numpy(), v) for k, v in sd.items())


def test_cli_errors_name_the_problem(toy, tmp_path, monkeypatch):
    cfg, _, sd = toy
    with pytest.raises(ConvertError, match='needs PyTorch'):
        monkeypatch.setitem(sys.modules, 'torch', None)
        torch_io.load_state_dict(str(tmp_path / 'x.pth'))
    monkeypatch.undo()
    torch = pytest.importorskip('torch')
    with pytest.raises(ConvertError, match='no such checkpoint'):
        checkpoint_files.to_flax(str(tmp_path / 'nothing.pth'), cfg, str(tmp_path / 'out'))
    pth = str(tmp_path / 'bad.pth')
    torch.save({'state_dict': {'step': 3, **{k: torch.from_numpy(v) for k, v in sd.items()}}}, pth)
    with pytest.raises(ConvertError, match=r'not tensors: step \(int\)'):
        torch_io.load_state_dict(pth)
