"""One run per workdir: a lock file that the live run keeps fresh.

Two runs in one workdir interleave their metrics and overwrite each other's
checkpoints. ``hold(workdir)`` takes ``workdir/.lock`` (host, pid, start and a
heartbeat rewritten every HEARTBEAT_S) for the run's lifetime and removes it
at the end. A second run finds a fresh lock and stops at once, naming the
holder. A lock whose heartbeat is older than STALE_S, or whose process on
this host is gone, was left by a dead run (SIGKILL, a lost VM): it is taken
over with a warning, so a resume is never blocked. In a multi-process run,
process 0 holds the one lock and tells the others whether it got it.
"""
import contextlib
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging

from simclr_jax import storage
from simclr_jax.errors import StorageError

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0  # four missed heartbeats


class WorkdirInUse(StorageError):
    """Another live run holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str):
    """The workdir's lock for the duration of the block (see the module docstring)."""
    storage.check_writable_dir(workdir)
    workdir = storage.resolve(workdir)
    path, created = storage.join(workdir, LOCK_FILE), not storage.exists(workdir)
    refusal = _acquire(path) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        held = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is None)))
        if not held and refusal is None:
            refusal = WorkdirInUse(f"{workdir} is in use by another run: see process 0's message")
    if refusal is not None:
        raise refusal
    stop = threading.Event()
    beat = None
    if jax.process_index() == 0:
        beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True, name="workdir-lock")
        beat.start()
    try:
        yield
    finally:
        if beat is not None:
            stop.set()
            beat.join()
            _release(path)
            if created and not storage.is_url(workdir) and not storage.listdir(workdir):
                os.rmdir(workdir)  # a run that wrote nothing leaves nothing


_TOKEN = uuid.uuid4().hex  # this process's claim


def _record(started: float) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": _TOKEN, "started": started,
                       "heartbeat": time.time()})


def _acquire(path: str):
    """None when this process now holds ``path``, else the WorkdirInUse to raise."""
    holder = _read(path)
    if holder is not None:
        if _alive(holder):
            age = time.time() - holder.get("heartbeat", 0)
            return WorkdirInUse(
                f"{storage.parent(path)} is in use by a run on {holder.get('host')} (pid {holder.get('pid')}, "
                f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}, last "
                f"seen {age:.0f} s ago): wait for it to finish or stop it, or choose another --workdir. (A lock "
                f"left by a run that died expires {STALE_S:.0f} s after its last heartbeat; {path})")
        logging.warning("Taking over %s, left by a run that is gone (%s, pid %s).", path, holder.get("host"),
                        holder.get("pid"))
        storage.remove(path)
    if not _create(path, _record(time.time())):
        return _acquire(path)  # another run created it first: describe that one
    return None


def _create(path: str, text: str) -> bool:
    """Writes ``path`` unless it exists; False if another process got there first."""
    if not storage.is_url(path):
        storage.makedirs(storage.parent(path))
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    # Object stores: no exclusive create through epath; write, then check the claim stuck.
    storage.write_text(path, text)
    time.sleep(1.0)
    holder = _read(path)
    return holder is not None and holder.get("token") == _TOKEN


def _read(path: str):
    try:
        return json.loads(storage.read_text(path)) if storage.exists(path) else None
    except (OSError, ValueError):
        return {}  # half-written or unreadable: treated as a dead run's


def _alive(holder: dict) -> bool:
    if time.time() - holder.get("heartbeat", 0) > STALE_S:
        return False
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def _heartbeat(path: str, stop: threading.Event) -> None:
    started = (_read(path) or {}).get("started", time.time())
    while not stop.wait(HEARTBEAT_S):
        try:
            storage.write_text(path, _record(started))
        except OSError as e:  # a full disk or a flaky bucket must not kill the run
            logging.warning("Could not refresh %s: %s", path, e)


def _release(path: str) -> None:
    holder = _read(path)
    if holder and holder.get("token") == _TOKEN:
        storage.remove(path)
