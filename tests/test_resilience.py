"""Long runs survive: SIGTERM saves and resumes exactly, SIGKILL never leaves a
checkpoint that resume would trip on, non-finite steps stop or are skipped."""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import finetune as finetune_recipe
from configs import knn as knn_recipe
from simclr_jax import protocols, storage, writers
from simclr_jax.pretraining import train
from simclr_jax.weights import checkpoint
from tests.helpers import pretrain
from tests.helpers import tiny_real_data_config as _tiny_config
from tests.launch import main_args, process_env, start, wait

pytestmark = pytest.mark.slow


def _losses(workdir):
    path = storage.join(workdir, "metrics.jsonl")
    return [(r["step"], r["loss"]) for r in writers.read_jsonl(path) if "loss" in r] if storage.exists(path) else []


def _wait_for_records(workdir, process, count, timeout=300):
    deadline = time.monotonic() + timeout
    while len(_losses(workdir)) < count:
        assert process.poll() is None and time.monotonic() < deadline, "training did not get going"
        time.sleep(0.2)


def _saved_state(workdir, step):
    """A checkpoint's arrays as numpy, read without a target tree."""
    if storage.is_url(workdir):  # gcsfs keeps folder listings: other processes wrote since
        from etils.epath import backend

        backend.fsspec_backend.fs(workdir).invalidate_cache()
    path = storage.join(checkpoint.checkpoint_dir(workdir), str(step), "default")
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def _objects(url):
    """The objects under ``url`` as the GCS server lists them, relative to it."""
    import gcsfs

    names = gcsfs.GCSFileSystem(skip_instance_cache=True).find(url)
    return sorted(name[len(url) - len("gs://") + 1:] for name in names)


def test_a_run_in_a_bucket_survives_sigterm_resumes_exactly_and_evaluates(real_data_dir, gcs_bucket, tmp_path,
                                                                          monkeypatch):
    """The pod workflow, end to end in gs:// (a GCS server on loopback): pretrain,
    SIGTERM, resume, kNN and fine-tune from the bucket, with nothing written to
    the local disk; the resumed run equals an uninterrupted local one bit for bit."""
    steps = 30
    # No periodic checkpoints: the only one mid-run is the one SIGTERM asks for. A
    # memory queue of 4 steps of keys (batch 16): it wraps around before the cut.
    flags = ("--config.checkpoint_every_steps=1000", "--config.knn_monitor=False", "--config.memory.size=128")
    full, cut = str(tmp_path / "uninterrupted"), f"{gcs_bucket}/run"
    logs, cwd = tmp_path / "logs", tmp_path / "cwd"
    logs.mkdir()
    cwd.mkdir()
    launch = dict(num_processes=1, devices_per_process=2, cwd=str(cwd))
    # The uninterrupted run first: the interrupted one then reads its compiled programs
    # from the session's compilation cache.
    wait(start(main_args(full, real_data_dir, steps, *flags), str(tmp_path), **launch), str(tmp_path))

    (process,) = start(main_args(cut, real_data_dir, steps, *flags), str(logs), **launch)
    _wait_for_records(cut, process, 5)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert process.wait(timeout=120) == 0, (logs / "process_0.log").read_text()[-3000:]
    seconds_to_exit = time.monotonic() - sent
    stopped_at = checkpoint.latest_step(cut)
    assert stopped_at is not None and 5 <= stopped_at < steps
    assert seconds_to_exit < 30
    after_stop = _objects(cut)
    assert {"config.json", "metrics.jsonl", "augmentations.png", f"checkpoints/{stopped_at}/commit_success.txt"
            } <= set(after_stop), after_stop
    assert any("tfevents" in name for name in after_stop), after_stop

    wait(start(main_args(cut, real_data_dir, steps, *flags), str(logs), **launch), str(logs))
    full_losses, cut_losses = _losses(full), _losses(cut)
    assert [s for s, _ in cut_losses] == list(range(1, steps + 1))  # each step logged once
    np.testing.assert_array_equal([l for _, l in cut_losses], [l for _, l in full_losses])
    final_full, final_cut = _saved_state(full, steps), _saved_state(cut, steps)
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b), initial=0)),
                                               final_full, final_cut))
    print({"stopped_at": stopped_at, "seconds_to_exit": round(seconds_to_exit, 1),
           "max_abs_param_diff": max(differences)})
    assert max(differences) == 0.0  # bit-identical on CPU, the memory's average network and queue included
    assert int(final_cut["memory"]["count"]) == steps and np.all(final_cut["memory"]["queue"].any(axis=-1))

    # kNN and fine-tuning read the bucket's checkpoint and write into the bucket (here, in
    # this process: main.py's own part, the command line, has run twice above).
    monkeypatch.chdir(cwd)
    data = dict(pretrained=cut, data_dir=real_data_dir, train_split="train[:512]", test_split="test[:256]",
                eval_batch_size=128)
    knn_config, finetune_config = knn_recipe.get_config(), finetune_recipe.get_config()
    knn_config.update(data)
    finetune_config.update(data)
    finetune_config.finetune.update(epochs=1, batch_size=32, label_fraction=0.25)
    finetune_config.profile_steps = 2  # jax.profiler writes locally; the trace is copied into the bucket
    knn = protocols.run(knn_config, f"{cut}/knn")
    finetune = protocols.run(finetune_config, f"{cut}/finetune")
    assert [knn] == json.loads(storage.read_text(f"{cut}/knn/eval_results.json"))
    assert [finetune] == json.loads(storage.read_text(f"{cut}/finetune/eval_results.json"))
    assert knn["checkpoint_step"] == finetune["checkpoint_step"] == steps
    assert 0.0 < knn["top1"] <= 1.0 and finetune["train_steps"] == 4  # 128 labelled images / 32
    evaluations = _objects(cut)
    assert {"knn/embedding_tsne.png", "knn/retrieval.png", "finetune/finetuned/config.json",
            "finetune/finetuned/checkpoints/4/commit_success.txt"} <= set(evaluations), evaluations
    assert any(re.fullmatch(r"finetune/finetune/plugins/profile/[^/]+/[^/]+\.xplane\.pb", name)
               for name in evaluations), evaluations
    assert list(cwd.iterdir()) == []  # nothing written to the local disk (the working directory)


def test_sigkill_while_saving_never_breaks_resume(real_data_dir, tmp_path):
    workdir, logs = str(tmp_path / "run"), str(tmp_path)
    rng = random.Random(0)
    # A checkpoint every step: most moments fall inside an asynchronous save.
    flags = ("--config.checkpoint_every_steps=1", "--config.knn_monitor=False")
    (process,) = start(main_args(workdir, real_data_dir, 10_000, *flags), logs, num_processes=1,
                       devices_per_process=2)
    _wait_for_records(workdir, process, 2)
    # A second run on the live run's workdir stops at once, naming it, and writes nothing.
    before = sorted(os.listdir(workdir)), _losses(workdir)
    second = subprocess.run([sys.executable, *main_args(workdir, real_data_dir, 10_000, *flags)], cwd=str(tmp_path),
                            env=process_env(2), capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and process.poll() is None
    assert f"is in use by a run on {socket.gethostname()} (pid {process.pid}" in second.stderr.splitlines()[-1]
    assert "Traceback" not in second.stderr
    assert sorted(os.listdir(workdir)) == before[0] and _losses(workdir)[:len(before[1])] == before[1]
    time.sleep(rng.uniform(0.0, 1.0))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    manager = checkpoint.create_manager(workdir, save_every_steps=1, max_to_keep=3, read_only=True)
    latest = manager.latest_step()
    manager.close()
    assert latest is not None
    state = _saved_state(workdir, latest)
    assert int(state["step"]) == latest
    # And a real resume from whatever the kill left (the dead run's lock does not block it).
    wait(start(main_args(workdir, real_data_dir, latest + 2, *flags), logs, num_processes=1,
               devices_per_process=2), logs)
    assert _losses(workdir)[-1][0] == latest + 2


def _inject_nan_at(monkeypatch, bad_step):
    """Makes the views of training step ``bad_step`` NaN."""
    device_batches = train._device_batches

    def poisoned(dataset, mesh, prefetch=2):
        for step, batch in enumerate(device_batches(dataset, mesh, prefetch), start=1):
            if step == bad_step:
                batch = dict(batch, views=batch["views"] * np.float32("nan"))
            yield batch

    monkeypatch.setattr(train, "_device_batches", poisoned)


def test_nonfinite_step_stops_with_step_and_last_good_checkpoint(real_data_dir, tmp_path, monkeypatch):
    _inject_nan_at(monkeypatch, 3)
    config = _tiny_config(real_data_dir, num_train_steps=6, knn_monitor=False)
    with pytest.raises(FloatingPointError, match=r"step 3 .*last good checkpoint is step 2"):
        pretrain(config, str(tmp_path))
    manager = checkpoint.create_manager(str(tmp_path), save_every_steps=2, max_to_keep=3, read_only=True)
    assert manager.all_steps() == [2]
    state = _saved_state(str(tmp_path), 2)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


def test_nonfinite_step_is_skipped_when_asked(real_data_dir, tmp_path, monkeypatch):
    _inject_nan_at(monkeypatch, 3)
    config = _tiny_config(real_data_dir, num_train_steps=6, knn_monitor=False, nonfinite_policy="skip")
    state = jax.device_get(pretrain(config, str(tmp_path)))
    assert int(state.step) == 6
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
    records = writers.read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
    losses = {r["step"]: r for r in records if "loss" in r}
    assert np.isnan(losses[3]["loss"]) and losses[3]["skipped_updates"] == 1
    assert all(np.isfinite(losses[s]["loss"]) for s in (1, 2, 4, 5, 6))


class _OutOfMemoryMonitor:
    name = "knn"
    runs = 0

    def run(self, variables):
        type(self).runs += 1
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while scoring the bank")


def test_a_failing_monitor_never_costs_the_checkpoint(real_data_dir, tmp_path):
    """The end-of-run monitor runs after the final save is on disk: its crash
    loses no training, and running the command again does not hit it again."""
    config = _tiny_config(real_data_dir, num_train_steps=4, checkpoint_every_steps=1000)
    failing = lambda config, model, mesh: [_OutOfMemoryMonitor()]
    with pytest.raises(RuntimeError, match="out of memory"):
        train.train_and_evaluate(config, str(tmp_path), make_evaluators=failing)
    assert _OutOfMemoryMonitor.runs == 1
    manager = checkpoint.create_manager(str(tmp_path), save_every_steps=1000, max_to_keep=3, read_only=True)
    assert manager.all_steps() == [4]
    assert int(_saved_state(str(tmp_path), 4)["step"]) == 4
    state = train.train_and_evaluate(config, str(tmp_path), make_evaluators=failing)  # the resume
    assert int(state.step) == 4 and _OutOfMemoryMonitor.runs == 1


def test_periodic_checkpoints_hold_exactly_the_state_of_their_step(real_data_dir, tmp_path, monkeypatch):
    """The step donates its input state; a checkpoint started from that state must
    still hold the step's values, not those of a later step that reused the buffers."""
    after_step = {}
    make_step = train.make_train_step

    def recording(*args, **kwargs):
        step_fn = make_step(*args, **kwargs)

        def step(state, batch):
            state, metrics = step_fn(state, batch)
            after_step[int(state.step)] = jax.device_get(state)
            return state, metrics
        return step

    monkeypatch.setattr(train, "make_train_step", recording)
    # Six steps, as the non-finite tests (the session's compilation cache serves the step):
    # a periodic save at step 4 that steps 5 and 6 overwrite the buffers of, the final one at 6.
    config = _tiny_config(real_data_dir, num_train_steps=6, checkpoint_every_steps=4, knn_monitor=False)
    pretrain(config, str(tmp_path))
    for step in (4, 6):
        saved = _saved_state(str(tmp_path), step)
        want = jax.tree.map(np.asarray, {"step": after_step[step].step, "params": after_step[step].params,
                                         "batch_stats": after_step[step].batch_stats,
                                         "opt_state": after_step[step].opt_state})
        # Restored without a target, Orbax returns the optimiser's named tuples as
        # plain containers: compare the leaves, which keep their order.
        saved_leaves, want_leaves = jax.tree.leaves(saved), jax.tree.leaves(want)
        assert len(saved_leaves) == len(want_leaves)
        for got, expected in zip(saved_leaves, want_leaves):
            np.testing.assert_array_equal(got, expected)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_step[4].params),
                                                         jax.tree.leaves(after_step[6].params)))


def test_a_checkpoint_save_on_the_cpu_compiles_nothing(tmp_path, caplog):
    """On the CPU's simulated devices each array is written whole from one device:
    Orbax's replica-parallel default sliced every replicated array on the devices,
    one compiled program per shape (7.7 s of the smoke recipe's first save)."""
    from simclr_jax import sharding

    tree = {f"layer{i}": np.arange(16 * (i + 1), dtype=np.float32).reshape(16, i + 1) for i in range(6)}
    state = sharding.put_replicated(tree, sharding.make_mesh())
    manager = checkpoint.create_manager(str(tmp_path), save_every_steps=1, max_to_keep=1)
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        checkpoint.save(manager, 1, state, force=True)
        manager.wait_until_finished()
    compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert compiled == []
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(checkpoint.restore(manager, state, 1)), tree)
    manager.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (mounting needs root, as on this project's machines); its size can be raised later."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_names_the_folder_and_the_intact_checkpoint_then_resumes(real_data_dir, small_disk):
    from simclr_jax.errors import StorageError

    workdir = str(small_disk / "run")
    # 3 MB hold four checkpoints of this run (measured): saving every step, the disk fills
    # before step 6. Six steps, as the other in-process runs here: one compiled step for all.
    config = _tiny_config(real_data_dir, num_train_steps=6, checkpoint_every_steps=1, keep_checkpoints=50,
                          knn_monitor=False, write_pictures=False)
    with pytest.raises(StorageError, match=rf"no space left on the device of {workdir}; the newest complete "
                                           r"checkpoint, step (\d+), is intact") as error:
        pretrain(config, workdir)
    intact = int(re.search(r"step (\d+), is intact", str(error.value)).group(1))
    assert 2 <= intact < 6 and checkpoint.latest_step(workdir) == intact
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    state = pretrain(config, workdir)  # the same call resumes from the intact step
    assert int(state.step) == 6
    assert [r["step"] for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r][-1] == 6
