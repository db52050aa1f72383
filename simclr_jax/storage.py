"""Every file a run reads or writes, on a local disk or in a bucket.

A path is a string: a local path or a URL (``gs://bucket/run``, or any
scheme etils ``epath`` serves). On a pod every worker has its own disk, so
the workdir, checkpoints and exports must be able to live in a bucket; all
file I/O on run files goes through here (Orbax takes the same paths and uses
epath itself). With TensorFlow installed, epath reaches buckets through
``tf.io.gfile``; with ``EPATH_USE_TF=false`` through fsspec (gcsfs), which
honours ``STORAGE_EMULATOR_HOST``: that is how the tests run against a GCS
server on loopback.

Object stores have no append and no rename of folders: ``Appender`` rewrites
the whole object when it flushes (what TensorFlow's GCS writer does), and a
single-object write is already all-or-nothing there, so ``write_text`` only
goes through a temporary file on local disks.
"""
import os
import re
import tempfile
from typing import Union

from etils import epath

from simclr_jax.errors import StorageError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str) -> str:
    """``path`` made absolute if local (``~`` expanded); a URL unchanged."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(path: str, *names: str) -> str:
    return "/".join([os.fspath(path).rstrip("/"), *names]) if is_url(path) else os.path.join(path, *names)


def check_writable_dir(path: str) -> None:
    """Raises StorageError unless ``path`` is, or can become, a folder this
    process can write; creates nothing. A bucket is only asked whether the
    path exists (its write permission shows at the first write)."""
    if is_url(path):
        try:
            epath.Path(path).exists()
        except Exception as e:  # noqa: BLE001 (TensorFlow's and fsspec's errors share no type)
            reason = " ".join(str(e).split())[:240]
            raise StorageError(f"cannot reach {path} ({type(e).__name__}: {reason}); "
                               "check the bucket name, the credentials (gcloud auth application-default login) "
                               "and the network") from None
        return
    path = resolve(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise StorageError(f"{path} is a file, not a folder: choose another --workdir")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise StorageError(f"cannot create {path}: {existing} is a file; choose another --workdir")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise StorageError(f"cannot write to {path}: {e.strerror or e} in {existing}; choose a --workdir you can "
                           "write to") from None


def parent(path: str) -> str:
    return str(epath.Path(resolve(path)).parent)


def name(path: str) -> str:
    return epath.Path(resolve(path)).name


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
    """The names in folder ``path``, sorted."""
    return sorted(child.name for child in epath.Path(path).iterdir())


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: str) -> None:
    """Deletes file ``path`` if it exists."""
    epath.Path(path).unlink(missing_ok=True)


def rmtree(path: str) -> None:
    epath.Path(path).rmtree(missing_ok=True)


def read_text(path: str) -> str:
    return epath.Path(path).read_text(encoding="utf-8")


def read_bytes(path: str) -> bytes:
    return epath.Path(path).read_bytes()


def write_bytes(path: str, data: Union[bytes, str]) -> None:
    """Writes ``data`` at ``path`` (its folder created), replacing any file
    there at once: a reader sees the old content or the new, never a part."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        target.write_bytes(data)
        return
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    partial.write_bytes(data)
    partial.replace(target)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text)


def copy_tree(source: str, target: str, last: tuple[str, ...] = ()) -> None:
    """Copies local folder ``source`` into ``target`` (a local path or URL),
    the files named in ``last`` (relative paths) after every other one, so a
    reader that checks for them never sees a partial copy."""
    files = sorted(os.path.relpath(os.path.join(folder, name), source)
                   for folder, _, names in os.walk(source) for name in names)
    for relative in sorted(files, key=lambda f: f in last):
        destination = epath.Path(join(target, *relative.split(os.sep)))
        destination.parent.mkdir(parents=True, exist_ok=True)
        epath.Path(source, relative).copy(destination, overwrite=True)


class Appender:
    """A text or binary file that grows: local files are appended to; an
    object in a bucket is rewritten whole from memory on each ``flush`` (fine
    for logs of a few MB: metrics.jsonl, TensorBoard scalars)."""

    def __init__(self, path: str, binary: bool = False):
        self.path, self._binary = path, binary
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._remote = is_url(path)
        if self._remote:
            self._content = bytearray(read_bytes(path) if exists(path) else b"")
        else:
            self._file = open(path, "ab" if binary else "a", encoding=None if binary else "utf-8")

    def write(self, data: Union[bytes, str]) -> None:
        if self._remote:
            self._content += data if self._binary else data.encode("utf-8")
        else:
            self._file.write(data)

    def flush(self) -> None:
        if self._remote:
            epath.Path(self.path).write_bytes(bytes(self._content))
        else:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if not self._remote:
            self._file.close()
