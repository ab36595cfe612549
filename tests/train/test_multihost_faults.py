"""Multi-host faults of ``python -m fd3d_jax.train``: settings that cannot work, peers that never connect, a peer
killed mid-run. Each ends with one ``error:`` line and status 1 (``fd3d_jax/train/distributed.py``), never a hang, a
traceback or an abort. Two CPU processes on loopback, as in ``tests/train/test_loop.py``; the killed-peer run is
marked ``scaleout`` (it trains). The peer watch's two other paths (a collective failing in the main thread, the
exit barrier) run against a stand-in for JAX's runtime client."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax.distributed as jax_distributed
import pytest

from fd3d_jax.errors import DistributedError
from fd3d_jax.train import distributed
from fd3d_jax.train.checkpoint import Checkpointer
from fd3d_jax.train.metrics_writer import read_metrics
from tests.train.test_loop import ROOT, _cli, _common, _free_port

# JAX discovers a cluster from these (jax/_src/clusters): a test of a machine without one must not inherit them
CLUSTER_VARIABLES = ('SLURM_', 'OMPI_', 'JAX_COORDINATOR', 'KUBERNETES_SERVICE_HOST', 'TPU_', 'MEGASCALE_')
# a Python traceback, or JAX's runtime ending the process from C++ (absl LOG(FATAL): 'F1207 16:39:50.880 ...')
ABORTS = re.compile(r'Traceback|Check failure|Terminating process|^F\d{4} ', re.MULTILINE)


@pytest.mark.parametrize('flags, message', [
    (dict(coordinator_address='localhost:1234', num_processes=2),
     '--coordinator_address=localhost:1234 --num_processes=2 without --process_id: a multi-host run needs all three'),
    (dict(num_processes=2, process_id=0), '--num_processes=2 --process_id=0 without --coordinator_address'),
    (dict(coordinator_address='localhost:1234', num_processes=2, process_id=2),
     '--process_id=2 with --num_processes=2: the process ids are 0 to 1'),
    (dict(coordinator_address='localhost:1234', num_processes=0, process_id=0),
     '--num_processes=0: must be at least 1'),
    (dict(coordinator_address='localhost:1234', num_processes=2, process_id=-1), '--process_id=-1: must be 0 or more'),
    (dict(coordinator_address='localhost', num_processes=2, process_id=0),
     "--coordinator_address='localhost': must be HOST:PORT"),
    (dict(coordinator_address='host:99999', num_processes=2, process_id=0), "--coordinator_address='host:99999'"),
    (dict(timeout=0), '--distributed_timeout=0: must be a positive number of seconds'),
    (dict(heartbeat_timeout=-5), '--distributed_heartbeat_timeout=-5: must be a positive number of seconds'),
])
def test_settings_that_cannot_work_name_the_flags(flags, message):
    with pytest.raises(DistributedError) as error:
        distributed.check_distributed_flags(**flags)
    assert message in str(error.value)


def test_complete_settings_pass_and_say_whether_to_join():
    assert not distributed.check_distributed_flags()   # one process
    assert distributed.check_distributed_flags('host0:1234', 4, 3)
    assert distributed.check_distributed_flags('[::1]:1234', 1, 0)
    assert distributed.check_distributed_flags(auto=True)
    assert distributed.check_distributed_flags(num_processes=4, auto=True)   # the rest from the cluster environment


def test_a_taken_coordinator_port_is_named_before_jax_starts():
    """JAX's runtime, failing to start its server on a taken port, sometimes ends with a segmentation fault."""
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DistributedError, match=f'process 0 of 2: could not start the coordinator localhost:{port} '
                                                   f'.*port {port} of this host is taken; choose another'):
            distributed.initialize_distributed(f'localhost:{port}', 2, 0)
    assert not jax_distributed.is_initialized()


def test_the_lines_name_the_address_the_process_and_who_is_missing():
    line = distributed.connect_timeout_message('h:1', 0, 2, 10, coordinator_up=True)
    assert line.startswith('process 0 of 2: peers did not connect to the coordinator h:1 within 10 s '
                           '(missing: process 1)') and '--distributed_timeout' in line
    assert '(missing: one or more of processes 1-3)' in distributed.connect_timeout_message('h:1', 0, 4, 10, True)
    assert distributed.connect_timeout_message('h:1', 0, 2, 10, coordinator_up=False).startswith(
        'process 0 of 2: the coordinator runs on this host but h:1 does not reach it')
    line = distributed.connect_timeout_message('h:1', 2, 4, 10, coordinator_up=False)
    assert line.startswith('process 2 of 4: could not reach the coordinator h:1 within 10 s (missing: process 0')
    line = distributed.connect_timeout_message('h:1', 2, 4, 10, coordinator_up=True)
    assert '(missing: one or more of processes 1, 3)' in line
    peers = distributed.Peers(None, 'h:1', 0, 3, 300, 100)
    line = peers.lost_message([1, 2], exited=[2])
    assert line.startswith('process 0 of 3: lost process 1 (no heartbeat for 100 s: killed, crashed or its host '
                           'unreachable); process 2 exited while this one still ran')
    assert 'checkpoints saved so far are kept' in line
    assert distributed.Peers(None, 'h:1', 1, 2, 300, 100).lost_message(None).startswith(
        'process 1 of 2: lost the coordinator h:1 (process 0)')


# A process of a 2-process run whose peer is lost while its main thread fails in a collective (as Gloo does on a
# reset connection): a stand-in for JAX's runtime client reports process 1 live for the first 3 looks only.
LOST_IN_A_COLLECTIVE = """
import jax
from fd3d_jax.train import distributed

class Client:
    looks, marks = 0, {}
    def get_live_nodes(self, ids):
        self.looks += 1
        return {0: 7, 1: 8} if self.looks <= 3 else {0: 7}
    def key_value_try_get(self, key):
        if key not in self.marks:
            raise jax.errors.JaxRuntimeError('NOT_FOUND')
        return self.marks[key]
    def key_value_set(self, key, value, allow_overwrite=False):
        self.marks[key] = value
    def wait_at_barrier(self, barrier, timeout_ms):
        pass

distributed.Peers(Client(), 'h:1', 0, 2, 300, 2).start()
"""
FAILING_COLLECTIVE = "raise jax.errors.JaxRuntimeError('UNKNOWN: Gloo all-reduce failed: Connection reset by peer')"
# ... or while it waits at its exit barrier (which would last the --distributed_timeout, here 300 s)
AT_THE_EXIT_BARRIER = """
import time
Client.wait_at_barrier = lambda self, barrier, timeout_ms: time.sleep(timeout_ms / 1000)
"""
LOST_LINE = ('error: process 0 of 2: lost process 1 (no heartbeat for 2 s: killed, crashed or its host unreachable); '
             'stopped; the checkpoints saved so far are kept: start the same command on every host to resume')


@pytest.mark.parametrize('then', ['collective', 'exit'])
def test_a_peer_lost_during_a_failing_collective_or_the_exit_barrier_ends_with_the_watch_line(then):
    """The main thread's error from the collective waits for the watch, and the exit barrier goes on being watched:
    the lost process is named in one line, status 1, no traceback, no wait of the exit barrier's 300 s."""
    if then == 'collective':
        script = LOST_IN_A_COLLECTIVE + FAILING_COLLECTIVE
    else:
        script = LOST_IN_A_COLLECTIVE.replace('distributed.Peers(', AT_THE_EXIT_BARRIER + 'distributed.Peers(')
    start = time.time()
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _one_error_line(proc.stdout + proc.stderr) == LOST_LINE
    assert time.time() - start < 60


def _run(args, devices=2, env=None):
    """The CLI started (its process and start time): ``_result`` waits for it."""
    env = dict(env or os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    start = time.time()
    proc = subprocess.Popen([sys.executable, '-m', 'fd3d_jax.train', *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, start


def _result(proc, start, timeout):
    """(status, output, seconds since the start)."""
    out = proc.communicate(timeout=timeout)[0]
    return proc.returncode, out, time.time() - start


def _one_error_line(out):
    """The output's last line, after checking that it is its only error line and nothing aborted."""
    assert not ABORTS.search(out), out[-3000:]
    lines = out.strip().splitlines()
    assert [line for line in lines if line.startswith('error:')] == lines[-1:], out[-3000:]
    return lines[-1]


def test_distributed_without_a_cluster_and_incomplete_flags_end_with_one_line(tmp_path):
    """``--distributed`` on a machine without a cluster environment, and a missing ``--process_id``: one line
    naming the flags, status 1, before anything is written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARIABLES)}
    config = ['--config=configs/detr3d_r50.py:toy', f'--workdir={tmp_path / "w"}']
    runs = [_run([*config, '--distributed'], env=env),
            _run([*config, '--coordinator_address=localhost:1234', '--num_processes=2'])]
    (auto_status, auto_out, _), (flags_status, flags_out, _) = [_result(*run, timeout=120) for run in runs]
    assert auto_status == flags_status == 1
    assert _one_error_line(auto_out).startswith('error: --distributed: coordinator_address should be defined. The '
                                                'cluster environment (TPU pod slice, SLURM, Open MPI) did not give it')
    assert _one_error_line(flags_out).startswith('error: --coordinator_address=localhost:1234 --num_processes=2 '
                                                 'without --process_id')
    assert not (tmp_path / 'w').exists()


@pytest.mark.slow
@pytest.mark.scaleout   # a reliability test of the CLI: `make test` runs it after the default suite
def test_a_process_whose_peers_never_start_ends_within_the_timeout(tmp_path):
    """Process 0 alone (its peer never started) and process 1 alone (no coordinator): each prints one line naming
    the address, its id and who is missing after ``--distributed_timeout`` (10 s), status 1."""
    timeout = 10
    config = ['--config=configs/detr3d_r50.py:toy', f'--distributed_timeout={timeout}', '--num_processes=2']
    addresses = [f'localhost:{_free_port()}' for _ in range(2)]
    runs = [_run([*config, f'--workdir={tmp_path / str(p)}', f'--coordinator_address={addresses[p]}',
                  f'--process_id={p}']) for p in range(2)]
    (status0, out0, seconds0), (status1, out1, seconds1) = [_result(*run, timeout=timeout + 110) for run in runs]
    assert status0 == status1 == 1
    assert _one_error_line(out0) == (
        f'error: process 0 of 2: peers did not connect to the coordinator {addresses[0]} within {timeout} s '
        f'(missing: process 1); start the same command on every host (each with its own --process_id), or raise '
        f'--distributed_timeout')
    assert _one_error_line(out1).startswith(
        f'error: process 1 of 2: could not reach the coordinator {addresses[1]} within {timeout} s '
        f'(missing: process 0, which runs it)')
    assert timeout <= seconds0 < timeout + 60 and timeout <= seconds1 < timeout + 60   # start-up included


@pytest.mark.slow
@pytest.mark.scaleout
def test_a_peer_killed_mid_run_stops_the_other_with_one_line(data_cfg, tmp_path):
    """Process 1 killed (SIGKILL) once a checkpoint is saved: process 0, inside a collective that never returns,
    ends within the heartbeat timeout (10 s) + a margin with one line naming process 1, status 1; the checkpoint
    is still there."""
    heartbeat = 10
    workdir, address = str(tmp_path / 'w'), f'localhost:{_free_port()}'
    common = _common(data_cfg, 100000, batch_size=4, checkpoint_every=2)
    procs = [_cli([*common, f'--workdir={workdir}', f'--coordinator_address={address}', '--num_processes=2',
                   f'--process_id={p}', f'--distributed_heartbeat_timeout={heartbeat}'], devices=2) for p in range(2)]
    try:
        deadline = time.time() + 600
        while Checkpointer(workdir).latest_step() is None:
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[0][-3000:]
            assert time.time() < deadline, 'no checkpoint after 600 s'
            time.sleep(0.2)
        saved = Checkpointer(workdir).latest_step()
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        killed = time.time()
        out = procs[0].communicate(timeout=heartbeat + 120)[0]
        seconds = time.time() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs[0].returncode == 1, out[-3000:]
    assert _one_error_line(out) == (
        f'error: process 0 of 2: lost process 1 (no heartbeat for {heartbeat} s: killed, crashed or its host '
        f'unreachable); stopped; the checkpoints saved so far are kept: start the same command on every host to '
        f'resume')
    assert seconds < heartbeat + 30, seconds
    assert Checkpointer(workdir).latest_step() >= saved
    assert any(m['step'] >= saved for m in read_metrics(os.path.join(workdir, 'metrics.jsonl')))


# Process 1 ended its run well (``distributed.finished``: its mark is ``done``) and left while process 0 still
# evaluates; process 0 finishes too, and its mark stays ``done`` while it waits at its exit barrier.
FINISHED = """
Client.marks['fd3d_jax/exit/1'] = 'done'
Client.wait_at_barrier = lambda self, barrier, timeout_ms: print('at the barrier:', self.marks['fd3d_jax/exit/0'])
distributed.finished()
import time
time.sleep(4)   # the watch looks every second; process 1 is gone after 3 looks
print('evaluated')
"""


def test_a_peer_that_finished_may_leave_while_process_0_evaluates():
    """A run that ended well on process 1 while process 0 runs its final devkit evaluation (longer than the exit
    barrier's wait): process 1's leaving is not a lost peer, and process 0's own exit keeps its ``done`` mark.
    Fails if ``finished`` marks nothing, or if the exit hook overwrites ``done`` with ``exit``."""
    start = "distributed.Peers(Client(), 'h:1', 0, 2, 300, 2).start()"
    script = LOST_IN_A_COLLECTIVE.replace(start, 'distributed._PEERS = ' + start.replace('.start()', '') +
                                          '\ndistributed._PEERS.start()') + FINISHED
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert proc.returncode == 0 and 'error:' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ['evaluated', 'at the barrier: done']


@pytest.mark.slow
@pytest.mark.scaleout
def test_ctrl_c_on_one_process_stops_both_at_the_same_saved_step(data_cfg, tmp_path):
    """Ctrl-C (SIGINT) to process 1 of 2: passed on as its SIGTERM to JAX's preemption notifier, both processes
    stop at the same step, which is saved once; process 1 exits with Ctrl-C's status 130, process 0 with 0, no
    error line, no lost peer."""
    workdir, address = str(tmp_path / 'w'), f'localhost:{_free_port()}'
    common = _common(data_cfg, 100000, batch_size=4, checkpoint_every=100000)
    procs = [_cli([*common, f'--workdir={workdir}', f'--coordinator_address={address}', '--num_processes=2',
                   f'--process_id={p}'], devices=2) for p in range(2)]
    metrics = os.path.join(workdir, 'metrics.jsonl')
    try:
        deadline = time.time() + 600
        while not (os.path.exists(metrics) and any(m['step'] >= 2 for m in read_metrics(metrics))):
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[0][-3000:]
            assert time.time() < deadline, 'no step 2 after 600 s'
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGINT)
        outs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 130], [out[-2000:] for out in outs]
    saved = Checkpointer(workdir).latest_step()
    assert saved is not None and saved >= 2
    assert f'SIGTERM: saved {workdir}/checkpoints/{saved} and stopped' in outs[0], outs[0][-2000:]
    assert f'Ctrl-C: saved {workdir}/checkpoints/{saved} and stopped' in outs[1], outs[1][-2000:]
    for out in outs:
        assert 'error:' not in out and not ABORTS.search(out), out[-3000:]
