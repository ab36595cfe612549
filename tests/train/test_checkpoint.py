"""Checkpoints survive a crash during a save: an unfinished save (orbax's ``<step>.orbax-checkpoint-tmp``
folder, renamed into place only when complete) is never taken for the latest checkpoint. A ``gs://`` workdir
stays a URL."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd3d_jax.errors import CheckpointError
from fd3d_jax.params_io import load_params
from fd3d_jax.train.checkpoint import Checkpointer
from tests.fake_gcs import fake_gcs


def test_a_save_cut_short_leaves_the_last_checkpoint_readable(tmp_path):
    state = {'w': jnp.arange(6.0), 'step': jnp.int32(2)}
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, dict(state, w=state['w'] * 0))
    ckpt.save(2, state, data_state={'next_index': 5})
    ckpt.close()
    # A process killed while writing step 3: a partial temporary folder with a truncated array file.
    partial = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp' / 'state'
    partial.mkdir(parents=True)
    (partial / 'w').write_bytes(b'\x00' * 7)

    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    restored, data = ckpt.restore(state)
    np.testing.assert_array_equal(restored['w'], state['w'])
    assert data == {'next_index': 5}
    ckpt.save(3, dict(state, step=jnp.int32(3)))   # the interrupted step can be saved again
    ckpt.close()
    assert Checkpointer(str(tmp_path)).latest_step() == 3
    assert not os.path.exists(tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp')


def test_restoring_into_another_structure_names_the_folder(tmp_path):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, {'w': jnp.ones(3)})
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'checkpoints' / '1'} does not match"):
        ckpt.restore({'w': jnp.ones(3), 'extra': jnp.ones(2)})
    with pytest.raises(CheckpointError, match='no checkpoint for step 7'):
        ckpt.restore({'w': jnp.ones(3)}, step=7)
    ckpt.close()


def test_load_params_reads_params_model_alone(tmp_path):
    """A training workdir gives ``params['model']`` of the named (or latest) step as numpy arrays, without
    the optimiser state or the distillation modules; a state without it is refused naming the folder."""
    model = {'head': {'w': jnp.arange(6.0).reshape(2, 3)}, 'bev': jnp.ones(4)}
    state = {'params': {'model': model, 'distill': {'g': jnp.zeros(5)}}, 'opt_state': {'mu': jnp.ones(7)},
             'step': jnp.int32(3)}
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(3, state)
    ckpt.save(4, dict(state, params=dict(state['params'], model={'head': {'w': model['head']['w'] + 1},
                                                                 'bev': model['bev']})))
    ckpt.save(5, {'other': jnp.ones(2)})
    ckpt.close()
    got = load_params(str(tmp_path), step=3)
    assert set(got) == {'head', 'bev'} and isinstance(got['bev'], np.ndarray)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, jax.device_get(model))
    np.testing.assert_array_equal(load_params(str(tmp_path), step=4)['head']['w'], np.asarray(model['head']['w']) + 1)
    with pytest.raises(CheckpointError, match=r'checkpoints/5/state holds no params.model'):
        load_params(str(tmp_path))
    with pytest.raises(CheckpointError, match=r'no checkpoint for step 9 .*\[3, 4, 5\]'):
        load_params(str(tmp_path), step=9)


def test_a_bucket_workdir_stays_a_url(tmp_path, monkeypatch):
    """``gs://b/run`` is never made a local path (``<cwd>/gs:/b/run``): the checkpoint folder, its steps and the
    errors of ``Checkpointer`` and ``load_params`` name the URL. Arrays are not written to the fake bucket (orbax
    writes them with tensorstore's own GCS driver, not through epath): a local checkpoint is copied into it."""
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer(str(tmp_path / 'local'), async_save=False)
    ckpt.save(1, {'w': jnp.ones(3)})
    ckpt.save(2, {'w': jnp.ones(3)})
    ckpt.close()
    shutil.copytree(tmp_path / 'local', tmp_path / 'bucket' / 'b' / 'run')
    with fake_gcs(tmp_path / 'bucket'):
        ckpt = Checkpointer('gs://b/run')
        assert str(ckpt.directory) == 'gs://b/run/checkpoints'
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
        with pytest.raises(CheckpointError, match=r'no checkpoint for step 7 in gs://b/run/checkpoints \(have \[1, 2\]\)'):
            ckpt.restore({'w': jnp.ones(3)}, step=7)
        ckpt.close()
        new = Checkpointer('gs://b/new')
        assert new.latest_step() is None
        new.close()
        with pytest.raises(CheckpointError, match=r'no checkpoint for step 9 in gs://b/run/checkpoints'):
            load_params('gs://b/run', step=9)
        with pytest.raises(CheckpointError, match=r'no checkpoint in gs://b/none \(neither gs://b/none/checkpoints'):
            load_params('gs://b/none')
    assert os.path.isdir(tmp_path / 'bucket' / 'b' / 'new' / 'checkpoints')
    assert not os.path.exists(tmp_path / 'gs:')
