"""Workdirs, checkpoint, params and expert folders as ``etils.epath.Path``: local folders and URLs
(``gs://bucket/run``, or any other scheme epath reads) alike.

A local path is made absolute, as ``os.path.abspath`` did before; a URL is kept as it is (``abspath`` would turn
``gs://b/run`` into ``<cwd>/gs:/b/run``). epath reads ``gs://`` through TensorFlow's ``tf.io.gfile`` when
TensorFlow is installed, else through fsspec (the ``gcsfs`` package). Dataroots and images stay local. Imports
no other module of the package: every layer may use it."""
import contextlib
import os
import tempfile

from etils import epath


def is_url(path):
    """Whether ``path`` (str or Path) names a non-local location (has a scheme, ``gs://``)."""
    return '://' in os.fspath(path)


def as_path(path):
    """``path`` (str or Path) as an ``epath.Path``: a URL as it is, a local path made absolute."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(text))


def append_text(path, text):
    """Appends ``text`` to the file ``path`` (created when missing). A local file is opened in append mode; a
    URL's object is read and written whole, since object stores cannot append (gcsfs's ``'a'`` mode overwrites
    the object)."""
    path = as_path(path)
    if not is_url(path):
        with path.open('a') as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ''
    path.write_text(old + text)


def copy_tree(src, dst):
    """Copies every file under the local folder ``src`` to the same relative path under ``dst`` (a local path or
    a URL); empty folders are not copied (object stores have none)."""
    dst = as_path(dst)
    for root, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), src)
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(root, name), 'rb') as f:
                target.write_bytes(f.read())


@contextlib.contextmanager
def local_folder(path):
    """A local folder (str) for a tool that writes only local files (the devkit's ``DetectionEval``): ``path``
    itself when it is local; for a URL a temporary folder, whose files are copied to ``path`` when the block
    ends without an error, then removed."""
    if not is_url(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix='fd3d_jax_') as tmp:
        yield tmp
        copy_tree(tmp, path)


@contextlib.contextmanager
def local_file(path):
    """A local path (str) holding the file ``path``: ``path`` itself when it is local; for a URL a temporary copy,
    removed when the block ends (for tools that read only local files)."""
    if not is_url(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix='fd3d_jax_') as tmp:
        local = os.path.join(tmp, as_path(path).name)
        with open(local, 'wb') as f:
            f.write(as_path(path).read_bytes())
        yield local
