"""Paths on any filesystem TensorFlow knows: local, `gs://`, `s3://`, `file://`.

Datasets, weights, run directories, results and pictures may live on object
stores, as they do for TPU and cloud GPU jobs (the TF Model Garden reads and
writes everything through `tf.io.gfile`). Checkpoints, summaries and
SavedModels reach them through TensorFlow itself; the Python-side reads and
writes go through here. A local path (no `scheme://`) keeps Python's own
file objects, so local runs read images exactly as before; any other path
goes through `tf.io.gfile` (`gs://` is built in, `s3://` and `hdfs://` need
TensorFlow I/O's plugin; the tests use `file://` URLs, local files that only
`tf.io.gfile` opens).
"""

import errno
import io
import json
import os

import tensorflow as tf

# What reading a missing or unreadable file raises: Python's errors for
# local paths, TensorFlow's (NotFoundError, PermissionDeniedError, ...) for
# the others.
READ_ERRORS = (OSError, tf.errors.OpError)


def is_local(path):
    """Whether `path` (str or PathLike) names a local file: no `scheme://`."""
    return "://" not in os.fspath(path)


def open_file(path, mode="r"):
    """A file object for `path` in `mode` ('r', 'rb', 'w', 'wb').

    Local paths open with `open` (text as UTF-8), others with
    `tf.io.gfile.GFile`. Use it in a `with` statement.
    """
    path = os.fspath(path)
    if is_local(path):
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    return tf.io.gfile.GFile(path, mode)


def _read(path, mode):
    try:
        with open_file(path, mode) as f:
            return f.read()
    except tf.errors.NotFoundError:
        # TensorFlow's messages may not name the file (ram:// gives none).
        raise FileNotFoundError(errno.ENOENT, "No such file", os.fspath(path)) from None
    except tf.errors.OpError as e:
        raise OSError(f"{os.fspath(path)}: {e.message or type(e).__name__}") from None


def read_bytes(path):
    """The whole file as bytes; OSError (FileNotFoundError) naming it on failure."""
    return _read(path, "rb")


def for_reader(path):
    """`path` itself if local, else the file's bytes in an `io.BytesIO`: what
    to give libraries that open only local paths but read file objects too
    (PIL, h5py, NumPy)."""
    return path if is_local(path) else io.BytesIO(read_bytes(path))


def read_json(path):
    """`json.load` of a UTF-8 file; OSError or ValueError on failure."""
    return json.loads(_read(path, "r"))


def makedirs(path):
    """Creates directory `path` and its parents (nothing if it exists)."""
    path = os.fspath(path)
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        tf.io.gfile.makedirs(path)


def make_parent(path):
    """Creates the directory that will hold file `path`."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        makedirs(parent)


class FileChecker:
    """`isfile(path)` for many files, one request per directory on object stores.

    Checking COCO train2017's 118k images one by one costs a second locally
    but one round trip each on `gs://`; there each directory is listed once
    and its names kept.
    """

    def __init__(self):
        self._listed = {}   # directory -> set of its file names

    def isfile(self, path):
        path = os.fspath(path)
        if is_local(path):
            return os.path.isfile(path)
        directory, name = path.rsplit("/", 1)
        if directory not in self._listed:
            try:
                # Sub-directories come back as "name/"; they are not files.
                self._listed[directory] = set(tf.io.gfile.listdir(directory))
            except tf.errors.NotFoundError:
                self._listed[directory] = set()
        return name in self._listed[directory]
