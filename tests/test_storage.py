"""Paths of workdirs and params folders: URLs stay URLs, local paths become absolute, and the helpers that write to
a bucket (append, a local folder copied up, a local copy of a file) work on a ``gs://`` bucket that cannot append
(``tests/fake_gcs.py``)."""
import os

import pytest
from etils import epath

from fd3d_jax import storage
from tests.fake_gcs import fake_gcs


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.as_path('gs://b/run')) == 'gs://b/run'
    assert str(storage.as_path('gs://b/run') / 'checkpoints') == 'gs://b/run/checkpoints'
    assert str(storage.as_path(epath.Path('gs://b/run'))) == 'gs://b/run'
    assert str(storage.as_path('run/../run2')) == str(tmp_path / 'run2')
    assert storage.is_url('gs://b') and not storage.is_url(tmp_path)


def test_append_copy_up_and_local_copy_on_a_bucket(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / 'bucket'
    with fake_gcs(bucket):
        for url in ('gs://b/run/log.txt', str(tmp_path / 'local' / 'log.txt')):
            storage.as_path(url).parent.mkdir(parents=True, exist_ok=True)
            for line in 'abc':
                storage.append_text(url, line + '\n')
            assert storage.as_path(url).read_text() == 'a\nb\nc\n'
        with storage.local_folder('gs://b/run/eval') as out:
            assert not storage.is_url(out) and os.path.isdir(out)
            os.makedirs(os.path.join(out, 'plots'))
            for name in ('metrics_summary.json', 'plots/pr.txt'):
                with open(os.path.join(out, name), 'w') as f:
                    f.write(name)
        assert storage.as_path('gs://b/run/eval/plots/pr.txt').read_text() == 'plots/pr.txt'
        assert not os.path.exists(out)
        with pytest.raises(ValueError, match='devkit'):
            with storage.local_folder('gs://b/failed') as out:
                open(os.path.join(out, 'half.json'), 'w').close()
                raise ValueError('devkit')
        assert not storage.as_path('gs://b/failed').exists()   # a failed evaluation leaves nothing behind
        with storage.local_file('gs://b/run/eval/metrics_summary.json') as local:
            assert not storage.is_url(local) and open(local).read() == 'metrics_summary.json'
        with storage.local_folder(tmp_path / 'here') as out, storage.local_file(tmp_path / 'x.json') as local:
            assert out == str(tmp_path / 'here') and local == str(tmp_path / 'x.json')   # local paths as given
    assert sorted(os.listdir(bucket / 'b' / 'run')) == ['eval', 'log.txt']
    assert not os.path.exists(tmp_path / 'gs:')   # nothing took the URL for a local path
