"""Long runs survive: SIGTERM saves and resumes exactly, SIGKILL never leaves a
checkpoint that resume would trip on, non-finite steps stop or are skipped."""
import os
import random
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simclr_jax import checkpoint, writers
from simclr_jax.pretraining import train
from tests.launch import main_args, start, wait
from tests.test_pretrain import _tiny_config, pretrain

pytestmark = pytest.mark.slow


def _losses(workdir):
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return []
    return [(r["step"], r["loss"]) for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in r]


def _wait_for_records(workdir, process, count, timeout=300):
    path, deadline = os.path.join(workdir, "metrics.jsonl"), time.monotonic() + timeout
    while not (os.path.exists(path) and len(_losses(workdir)) >= count):
        assert process.poll() is None and time.monotonic() < deadline, "training did not get going"
        time.sleep(0.05)


def _saved_state(workdir, step):
    """A checkpoint's arrays as numpy, read without a target tree."""
    path = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "default")
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def test_sigterm_saves_and_resume_is_exact(real_data_dir, tmp_path):
    steps = 30
    # No periodic checkpoints: the only one mid-run is the one SIGTERM asks for. A
    # memory queue of 4 steps of keys (batch 16): it wraps around before the cut.
    flags = ("--config.checkpoint_every_steps=1000", "--config.knn_monitor=False", "--config.memory.size=128")
    full, cut = str(tmp_path / "uninterrupted"), str(tmp_path / "interrupted")
    wait(start(main_args(full, real_data_dir, steps, *flags), str(tmp_path), num_processes=1,
               devices_per_process=2), str(tmp_path))

    logs = str(tmp_path / "logs")
    os.makedirs(logs)
    (process,) = start(main_args(cut, real_data_dir, steps, *flags), logs, num_processes=1, devices_per_process=2)
    _wait_for_records(cut, process, 5)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert process.wait(timeout=120) == 0, open(os.path.join(logs, "process_0.log")).read()[-3000:]
    seconds_to_exit = time.monotonic() - sent
    stopped_at = checkpoint.create_manager(cut, save_every_steps=1, max_to_keep=3, read_only=True).latest_step()
    assert stopped_at is not None and 5 <= stopped_at < steps
    assert seconds_to_exit < 30

    wait(start(main_args(cut, real_data_dir, steps, *flags), logs, num_processes=1, devices_per_process=2), logs)
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


def test_sigkill_while_saving_never_breaks_resume(real_data_dir, tmp_path):
    workdir, logs = str(tmp_path / "run"), str(tmp_path)
    rng = random.Random(0)
    # A checkpoint every step: most moments fall inside an asynchronous save.
    flags = ("--config.checkpoint_every_steps=1", "--config.knn_monitor=False")
    (process,) = start(main_args(workdir, real_data_dir, 10_000, *flags), logs, num_processes=1,
                       devices_per_process=2)
    _wait_for_records(workdir, process, 2)
    time.sleep(rng.uniform(0.0, 1.0))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    manager = checkpoint.create_manager(workdir, save_every_steps=1, max_to_keep=3, read_only=True)
    latest = manager.latest_step()
    manager.close()
    assert latest is not None
    state = _saved_state(workdir, latest)
    assert int(state["step"]) == latest
    # And a real resume from whatever the kill left.
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
    config = _tiny_config(real_data_dir, num_train_steps=5, checkpoint_every_steps=2, knn_monitor=False)
    pretrain(config, str(tmp_path))
    for step in (2, 4, 5):
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
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_step[2].params),
                                                         jax.tree.leaves(after_step[4].params)))
