"""The expert's inputs, checkpoint loading and head duplication (distill/expert.py)."""
import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from fd3d_jax.distill import expert as expert_lib
from fd3d_jax import params_io
from tests.fake_gcs import fake_gcs


def test_expert_batch_renormalises_upsamples_and_scales_lidar2img():
    ml = rgb = common.data_config(toy=True)
    caffe = common.data_config(toy=True)
    caffe.update(common.CAFFE_NORM)
    raw_rgb = np.random.default_rng(0).uniform(0, 255, size=(1, 1, 2, 4, 6, 3)).astype(np.float32)
    img = (raw_rgb - np.asarray(rgb.image_mean)) / np.asarray(rgb.image_std)
    l2i = np.tile(np.eye(4, dtype=np.float32), (1, 1, 2, 1, 1))
    l2i[..., 0, 3] = 3.0
    batch = dict(img=jnp.asarray(img, jnp.float32), lidar2img=jnp.asarray(l2i),
                 bev_rot_index=jnp.zeros((1, 1, 4), jnp.int32), expert_bev_rot_index=jnp.ones((1, 1, 16), jnp.int32))
    out = expert_lib.expert_batch(batch, ml, caffe, 1)
    want = raw_rgb[..., ::-1] - np.asarray(caffe.image_mean)            # BGR, caffe mean, std 1
    np.testing.assert_allclose(np.asarray(out['img']), want, rtol=1e-5, atol=1e-3)
    assert out['bev_rot_index'].shape == (1, 1, 16)                    # the expert's BEV grid
    up = expert_lib.expert_batch(batch, ml, ml, 2)
    assert up['img'].shape == (1, 1, 2, 8, 12, 3)
    np.testing.assert_allclose(np.asarray(up['img'])[..., 1::2, 1::2, :].mean(), img.mean(), atol=0.2)
    # a point projected with the scaled lidar2img lands at twice the pixel coordinates
    p = np.array([1.0, 2.0, 4.0, 1.0])
    a, b = l2i[0, 0, 0] @ p, np.asarray(up['lidar2img'])[0, 0, 0] @ p
    np.testing.assert_allclose(b[:2] / b[2], 2 * a[:2] / a[2])
    assert b[2] == a[2]
    np.testing.assert_array_equal(np.asarray(expert_lib.expert_batch(batch, ml, ml, 1)['img']), img.astype(np.float32))


def _params():
    return {'head': {'a': {'kernel': np.ones((2, 3), np.float32)}, 'b': np.zeros((4,), np.float32)},
            'backbone': {'w': np.ones((5,), np.float32)}}


def test_check_shapes_lists_every_mismatch():
    abstract = _params()
    bad = _params()
    bad['head']['a']['kernel'] = np.ones((3, 3), np.float32)
    del bad['backbone']['w']
    bad['extra'] = np.ones(1)
    with pytest.raises(expert_lib.ExpertError) as e:
        expert_lib.check_shapes(bad, abstract, '/some/ckpt')
    msg = str(e.value)
    assert '/some/ckpt' in msg and 'missing: backbone/w' in msg and 'unexpected: extra' in msg
    assert 'shape: head/a/kernel: checkpoint (3, 3), model (2, 3)' in msg
    expert_lib.check_shapes(_params(), abstract, 'ok')


def test_init_head_from_expert_copies_leaves_of_equal_shape():
    app = _params()
    exp = _params()
    exp['head']['a']['kernel'] = np.full((2, 3), 7.0, np.float32)
    exp['head']['b'] = np.full((5,), 7.0, np.float32)                   # other shape: kept
    new, copied, kept = expert_lib.init_head_from_expert(app, exp)
    assert copied == ['a/kernel'] and kept == ['b']
    assert float(new['head']['a']['kernel'][0, 0]) == 7.0 and float(new['head']['b'][0]) == 0.0
    assert new['backbone'] is app['backbone']


def test_load_expert_params_from_a_params_folder_and_clear_errors(tmp_path):
    cfg = ml_collections.ConfigDict(dict(model=dict(name='bevformer', bev_h=4, remat=False)))
    params_io.save_params(_params(), str(tmp_path / 'converted'))
    got = expert_lib.load_expert_params(str(tmp_path / 'converted'), cfg, _params())
    np.testing.assert_array_equal(np.asarray(got['head']['a']['kernel']), _params()['head']['a']['kernel'])
    with pytest.raises(expert_lib.ExpertError, match='expert_checkpoint is empty'):
        expert_lib.load_expert_params('', cfg, _params())
    with pytest.raises(expert_lib.ExpertError, match='not a directory'):
        expert_lib.load_expert_params(str(tmp_path / 'nowhere'), cfg, _params())
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(expert_lib.ExpertError, match='no checkpoint in'):
        expert_lib.load_expert_params(str(tmp_path / 'empty'), cfg, _params())
    wd = tmp_path / 'workdir'
    os.makedirs(wd)
    with open(wd / 'config.json', 'w') as f:   # a training workdir of another model (remat is ignored)
        json.dump({'model': {'name': 'bevformer', 'bev_h': 8, 'remat': True}}, f)
    with pytest.raises(expert_lib.ExpertError, match=r'model.bev_h: checkpoint 8, config 4') as e:
        expert_lib.load_expert_params(str(wd), cfg, _params())
    assert 'remat' not in str(e.value)
    # the same model trained on other image normalisation: its inputs would be renormalised wrongly
    cfg = ml_collections.ConfigDict(dict(model=dict(name='bevformer', bev_h=4), **common.RGB_NORM))
    with open(wd / 'config.json', 'w') as f:
        json.dump({'model': {'name': 'bevformer', 'bev_h': 4}, 'data': dict(common.CAFFE_NORM)}, f)
    with pytest.raises(expert_lib.ExpertError, match=r'image_std: checkpoint data.image_std \[1.0, 1.0, 1.0\]') as e:
        expert_lib.load_expert_params(str(wd), cfg, _params())
    assert str(wd) in str(e.value) and 'to_rgb' in str(e.value) and 'bev_h' not in str(e.value)


def test_an_expert_in_a_bucket_is_read_through_its_url(tmp_path, monkeypatch):
    """``expert_checkpoint=gs://b/expert``: its ``config.json`` is read from the bucket and the errors name the
    URL (not ``<cwd>/gs:/b/expert``, which does not exist)."""
    monkeypatch.chdir(tmp_path)
    cfg = ml_collections.ConfigDict(dict(model=dict(name='bevformer', bev_h=4)))
    (tmp_path / 'bucket' / 'b' / 'expert').mkdir(parents=True)
    (tmp_path / 'bucket' / 'b' / 'expert' / 'config.json').write_text(json.dumps({'model': {'name': 'bevformer',
                                                                                            'bev_h': 8}}))
    with fake_gcs(tmp_path / 'bucket'):
        with pytest.raises(expert_lib.ExpertError, match=r'the expert in gs://b/expert .*\n  model.bev_h: checkpoint 8'):
            expert_lib.load_expert_params('gs://b/expert', cfg, _params())
        with pytest.raises(expert_lib.ExpertError, match=r'expert_checkpoint=gs://b/nowhere is not a directory'):
            expert_lib.load_expert_params('gs://b/nowhere', cfg, _params())


def test_model_keys_added_later_take_the_value_of_the_code_before_them():
    """An expert's ``config.json`` written before ``model.prev_bev_batch0`` existed was trained per sample: it
    fits a config with the key False, not one with it True; any other key missing from it still differs."""
    saved = {'name': 'bevformer', 'embed_dims': 8}
    assert expert_lib._model_differences(saved, {'name': 'bevformer', 'embed_dims': 8, 'prev_bev_batch0': False}) == []
    assert expert_lib._model_differences(saved, {'name': 'bevformer', 'embed_dims': 8, 'prev_bev_batch0': True}) == [
        'model.prev_bev_batch0: checkpoint False, config True']
    assert expert_lib._model_differences(saved, {'name': 'bevformer', 'embed_dims': 8, 'new_key': 1}) == [
        'model.new_key: checkpoint None, config 1']
    assert expert_lib._model_differences(saved, {'name': 'bevformer', 'embed_dims': 8,
                                                 'reproduce_can_bus_bug': True}) == [
        'model.reproduce_can_bus_bug: checkpoint False, config True']   # an expert trained on the true quaternion
