"""A corrupt checkpoint (files overwritten, truncated or missing) is told apart from a checkpoint of another model:
``restore`` names the corrupt step, ``restore_latest`` resumes from the newest intact one and sets the corrupt one
aside (``<step>.corrupt``), and training on the workdir goes on past that step."""
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import detr3d_r50
from fd3d_jax import params_io
from fd3d_jax.errors import CheckpointError
from fd3d_jax.train import loop
from fd3d_jax.train.checkpoint import Checkpointer
from tests.test_cli import ROOT, _run
from tests.train.test_loop import _free_port


def _state(value):
    return {'params': {'w': jnp.full((6,), value, jnp.float32)}, 'opt': {'mu': jnp.ones((3, 4))},
            'step': jnp.int32(value)}


def _write(workdir, steps=(3, 6), keep=3):
    ckpt = Checkpointer(str(workdir), keep=keep)
    for step in steps:
        ckpt.save(step, _state(step), {'next_index': step})
    ckpt.close()
    return workdir / 'checkpoints'


def _files(folder):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


def _overwrite_all(folder):
    for path in _files(folder):
        with open(path, 'wb') as f:
            f.write(b'garbage')


def _empty_arrays(folder):
    for path in _files(os.path.join(folder, 'state', 'd')):
        open(path, 'wb').close()


def _empty_array_metadatas(folder):
    for path in _files(os.path.join(folder, 'state', 'array_metadatas')):
        open(path, 'wb').close()


def _remove_tree_metadata(folder):
    os.remove(os.path.join(folder, 'state', '_METADATA'))


def _overwrite_data_state(folder):
    with open(os.path.join(folder, 'data', 'metadata'), 'w') as f:
        f.write('{"next_ind')


# how the step is damaged, and what the message says could not be read
FAULTS = {
    'every file overwritten': (_overwrite_all, r'its state metadata cannot be read: JSONDecodeError: '),
    'array files emptied': (_empty_arrays, r'its state metadata cannot be read: ValueError: OUT_OF_RANGE: Error '
                                           r'reading Byte range .* of local file ".*/6/state/d/\w+"'),
    'tree metadata missing': (_remove_tree_metadata, r'its state metadata cannot be read: FileNotFoundError: '),
    'data state truncated': (_overwrite_data_state, r'its data iterator state cannot be read: JSONDecodeError: '),
}


@pytest.mark.parametrize('fault', FAULTS)
def test_a_corrupt_step_is_named_and_the_newest_intact_one_resumed(fault, tmp_path):
    checkpoints = _write(tmp_path)
    damage, why = FAULTS[fault]
    damage(checkpoints / '6')
    ckpt = Checkpointer(str(tmp_path), keep=2)
    with pytest.raises(CheckpointError) as caught:
        ckpt.restore(_state(0), 6)
    message = str(caught.value)
    assert re.match(f'checkpoint {re.escape(str(checkpoints / "6"))} is corrupt or unreadable \\({why}', message), \
        message
    assert 'does not match' not in message and message.endswith('the other steps are [3]')

    damaged = {path: open(path, 'rb').read() for path in _files(checkpoints / '6')}
    state, data_state, step, note = ckpt.restore_latest(_state(0))
    assert step == 3 and data_state == {'next_index': 3} and int(state['step']) == 3
    np.testing.assert_array_equal(state['params']['w'], np.full(6, 3.0))
    assert re.fullmatch(f'checkpoint {re.escape(str(checkpoints / "6"))} is corrupt or unreadable \\({why}.*\\); '
                        f'resumed from {re.escape(str(checkpoints / "3"))}, the newest intact checkpoint; the corrupt '
                        f'checkpoint moved to {re.escape(str(checkpoints / "6.corrupt"))} \\(.*delete.*\\)', note), note
    # set aside as it was (not deleted): out of the steps orbax lists, saves and deletes
    assert ckpt.all_steps() == [3]
    assert {os.path.relpath(p, checkpoints / '6.corrupt'): open(p, 'rb').read()
            for p in _files(checkpoints / '6.corrupt')} == {os.path.relpath(p, checkpoints / '6'): content
                                                             for p, content in damaged.items()}
    for again in (4, 5, 6):   # training reaches step 6 again: saved, and orbax's keep=2 leaves the corrupt one
        ckpt.save(again, _state(again), {'next_index': again})
    ckpt.close()
    assert sorted(os.listdir(checkpoints)) == ['5', '6', '6.corrupt']
    assert Checkpointer(str(tmp_path)).restore(_state(0))[1] == {'next_index': 6}


def test_a_checkpoint_of_another_model_stays_a_config_mismatch(tmp_path):
    """Intact steps whose tree differs from the state: the config error naming the leaves, no fallback to an older
    step, nothing moved."""
    checkpoints = _write(tmp_path)
    other = dict(_state(0), params={'w': jnp.zeros((7,)), 'b': jnp.zeros(2)})
    ckpt = Checkpointer(str(tmp_path))
    for restoring in (lambda: ckpt.restore(other), lambda: ckpt.restore_latest(other)):
        with pytest.raises(CheckpointError) as caught:
            restoring()
        assert str(caught.value) == (f"checkpoint {checkpoints / '6'} does not match this config's model/optimiser "
                                     'state: missing: params/b; shape: params/w: checkpoint (6,), this config (7,)')
    ckpt.close()
    assert sorted(os.listdir(checkpoints)) == ['3', '6']


def test_no_intact_step_names_each_and_how_to_start_over(tmp_path):
    checkpoints = _write(tmp_path)
    _overwrite_all(checkpoints / '6')
    _empty_arrays(checkpoints / '3')
    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError) as caught:
        ckpt.restore_latest(_state(0))
    message = str(caught.value)
    assert message.startswith(f'no intact checkpoint to resume from in {checkpoints}, every step is corrupt or '
                              f'unreadable ({checkpoints / "6"}: its state metadata cannot be read: ')
    assert f'; {checkpoints / "3"}: its state metadata cannot be read: ValueError: OUT_OF_RANGE' in message
    assert message.endswith(f'to start over, delete {checkpoints} or train in another --workdir')
    assert '\n' not in message and sorted(os.listdir(checkpoints)) == ['3', '6']
    state, data_state, step, note = Checkpointer(str(tmp_path / 'new')).restore_latest(_state(7))
    assert (data_state, step, note) == (None, None, None) and int(state['step']) == 7


def test_the_reads_abandoned_in_a_corrupt_step_print_nothing(tmp_path):
    """orbax reads a step's arrays concurrently: when one read fails, the others are abandoned, and Python would
    print each of their exceptions, from other threads and after the step's error, as 'Exception ignored ...' or a
    bare traceback. Steps written by this process, read by another (as when a run resumes)."""
    for name, damage in (('arrays', _empty_arrays), ('array_metadatas', _empty_array_metadatas)):
        damage(_write(tmp_path / name) / '6')
    script = ('import gc, sys, time\n'
              'from tests.train.test_checkpoint_faults import _state\n'
              'from fd3d_jax.errors import CheckpointError\n'
              'from fd3d_jax.train.checkpoint import Checkpointer\n'
              f'for name in ("arrays", "array_metadatas"):\n'
              f'    ckpt = Checkpointer({str(tmp_path)!r} + "/" + name)\n'
              '    try:\n'
              '        ckpt.restore(_state(0), 6)\n'
              '    except CheckpointError:\n'
              '        print("corrupt")\n'
              '    print(ckpt.restore_latest(_state(0))[2])\n'
              'time.sleep(1)\n'
              'gc.collect()\n')
    res = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ['corrupt', '3'] * 2, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr and 'Exception ignored' not in res.stderr, res.stderr[-3000:]


TWO_PROCESSES = """
import os, sys
process, address, workdir, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
import jax
import numpy as np
jax.distributed.initialize(address, 2, process)
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from fd3d_jax.train import checkpoint

mesh = Mesh(np.array(jax.devices()), ('d',))


def array(value, shape, spec):
    data = np.full(shape, value, np.float32)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda index: data[index])


def state(value):
    return {'w': array(value, (6,), PartitionSpec()), 'sharded': array(value, (4, 3), PartitionSpec('d'))}


ckpt = checkpoint.Checkpointer(workdir)
for step in (3, 6):
    ckpt.save(step, state(step), {'next_index': step})
ckpt.close()
multihost_utils.sync_global_devices('saved')
if mode == 'every file' and process == 0:
    for root, _, names in os.walk(os.path.join(workdir, 'checkpoints', '6')):
        for name in names:
            open(os.path.join(root, name), 'wb').write(b'garbage')
if mode == 'one process' and process == 1:   # a read error that the other process does not see
    read = checkpoint.Checkpointer._read
    checkpoint.Checkpointer._read = lambda self, abstract, step, data: (
        (checkpoint.CORRUPT, 'simulated') if step == 6 else read(self, abstract, step, data))
multihost_utils.sync_global_devices('damaged')
ckpt = checkpoint.Checkpointer(workdir)
restored, data_state, step, note = ckpt.restore_latest(state(0))
ckpt.save(7, restored, {'next_index': 7})
ckpt.close()
print(step, data_state['next_index'], float(restored['sharded'].addressable_data(0)[0, 0]), note)
"""


@pytest.mark.slow
@pytest.mark.scaleout
@pytest.mark.parametrize('mode', ['every file', 'one process'])
def test_two_processes_resume_from_the_same_step(mode, tmp_path):
    """2 processes (``jax.distributed`` on loopback, one CPU device each, a sharded array) on one workdir: a step
    corrupt for both, or one that only process 1 cannot read, and both resume from step 3, set step 6 aside once
    and save together again."""
    address, workdir = f'localhost:{_free_port()}', str(tmp_path / 'run')
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
    procs = [subprocess.Popen([sys.executable, '-c', TWO_PROCESSES, str(p), address, workdir, mode], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        assert re.search(r'^3 3 3\.0 checkpoint \S+/checkpoints/6 is corrupt or unreadable \(', output, re.M), \
            output[-3000:]
    if mode == 'one process':
        assert '/checkpoints/6 is corrupt or unreadable (another process could not read it)' in outputs[0]
    assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['3', '6.corrupt', '7']


@pytest.mark.slow
@pytest.mark.scaleout   # a reliability test of the CLI: `make test` runs it after the default suite
def test_training_resumes_from_the_newest_intact_checkpoint(data_cfg, train_records, tmp_path):
    """Steps 3 and 6 of the toy detector's state, every file of step 6 overwritten: training says so, resumes from
    step 3, trains to step 6 again and saves it; the corrupt one stays, set aside as checkpoints/6.corrupt."""
    config = detr3d_r50.get_config('toy')
    config.data = data_cfg.copy_and_resolve_references()
    state = loop.Trainer(config, len(train_records['samples'])).state
    workdir = tmp_path / 'run'
    ckpt = Checkpointer(str(workdir))
    for step in (3, 6):
        ckpt.save(step, state.replace(step=jnp.int32(step)), {'next_index': step})
    ckpt.close()
    checkpoints = workdir / 'checkpoints'
    _overwrite_all(checkpoints / '6')
    res = _run('fd3d_jax.train', f'--workdir={workdir}', f'--config.data.dataroot={data_cfg.dataroot}',
               f'--config.data.records_dir={data_cfg.records_dir}', '--config.train.num_steps=6',
               '--config.train.checkpoint_every=3')
    assert res.returncode == 0 and 'Traceback' not in res.stderr, res.stderr[-3000:]
    output = res.stdout + res.stderr
    assert f'checkpoint {checkpoints / "6"} is corrupt or unreadable (its state metadata cannot be read: ' in output
    assert f'resumed from {checkpoints / "3"}, the newest intact checkpoint' in output, output[-3000:]
    assert sorted(os.listdir(checkpoints)) == ['3', '6', '6.corrupt']
    assert {open(path, 'rb').read() for path in _files(checkpoints / '6.corrupt')} == {b'garbage'}


@pytest.mark.parametrize('fault', ['every file overwritten', 'array files emptied'])
def test_evaluation_names_a_corrupt_step(fault, tmp_path):
    """``fd3d_jax.eval --step N`` reads the detector's params alone (``params_io.load_params``): a corrupt step is
    one ``CheckpointError`` naming it, the intact one still loads."""
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for step in (3, 6):
        ckpt.save(step, {'params': {'model': {'w': jnp.full((6,), step, jnp.float32)}}, 'step': jnp.int32(step)}, None)
    ckpt.close()
    FAULTS[fault][0](tmp_path / 'checkpoints' / '6')
    with pytest.raises(CheckpointError, match=f'checkpoint {re.escape(str(tmp_path / "checkpoints" / "6"))} is '
                                              f'corrupt or unreadable \\(its (state metadata|arrays) cannot be read: '):
        params_io.load_params(str(tmp_path), 6)
    np.testing.assert_array_equal(params_io.load_params(str(tmp_path), 3)['w'], np.full(6, 3.0))
