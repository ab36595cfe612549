"""Multi-host start and faults: ``jax.distributed`` joined with checked flags and timeouts, and a watch that ends a
process with one ``error:`` line when a peer never connects or is lost mid-run (``initialize_distributed``).
One process: nothing here runs."""
import atexit
import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import jax
from jax._src import distributed as jax_distributed   # the runtime client: live processes, key-value store, barriers

from fd3d_jax.errors import DistributedError

# How long a process waits for its peers: for all of them to connect at the start, for all to finish at the end
# (``--distributed_timeout``). JAX's own default for both; it covers hosts of a pod slice or a SLURM job that
# start minutes apart, and process 0's final devkit evaluation, which the others wait for at exit.
DISTRIBUTED_TIMEOUT = 300
# Seconds without a heartbeat after which the coordinator counts a process as lost
# (``--distributed_heartbeat_timeout``): JAX's default. Heartbeats come from a runtime thread, so compilations
# and long steps do not delay them.
HEARTBEAT_TIMEOUT = 100
WATCH_INTERVAL = 1.0     # seconds between two looks at the live processes
_EXIT_KEY = 'fd3d_jax/exit/'


def check_distributed_flags(coordinator_address=None, num_processes=None, process_id=None, auto=False,
                            timeout=DISTRIBUTED_TIMEOUT, heartbeat_timeout=HEARTBEAT_TIMEOUT):
    """Raises ``DistributedError`` naming the flags when the multi-host settings cannot work: a timeout that is
    not a positive number of seconds, ``--num_processes`` < 1, ``--process_id`` outside 0..N-1, an address that
    is not ``HOST:PORT``, or (without ``--distributed``) some of ``--coordinator_address``, ``--num_processes``,
    ``--process_id`` given but not all three. Returns whether the run has several processes to join."""
    for flag, value in (('--distributed_timeout', timeout), ('--distributed_heartbeat_timeout', heartbeat_timeout)):
        if value is None or value <= 0:
            raise DistributedError(f'{flag}={value}: must be a positive number of seconds')
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f'--num_processes={num_processes}: must be at least 1')
    if process_id is not None and process_id < 0:
        raise DistributedError(f'--process_id={process_id}: must be 0 or more')
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise DistributedError(f'--process_id={process_id} with --num_processes={num_processes}: the process ids '
                               f'are 0 to {num_processes - 1}')
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(':')
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f'--coordinator_address={coordinator_address!r}: must be HOST:PORT (process '
                                   f"0's host and a free port, e.g. host0:1234)")
    given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
             '--process_id': process_id}
    named = [f'{flag}={value}' for flag, value in given.items() if value is not None]
    missing = [flag for flag, value in given.items() if value is None]
    if named and missing and not auto:
        raise DistributedError(f"{' '.join(named)} without {' and '.join(missing)}: a multi-host run needs all three "
                               f"(the same --coordinator_address and --num_processes on every host, --process_id 0 "
                               f"to N-1), or --distributed to take them from the cluster environment")
    return auto or bool(named)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, auto=False,
                           timeout=DISTRIBUTED_TIMEOUT, heartbeat_timeout=HEARTBEAT_TIMEOUT):
    """``jax.distributed.initialize`` when running on several hosts: with explicit arguments, or with ``auto``
    from the cluster's environment (TPU pod slices, SLURM, Open MPI: JAX discovers the coordinator, process
    count and id; explicit ones win). No-op otherwise (one process). Settings that cannot work raise
    ``DistributedError`` (``check_distributed_flags``).

    Faults end the process with one ``error:`` line and status 1 instead of a hang or an abort:

    - peers that do not all connect within ``timeout`` seconds: the line names this process, the coordinator's
      address and who is missing (process 0 hosts the coordinator; another process tells a coordinator it
      cannot reach from one that waits for other processes);
    - a process lost mid-run (no heartbeat for ``heartbeat_timeout`` seconds: killed, crashed, host gone) or one
      that exited while the others still run: every other process names it. Checkpoints are never lost: a save
      cut short is not taken for a checkpoint (orbax), as after a SIGKILL.

    How, on jax 0.10.2: JAX's runtime ends a process whose peer is lost, or whose connection times out, with a
    C++ ``LOG(FATAL)`` (an abort and a stack trace); its ``missed_heartbeat_callback`` cannot be given a Python
    function (the runtime's ``absl::Status`` argument has no Python conversion, so the call fails with
    ``std::bad_cast``). So this turns on ``jax_enable_recoverability`` (a lost process is not propagated as a
    fatal error to the others), ends the wait for the connection with its own timer (JAX's own timeout is set
    later), and a thread reads the coordinator's live processes (``get_live_nodes``, JAX's heartbeats) every
    ``WATCH_INTERVAL`` seconds. The line is written by that thread and the process ends with ``os._exit(1)``: the
    main thread may be waiting in a collective that never returns, or fail in it first (``Peers``). Recoverable
    mode also drops JAX's barrier at shutdown, so an exit hook waits (``timeout``) for every process to reach its
    exit before process 0, which hosts the coordinator, goes. Not covered: a lost coordinator (process 0): the
    others' runtime aborts at once from C++ (its error polling, not reachable from Python), after its ``F...``
    line. Returns the ``Peers`` watch (None on one process)."""
    if not check_distributed_flags(coordinator_address, num_processes, process_id, auto, timeout, heartbeat_timeout):
        return None
    if process_id == 0 and coordinator_address is not None:
        _check_port_free(coordinator_address, num_processes)
    jax.config.update('jax_enable_recoverability', True)
    stderr = _QuietStderr(QUIET_LINES)
    connected = threading.Event()
    threading.Thread(target=_connect_timer,
                     args=(connected, stderr, timeout, coordinator_address, num_processes, process_id),
                     daemon=True, name='distributed-connect-timeout').start()
    try:
        with stderr:
            jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                       initialization_timeout=int(timeout) + 60,   # after ours: JAX's own aborts
                                       heartbeat_timeout_seconds=int(heartbeat_timeout))
    except ValueError as e:   # JAX's own checks: with --distributed, what the cluster environment did not give
        raise DistributedError(f'--distributed: {e} The cluster environment (TPU pod slice, SLURM, Open MPI) did not '
                               f'give it; elsewhere pass --coordinator_address, --num_processes and '
                               f'--process_id') from None
    except jax.errors.JaxRuntimeError as e:   # process 0: the coordinator could not start (its port is taken)
        state = jax_distributed.global_state
        address = state.coordinator_address
        who = f'process {state.process_id}' + (f' of {num_processes}' if num_processes else '')
        if state.service is None and state.process_id == 0:
            raise _port_in_use_error(who, address, e) from None
        raise DistributedError(f'{who}: jax.distributed could not start with the coordinator {address}: {e}') from None
    finally:
        connected.set()
    state = jax_distributed.global_state
    peers = Peers(state.client, state.coordinator_address, state.process_id, state.num_processes, timeout,
                  heartbeat_timeout)
    peers.start()
    global _PEERS
    _PEERS = peers
    return peers


_PEERS = None   # this process's watch, once ``initialize_distributed`` joined a multi-host run


def finished():
    """Marks this process's part of the run as done (training ended, or stopped at a saved checkpoint): its exit
    is then not a lost peer for the others. Process 0's final devkit evaluation may outlast the others' wait at
    the exit barrier (``--distributed_timeout``); without this mark, their leaving would end it. No-op on one
    process."""
    if _PEERS is not None:
        _PEERS.finished()


# Lines of JAX's runtime (C++, to stderr) that ``initialize_distributed`` holds back: the warning of a coordinator
# in recoverable mode (not a fault; its advice, a barrier at exit, is what ``Peers.leave`` does) and gRPC's line
# for a port in use (the error line says it).
QUIET_LINES = ('Using experimental recoverable task feature', 'Failed to add port to server')


class _QuietStderr:
    """Within ``with``: file descriptor 2 (C++ logs included) goes through a filter process that passes every line
    on to the real stderr as it comes but those holding one of ``drop``. ``restore`` (at the end of the block, or
    earlier from another thread) puts stderr back once the filter has written everything. A process, not a thread:
    if the runtime aborts this one meanwhile, the filter still passes on its last lines."""

    FILTER = ('import sys\n'
              'for line in sys.stdin.buffer:\n'
              '    if not any(text.encode() in line for text in sys.argv[1:]):\n'
              '        sys.stderr.buffer.write(line); sys.stderr.buffer.flush()\n')

    def __init__(self, drop):
        self.drop, self._lock, self._saved, self._filter = drop, threading.Lock(), None, None

    def __enter__(self):
        sys.stderr.flush()
        self._filter = subprocess.Popen([sys.executable, '-S', '-c', self.FILTER, *self.drop], stdin=subprocess.PIPE)
        self._saved = os.dup(2)
        os.dup2(self._filter.stdin.fileno(), 2)
        return self

    def __exit__(self, *exc):
        self.restore()

    def restore(self):
        with self._lock:
            if self._saved is None:
                return
            sys.stderr.flush()
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None
            self._filter.stdin.close()   # the last writing end: the filter reads to the end and exits
            self._filter.wait()


def _fail(line):
    """Ends the process at once with ``error: <line>`` and status 1, from any thread (the main thread may be
    inside a runtime call that never returns). Input worker processes are stopped first."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os.write(2, f'error: {line}\n'.encode())
    for worker in multiprocessing.active_children():
        worker.kill()
    os._exit(1)


def _port_in_use_error(who, address, cause):
    return DistributedError(f'{who}: could not start the coordinator {address} ({cause}): port '
                            f'{address.rpartition(":")[2]} of this host is taken; choose another in '
                            f'--coordinator_address')


def _check_port_free(address, num_processes):
    """Process 0 binds the coordinator's port on every address (as JAX's coordinator will, ``[::]:PORT``) and lets
    it go: a port in use raises ``DistributedError`` here, since JAX's runtime, failing to start its server on it,
    sometimes ends the process with a segmentation fault instead of its exception."""
    port = int(address.rpartition(':')[2])
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:   # no IPv6 on this host
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(('', port))
        except OSError as e:
            raise _port_in_use_error(f'process 0 of {num_processes}', address, e.strerror or e) from None


def _reachable(address, seconds=2.0):
    host, _, port = address.rpartition(':')
    try:
        with socket.create_connection((host.strip('[]'), int(port)), timeout=seconds):
            return True
    except OSError:
        return False


def _process_list(ids):
    ids = list(ids)
    if len(ids) == 1:
        return f'process {ids[0]}'
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f'processes {ids[0]}-{ids[-1]}'
    return 'processes ' + ', '.join(map(str, ids))


def connect_timeout_message(address, process_id, num_processes, timeout, coordinator_up):
    """The line of a process whose peers did not all connect within ``timeout`` seconds. ``coordinator_up``:
    whether the coordinator's address answers from this host."""
    if address is None or process_id is None or num_processes is None:
        return (f'--distributed: the cluster environment gave no coordinator within {timeout:g} s; raise '
                f'--distributed_timeout, or pass --coordinator_address, --num_processes and --process_id')
    who = f'process {process_id} of {num_processes}'
    others = [p for p in range(num_processes) if p != process_id]
    hint = 'start the same command on every host (each with its own --process_id), or raise --distributed_timeout'
    if process_id == 0 and not coordinator_up:
        return (f'{who}: the coordinator runs on this host but {address} does not reach it (checked after '
                f'{timeout:g} s); --coordinator_address must name process 0\'s host and a port open to the others')
    if process_id == 0:
        missing = _process_list(others) if len(others) == 1 else f'one or more of {_process_list(others)}'
        return (f'{who}: peers did not connect to the coordinator {address} within {timeout:g} s '
                f'(missing: {missing}); {hint}')
    if not coordinator_up:
        return (f'{who}: could not reach the coordinator {address} within {timeout:g} s (missing: process 0, which '
                f'runs it); start the same command with --process_id=0 on that host, check the address and port, '
                f'or raise --distributed_timeout')
    rest = [p for p in others if p != 0]
    missing = f'one or more of {_process_list(rest)}' if rest else 'another program may hold that port'
    return (f'{who}: the coordinator {address} answers but not all {num_processes} processes connected within '
            f'{timeout:g} s (missing: {missing}); {hint}')


def _connect_timer(connected, stderr, timeout, address, num_processes, process_id):
    if connected.wait(timeout):
        return
    stderr.restore()
    state = jax_distributed.global_state   # with --distributed, what the cluster environment gave so far
    address = state.coordinator_address or address
    process_id = process_id if process_id is not None else (state.process_id if state.coordinator_address else None)
    num_processes = num_processes or (state.num_processes if state.coordinator_address else None)
    coordinator_up = address is not None and _reachable(address)
    if not connected.is_set():
        _fail(connect_timeout_message(address, process_id, num_processes, timeout, coordinator_up))


class Peers:
    """The other processes of a connected multi-host run, watched by a thread (``start``) until all of them are at
    their exit. A process missing from the coordinator's live processes (no heartbeat for ``heartbeat_timeout``
    seconds), or back under a new incarnation (restarted), ends this one with a line naming it (``_fail``).

    A collective whose peer is gone may also fail in the main thread (Gloo on CPU: ``Connection reset by peer``):
    such a ``JaxRuntimeError`` left uncaught waits (``sys.excepthook``) up to the heartbeat timeout for the watch
    to name the lost process, and is printed as usual if none is lost.

    At exit (``atexit``, before JAX's own shutdown) each process marks its exit in the coordinator's key-value
    store (``exit``) and waits up to ``timeout`` seconds at a barrier for the others, still watched: a process lost
    meanwhile ends the wait with its line. Past the barrier it marks ``done`` (a process gone after that is not
    lost); process 0, which hosts the coordinator, then waits for the others to disconnect, so that none loses
    its coordinator while it still talks to it."""

    def __init__(self, client, address, process_id, num_processes, timeout, heartbeat_timeout):
        self.client, self.address = client, address
        self.process_id, self.num_processes = process_id, num_processes
        self.timeout, self.heartbeat_timeout = timeout, heartbeat_timeout
        self.ids = list(range(num_processes))
        self._stop, self._leaving, self._finished = threading.Event(), False, False

    def start(self):
        self.incarnations = self.client.get_live_nodes(self.ids)
        atexit.register(self.leave)
        self._previous_excepthook, sys.excepthook = sys.excepthook, self._uncaught
        threading.Thread(target=self._watch, daemon=True, name='distributed-peers').start()

    def _watch(self):
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                live = self.client.get_live_nodes(self.ids)
            except jax.errors.JaxRuntimeError:
                if not self._stop.is_set():
                    _fail(self.lost_message(None))
                return
            lost = [p for p in self.ids if p != self.process_id and live.get(p) != self.incarnations.get(p)]
            lost = [p for p in lost if self._mark(p) != 'done']
            if lost and not self._stop.is_set():
                self._lost(lost)

    def _uncaught(self, kind, value, traceback):
        if issubclass(kind, jax.errors.JaxRuntimeError) and not self._stop.is_set():
            time.sleep(self.heartbeat_timeout + 5 * WATCH_INTERVAL)   # a lost process: the watch ends this one
        self._previous_excepthook(kind, value, traceback)

    def _set_mark(self, mark):
        self.client.key_value_set(f'{_EXIT_KEY}{self.process_id}', mark, allow_overwrite=True)

    def _mark(self, process):
        """What ``process`` marked on its way out: None, ``exit`` (at its exit barrier), ``done`` (past it) or
        ``lost`` (it lost a process)."""
        try:
            return self.client.key_value_try_get(f'{_EXIT_KEY}{process}')
        except jax.errors.JaxRuntimeError:
            return None

    def lost_message(self, lost, exited=()):
        """The line for the processes ``lost`` (those in ``exited`` left through their exit hook); ``lost`` None:
        the coordinator stopped answering."""
        who = f'process {self.process_id} of {self.num_processes}'
        kept = 'stopped; the checkpoints saved so far are kept: start the same command on every host to resume'
        if lost is None:
            return f'{who}: lost the coordinator {self.address} (process 0); {kept}'
        died = [p for p in lost if p not in exited]
        parts = []
        if died:
            parts.append(f'lost {_process_list(died)} (no heartbeat for {self.heartbeat_timeout:g} s: killed, '
                         f'crashed or its host unreachable)')
        if len(died) < len(lost):
            left = [p for p in lost if p in exited]
            parts.append(f'{_process_list(left)} exited while this one still ran (its output says why; if it '
                         f"waited for process 0's final evaluation, raise --distributed_timeout)")
        return f"{who}: {'; '.join(parts)}; {kept}"

    def _lost(self, lost):
        line = self.lost_message(lost, [p for p in lost if self._mark(p) == 'exit'])
        try:
            self._set_mark('lost')
        except jax.errors.JaxRuntimeError:
            pass
        if self.process_id == 0:   # hosts the coordinator: the others see the same loss, let them go first
            self._wait_for_marks(5 * WATCH_INTERVAL)
        _fail(line)

    def _wait_for_marks(self, seconds):
        """Waits up to ``seconds`` until every other live process has marked its way out."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                live = self.client.get_live_nodes(self.ids)
            except jax.errors.JaxRuntimeError:
                return
            if all(p == self.process_id or self._mark(p) for p in live):
                return
            time.sleep(0.1)

    def finished(self):
        """``done`` before the exit barrier (``finished()``): a run that ended well, whose exit is not a loss."""
        self._finished = True
        with contextlib.suppress(jax.errors.JaxRuntimeError):
            self._set_mark('done')

    def leave(self):
        """The exit hook: mark this exit, wait at the exit barrier (still watching), stop watching, and (process 0)
        wait for the others to disconnect."""
        if self._leaving:
            return
        self._leaving = True
        try:
            if not self._finished:
                self._set_mark('exit')
            self.client.wait_at_barrier('fd3d_jax/exit', int(self.timeout * 1000))
            self._set_mark('done')
        except jax.errors.JaxRuntimeError:   # a process did not come in time: this one exits anyway
            self._stop.set()
            return
        self._stop.set()
        if self.process_id == 0:
            deadline = time.time() + 10 * WATCH_INTERVAL
            while time.time() < deadline:
                try:
                    if set(self.client.get_live_nodes(self.ids)) <= {0}:
                        return
                except jax.errors.JaxRuntimeError:
                    return
                time.sleep(0.1)
