"""``train.profile``: a device trace of a few training steps."""
import jax


class Profile:
    """``train.profile = N`` > 0: a device trace (``jax.profiler``) of the N steps after step ``first`` (the run's
    first step compiles; it is left out) written to ``folder`` for TensorBoard's profile plugin (a URL workdir
    needs what the profiler needs to write there, e.g. TensorFlow's file system). Process 0 only."""

    def __init__(self, folder, first, num_steps, log):
        self.folder, self.start, self.stop, self.log = str(folder), first, first + num_steps, log
        self.active = False
        self.enabled = num_steps > 0 and jax.process_index() == 0

    def before(self, step):
        """Called before dispatching the step that ends at count ``step + 1``."""
        if self.enabled and step == self.start and not self.active:
            jax.profiler.start_trace(self.folder)
            self.active = True

    def after(self, step, metrics):
        if self.active and step + 1 == self.stop:
            jax.block_until_ready(metrics)
            self.close()
            self.log(f'profile of steps {self.start + 1}-{self.stop} written to {self.folder}')

    def close(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
