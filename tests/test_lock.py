"""One run per workdir (simclr_jax/lock.py): a live run's lock refuses a
second run at once, naming it; a dead run's lock does not block a resume."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from simclr_jax import lock


def test_a_held_workdir_refuses_a_second_run_and_is_free_after(tmp_path):
    workdir = str(tmp_path / "run")
    with lock.hold(workdir):
        holder = json.loads((tmp_path / "run" / lock.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(lock.WorkdirInUse, match=rf"run is in use by a run on {socket.gethostname()} "
                                                    rf"\(pid {os.getpid()}, started .*last seen 0 s ago\)"):
            with lock.hold(workdir):
                pass
        (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert os.listdir(workdir) == ["metrics.jsonl"]  # released: the lock file is gone
    with lock.hold(workdir):
        pass


def test_a_run_that_writes_nothing_leaves_no_folder(tmp_path):
    with lock.hold(str(tmp_path / "new")):
        pass
    assert not (tmp_path / "new").exists()


def test_a_dead_runs_lock_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x", "started": time.time(),
             "heartbeat": time.time()}  # fresh heartbeat, but the process is gone
    (workdir / lock.LOCK_FILE).write_text(json.dumps(stale))
    with lock.hold(str(workdir)):
        assert json.loads((workdir / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    elsewhere = dict(stale, host="another-host", pid=1, heartbeat=time.time() - lock.STALE_S - 1)  # silent too long
    (workdir / lock.LOCK_FILE).write_text(json.dumps(elsewhere))
    with lock.hold(str(workdir)):
        pass
    (workdir / lock.LOCK_FILE).write_text(json.dumps(dict(elsewhere, heartbeat=time.time())))  # alive elsewhere
    with pytest.raises(lock.WorkdirInUse, match="another-host"):
        with lock.hold(str(workdir)):
            pass


def test_a_file_or_unwritable_workdir_is_one_message(tmp_path):
    from simclr_jax.errors import StorageError

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        with lock.hold(str(tmp_path / "file")):
            pass
    with pytest.raises(StorageError, match="cannot write to /proc/simclr"):
        with lock.hold("/proc/simclr"):
            pass


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    with lock.hold(str(tmp_path)):
        first = json.loads((tmp_path / lock.LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["heartbeat"] > first
