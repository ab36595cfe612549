"""A ``gs://`` bucket kept in a local folder, for tests of URL workdirs without a network: epath's backend for
the ``gs`` scheme is replaced by one that maps ``gs://B/K`` to ``ROOT/B/K``. Like GCS (and gcsfs, whose ``'a'``
mode overwrites), an object cannot be appended to: opening one in append mode raises. Every other path is
untouched, so code that turns the URL into a local path (``os.path.abspath('gs://b')``) writes outside ``ROOT``
and is caught by reading back through the URL. Tensorstore (orbax's array writer) does not go through epath:
array data cannot be saved under the fake bucket, folders and JSON files can."""
import contextlib
import io
import os
from unittest import mock

import types

from etils.epath import backend, gpath
from orbax.checkpoint._src.path import gcs_utils

PREFIX = 'gs://'


class FakeGcsBackend(backend._OsPathBackend):   # pylint: disable=protected-access
    def __init__(self, root):
        self.root = os.fspath(root)

    def _local(self, path):
        text = os.fspath(path)
        assert text.startswith(PREFIX), text
        return os.path.join(self.root, text[len(PREFIX):])

    def _url(self, local):
        return PREFIX + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        if 'a' in mode:
            raise io.UnsupportedOperation(f'{path}: a GCS object cannot be appended to')
        return super().open(self._local(path), mode)

    def exists(self, path):
        return super().exists(self._local(path))

    def isdir(self, path):
        return super().isdir(self._local(path))

    def listdir(self, path):
        return super().listdir(self._local(path))

    def glob(self, path):
        return [self._url(p) for p in super().glob(self._local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self._local(top), top_down=top_down, on_error=on_error):
            yield self._url(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self._local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self._local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(self._local(path))

    def remove(self, path):
        return super().remove(self._local(path))

    def rename(self, path, dst):
        return super().rename(self._local(path), self._local(dst))

    def replace(self, path, dst):
        return super().replace(self._local(path), self._local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self._local(path), self._local(dst), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self._local(path))


@contextlib.contextmanager
def fake_gcs(root):
    """Within the block, ``gs://...`` paths of ``etils.epath`` live under the local folder ``root``; orbax's
    question to GCS about a bucket's layout is answered "flat" (no hierarchical namespace)."""
    os.makedirs(root, exist_ok=True)
    flat = types.SimpleNamespace(hierarchical_namespace_enabled=False)
    with mock.patch.dict(gpath._PREFIX_TO_BACKEND, {'gs': FakeGcsBackend(root)}), \
            mock.patch.object(gcs_utils, 'get_bucket', lambda name: flat):   # pylint: disable=protected-access
        yield
