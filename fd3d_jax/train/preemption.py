"""SIGTERM and Ctrl-C during training: save at the next step boundary and stop (``Preemption``)."""
import multiprocessing
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """SIGTERM or Ctrl-C (SIGINT) -> save a checkpoint at the next step boundary and stop. Outside the training
    loop (``training`` False: before it, or in the final evaluation once the last checkpoint is saved) Ctrl-C
    raises ``KeyboardInterrupt``, which the command line turns into one line.

    A second Ctrl-C stops at once without saving (the line names the last checkpoint). Python runs signal
    handlers only between bytecodes of the main thread, so a handler would wait for a compilation or a blocking
    device call (minutes at full size); instead the interpreter's C-level handler writes each signal number to a
    pipe (``signal.set_wakeup_fd``) that a thread reads, and that thread ends the process with ``os._exit``:
    nothing waits for the step, compilation or save in flight (a half-written save is never taken for a
    checkpoint: orbax finalises a step's folder only once complete).

    One process: Python signal handlers. Several: JAX's preemption notifier (``jax.distributed`` installs it for
    SIGTERM), so that all processes agree on the step (``multihost_utils.reached_preemption_sync_point``); Ctrl-C
    is passed on to it as a SIGTERM of this process."""

    def __init__(self):
        self.requested, self.reason, self.training, self.saved = False, None, False, None
        self._old, self._wakeup = {}, None
        if threading.current_thread() is not threading.main_thread():
            return
        if jax.process_count() == 1:
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._wakeup = (read_fd, write_fd, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False))
        threading.Thread(target=self._count_interrupts, args=(read_fd,), daemon=True,
                         name='second-ctrl-c').start()

    def _count_interrupts(self, read_fd):
        count = 0
        with open(read_fd, 'rb', buffering=0) as pipe:   # closed when ``close`` closes the writing end
            while received := pipe.read(64):
                count += received.count(int(signal.SIGINT))
                if count < 2:
                    continue
                kept = f'the last checkpoint is {self.saved}' if self.saved else 'no checkpoint was saved'
                os.write(2, f'error: second Ctrl-C: stopped at once without saving; {kept}\n'.encode())
                for worker in multiprocessing.active_children():   # input workers ignore Ctrl-C
                    worker.kill()
                os._exit(130)

    def _handle(self, signum, frame):
        self.requested, self.reason = True, self.reason or signal.Signals(signum).name

    def _interrupt(self, signum, frame):
        if not self.training:
            raise KeyboardInterrupt
        if self.requested:
            return   # the second Ctrl-C: the wakeup thread ends the process
        self.reason = 'Ctrl-C'
        if jax.process_count() > 1:
            signal.raise_signal(signal.SIGTERM)   # JAX's notifier: every process stops at the same step
            self.requested = True
        else:
            self._handle(signum, frame)

    def reached(self, step):
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old = {}
        if self._wakeup is not None:
            read_fd, write_fd, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write_fd)   # the thread reads end-of-file and returns
            self._wakeup = None
