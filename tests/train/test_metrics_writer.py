"""``metrics.jsonl`` and TensorBoard files in a local workdir and in a ``gs://`` one (``tests/fake_gcs.py``: a
bucket whose objects cannot be appended to)."""
import os

import pytest

from fd3d_jax.train import metrics_writer
from fd3d_jax.train.metrics_writer import MetricsWriter, read_metrics
from tests.fake_gcs import fake_gcs


@pytest.mark.parametrize('where', ['local', 'bucket'])
def test_metrics_are_written_and_read_back(where, tmp_path, monkeypatch):
    """Every line is kept (a bucket's file is rewritten whole, never appended to); a URL workdir without TensorFlow
    gets no TensorBoard files and one warning instead of an error."""
    monkeypatch.chdir(tmp_path)
    warnings = []
    monkeypatch.setattr(metrics_writer.logging, 'warning', lambda *a: warnings.append(a[0] % a[1:]))
    monkeypatch.setattr(metrics_writer, 'tensorboard_writes_urls', lambda: False)
    workdir = 'run' if where == 'local' else 'gs://b/run'
    with fake_gcs(tmp_path / 'bucket'):
        writer = MetricsWriter(workdir)
        for step in (1, 2, 3):
            writer.write(step, {'loss': 1.0 / step})
        writer.close()
        assert [m['step'] for m in read_metrics(f'{workdir}/metrics.jsonl')] == [1, 2, 3]
        assert read_metrics(writer.path)[2]['loss'] == pytest.approx(1 / 3)
    local = tmp_path / ('run' if where == 'local' else 'bucket/b/run')
    assert os.path.isfile(local / 'metrics.jsonl')
    if where == 'local':
        assert os.listdir(local / 'tensorboard') and not warnings
    else:
        assert not os.path.exists(local / 'tensorboard') and not os.path.exists(tmp_path / 'gs:')
        assert len(warnings) == 1 and 'gs://b/run' in warnings[0] and 'TensorFlow' in warnings[0]
