"""``DevicePrefetcher``: the same batches, sent ahead, with the state of the batches used."""
import jax
import numpy as np
import pytest

from fd3d_jax.data import pipeline
from fd3d_jax.train import mesh as mesh_lib
from fd3d_jax.train.prefetch import DevicePrefetcher, as_global_batch


@pytest.mark.parametrize('size', [0, 2])
def test_same_batches_and_the_state_of_the_last_one_used(train_records, data_cfg, size):
    mesh = mesh_lib.make_mesh()
    want = iter(pipeline.train_dataset(train_records, data_cfg.dataroot, data_cfg, batch_size=1, seed=0))
    want = [next(want) for _ in range(4)]
    host = iter(pipeline.train_dataset(train_records, data_cfg.dataroot, data_cfg, batch_size=1, seed=0))
    it = DevicePrefetcher(host, mesh, size)
    got = [next(it) for _ in range(2)]
    assert it.get_state() == {'next_index': 2} and host.get_state() == {'next_index': 2 + size}
    it.set_state({'next_index': 1})   # a restore drops what was sent ahead
    got += [next(it) for _ in range(2)]
    it.close()
    for a, b in zip(want[:2] + want[1:3], got):
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(b))
        assert as_global_batch(b, mesh) is b
        for key in a:
            np.testing.assert_array_equal(np.asarray(b[key]), a[key], err_msg=key)


def test_a_finite_stream_ends_after_its_last_batch(val_records, data_cfg):
    mesh = mesh_lib.make_mesh()
    want = list(pipeline.eval_dataset(val_records, data_cfg.dataroot, data_cfg, batch_size=2))
    got = list(DevicePrefetcher(iter(pipeline.eval_dataset(val_records, data_cfg.dataroot, data_cfg, batch_size=2)),
                                mesh, 2))
    assert len(got) == len(want)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(np.asarray(b['sample_idx']), a['sample_idx'])
