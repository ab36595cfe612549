"""Scalar metrics to ``W/metrics.jsonl`` (one JSON object per line with ``step``) and to
TensorBoard event files under ``W/tensorboard`` (written with tensorboard's own event writer; no
TensorFlow needed). Only process 0 writes."""
import json
import os
import time

import jax
import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricsWriter:
    def __init__(self, workdir, name='metrics.jsonl', tensorboard=True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, name)
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                self._tb = EventFileWriter(os.path.join(workdir, 'tensorboard'))

    def write(self, step, scalars):
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        with open(self.path, 'a') as f:
            f.write(json.dumps(dict(step=int(step), **scalars)) + '\n')
        if self._tb is not None:
            values = [Summary.Value(tag=k, simple_value=v) for k, v in scalars.items() if np.isfinite(v)]
            self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(path):
    """The lines of a ``metrics.jsonl`` as dicts; a last line without its newline (a write cut short by a kill,
    or one still being written) is left out."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith('\n') and line.strip()]
