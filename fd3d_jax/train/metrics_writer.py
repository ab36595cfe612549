"""Scalar metrics to ``W/metrics.jsonl`` (one JSON object per line with ``step``) and to
TensorBoard event files under ``W/tensorboard`` (written with tensorboard's own event writer; no
TensorFlow needed). Only process 0 writes.

``W`` may be a URL (``gs://bucket/run``, ``fd3d_jax.storage``): ``metrics.jsonl`` is then rewritten whole at
each write (object stores cannot append). TensorBoard files go to a URL only with TensorFlow installed
(``tf.io.gfile``): without it tensorboard's event writer goes through fsspec, whose GCS files cannot be
appended to (each flush would replace the event file), so a URL workdir gets ``metrics.jsonl`` alone and one
logged warning."""
import importlib.util
import json
import time

import jax
import numpy as np
from absl import logging
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from fd3d_jax import storage


def tensorboard_writes_urls():
    """Whether tensorboard's event writer can append to files at a URL: with TensorFlow installed (its
    ``tf.io.gfile``)."""
    return importlib.util.find_spec('tensorflow') is not None


class MetricsWriter:
    def __init__(self, workdir, name='metrics.jsonl', tensorboard=True):
        self.enabled = jax.process_index() == 0
        workdir = storage.as_path(workdir)
        self.path = workdir / name   # an epath.Path
        self._tb = None
        if self.enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            if tensorboard and storage.is_url(workdir) and not tensorboard_writes_urls():
                logging.warning('TensorBoard summaries are not written to %s: tensorboard appends to files at a URL '
                                'only with TensorFlow installed (metrics.jsonl holds every scalar)', workdir)
            elif tensorboard:
                self._tb = EventFileWriter(str(workdir / 'tensorboard'))

    def write(self, step, scalars):
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        storage.append_text(self.path, json.dumps(dict(step=int(step), **scalars)) + '\n')
        if self._tb is not None:
            values = [Summary.Value(tag=k, simple_value=v) for k, v in scalars.items() if np.isfinite(v)]
            self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(path):
    """The lines of a ``metrics.jsonl`` (a local path or a URL) as dicts; a last line without its newline (a
    write cut short by a kill, or one still being written) is left out."""
    with storage.as_path(path).open() as f:
        return [json.loads(line) for line in f if line.endswith('\n') and line.strip()]
