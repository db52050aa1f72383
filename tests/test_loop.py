"""The one loop (simclr_jax/loop.py) in every protocol that trains: a real
SIGTERM mid-run saves and stops, the same call resumes, and the result equals
the uninterrupted run's bit for bit; non-finite steps stop or are skipped.
Pretraining's counterparts are in test_resilience.py (SIGTERM in a bucket,
non-finite steps) and test_pretrain.py (resume); the input wait of every
loop, with an input slowed on purpose, at the end."""
import glob
import itertools
import os
import re
import signal
import threading
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simclr_jax import loop, writers
from simclr_jax.evaluation.classifier import ClassifierExperiment
from simclr_jax.protocols import run as evaluate
from simclr_jax.weights import checkpoint
from tests.helpers import absl_log
from tests.test_classifier import _config, _resolved, encoder, image_folder, mesh, workdir  # noqa: F401 (fixtures)

UNSTABLE = ("seconds", "finetuned", "student")  # wall time and the run's own paths


def _saved(run_dir, step):
    """A checkpoint's arrays as numpy, read without a target tree."""
    path = os.path.join(checkpoint.checkpoint_dir(run_dir), str(step), "default")
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def _sigterm_at(monkeypatch, experiment_class, stop_step):
    """The process sends itself SIGTERM during step ``stop_step`` of ``experiment_class``."""
    step = experiment_class.step
    calls = iter(range(1, 10_000))

    def stepping(self, state, batch):
        if next(calls) == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, state, batch)

    monkeypatch.setattr(experiment_class, "step", stepping)


def interrupted_and_resumed(monkeypatch, run, experiment_class, workdir, stop_step, run_dir=None) -> dict:
    """``run(workdir)`` stopped by SIGTERM during step ``stop_step``, then run
    again (the resume); returns the second run's record. ``run_dir``: where
    the loop keeps its checkpoints (default: the workdir)."""
    with monkeypatch.context() as patch:
        _sigterm_at(patch, experiment_class, stop_step)
        assert not run(workdir)  # stopped: no result yet
    assert checkpoint.latest_step(run_dir or workdir) == stop_step
    return run(workdir)


def assert_same_end(full, record, cut, resumed, total) -> None:
    """Two runs ended alike: records (but wall time and paths), final
    checkpoints bit for bit, the last logged metrics."""
    assert {k: v for k, v in resumed.items() if k not in UNSTABLE} == {
        k: v for k, v in record.items() if k not in UNSTABLE}
    for a, b in zip(jax.tree.leaves(_saved(full, total)), jax.tree.leaves(_saved(cut, total)), strict=True):
        np.testing.assert_array_equal(a, b)
    last = lambda w: [r for r in writers.read_jsonl(os.path.join(w, "metrics.jsonl")) if "epoch" in r][-1]
    assert last(cut) == {**last(full), **{k: last(cut)[k] for k in ("images_per_sec", "input_wait")}}


@pytest.mark.parametrize("protocol", ["linear_eval", "finetune"])
def test_sigterm_then_resume_ends_as_the_uninterrupted_run(protocol, workdir, image_folder, encoder, mesh,  # noqa: F811
                                                           tmp_path, monkeypatch):
    """One experiment object for the three runs, so its step compiles once."""
    root, _ = image_folder
    config = _resolved(protocol, workdir, dataset=f"folder:{root}", log_every_steps=1, checkpoint_every_steps=100)
    settings = config["finetune" if protocol == "finetune" else "linear"]
    settings.epochs = 2  # 6 steps of 16
    if protocol == "finetune":
        settings.label_fraction = 1.0
    else:  # and a profile of steps 2-3 of each run, which changes nothing it computes
        config.profile_steps = 2
    experiment = ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=protocol == "linear_eval")
    run = lambda run_dir: experiment.run(encoder.variables, run_dir)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    with absl_log() as log:
        record = run(full)
    # One progress line per step (epoch k of K, loss, accuracy, rate, ETA), then the test split's scoring.
    assert re.findall(rf"{protocol} epoch ([\d.]+)/2 \(step (\d)/6\) \| loss [\d.]+ \| train accuracy [\d.]+ \| "
                      r"[\d.]+ images/s \| ETA ", log.getvalue()) == [
        ("0.33", "1"), ("0.67", "2"), ("1.00", "3"), ("1.33", "4"), ("1.67", "5"), ("2.00", "6")]
    assert re.search(rf"{protocol}: scoring folder:.*:test: \d+ images \(", log.getvalue())
    trained = jax.device_get(experiment.trained_variables)
    resumed = interrupted_and_resumed(monkeypatch, run, ClassifierExperiment, cut, 4,
                                      run_dir=os.path.join(cut, protocol))
    assert_same_end(os.path.join(full, protocol), record, os.path.join(cut, protocol), resumed, total=6)
    assert record["train_steps"] == 6 and 0 < record["top1"] <= 1
    if protocol == "linear_eval":  # where TensorBoard's Profile tab finds it
        assert glob.glob(os.path.join(full, protocol, "plugins", "profile", "*", "*.xplane.pb"))
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(jax.device_get(experiment.trained_variables)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_diverging_finetune_stops_at_the_step_naming_the_last_good_checkpoint(workdir, image_folder,  # noqa: F811
                                                                              tmp_path):
    root, _ = image_folder
    config = _config("finetune", workdir, dataset=f"folder:{root}", log_every_steps=1, checkpoint_every_steps=1)
    config.finetune.update(epochs=2, label_fraction=1.0, learning_rate=1e30)
    with pytest.raises(FloatingPointError) as error:
        evaluate(config, str(tmp_path))
    bad, good = map(int, re.search(r"non-finite loss or gradient at step (\d+) .*the last good checkpoint is step "
                                   r"(\d+) in", str(error.value)).groups())
    assert good == bad - 1  # a checkpoint every step: the one before the bad step, which saved nothing
    run_dir = str(tmp_path / "finetune")
    assert checkpoint.latest_step(run_dir) == good
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_saved(run_dir, good)))


def test_skip_goes_on_past_an_isolated_step_and_stops_when_stuck():
    """The guard alone, on the flags a loop hands it."""
    class Manager:
        directory = "checkpoints"

        def wait_until_finished(self):
            pass

        def latest_step(self):
            return 4

    guard = loop.NonfiniteGuard("skip", Manager())
    scalars = guard.check({"nonfinite": np.array([0.0, 1.0, 0.0]), "loss": np.array([1.0, np.nan, 3.0])}, step=3)
    assert scalars == {"loss": 2.0, "skipped_updates": 1.0}
    guard.check({"nonfinite": np.array([0.0, 0.0, 1.0]), "loss": np.array([1.0, 1.0, np.nan])}, step=6)
    with pytest.raises(FloatingPointError, match=r"step 7 .*the last 4 steps in a row applied no update .*last "
                                                 r"good checkpoint is step 4"):
        guard.check({"nonfinite": np.array([1.0, 1.0, 1.0]), "loss": np.full(3, np.nan)}, step=9)
    with pytest.raises(FloatingPointError, match="step 2 .*training stopped"):
        loop.NonfiniteGuard("stop", Manager()).check({"nonfinite": np.array([0.0, 1.0]), "loss": np.ones(2)}, 2)


def test_a_resume_that_would_train_something_else_is_refused(tmp_path):
    """Every loop protocol resumes only its own run: here a fine-tuning run_dir
    holding a checkpoint and the config.json record_start wrote."""
    from configs import finetune as finetune_config
    from simclr_jax.config_validation import ConfigError

    run_dir, config = str(tmp_path / "finetune"), finetune_config.get_config()
    assert loop.check_resume(run_dir, config) == loop.Resume(None, {})  # nothing to resume: a fresh start
    loop.record_start(run_dir, config, loop.Resume(None, {}))
    manager = checkpoint.create_manager(run_dir, save_every_steps=1, max_to_keep=1)
    checkpoint.save(manager, 3, {"w": np.zeros(2)}, force=True)
    manager.wait_until_finished()
    manager.close()
    config.checkpoint_every_steps, config.data_dir = 7, "/elsewhere"  # how it saves, where the data lies: allowed
    resume = loop.check_resume(run_dir, config)
    assert resume.step == 3 and resume.changes == {"checkpoint_every_steps": (500, 7), "data_dir": (None, "/elsewhere")}
    loop.record_start(run_dir, config, resume)
    assert writers.read_jsonl(os.path.join(run_dir, "resumes.jsonl")) == [
        {"step": 3, "changed": {"checkpoint_every_steps": [500, 7], "data_dir": [None, "/elsewhere"]}}]
    config.finetune.label_fraction = 0.5  # another subset: another run
    with pytest.raises(ConfigError, match=r"finetune.label_fraction=0.1 \(now 0.5\)"):
        loop.check_resume(run_dir, config)


@flax.struct.dataclass
class _Counter:
    step: jax.Array


class _Sleepy:
    """A loop experiment whose input takes ``input_seconds`` a batch and whose
    step ``step_seconds`` of host time (synchronous: the device is idle while
    the loop waits for input), 1 image a step."""
    name, batch_size = "sleepy", 1

    def __init__(self, total_steps: int, input_seconds: float, step_seconds: float):
        self.total_steps, self.input_seconds, self.step_seconds = total_steps, input_seconds, step_seconds

    def initial_state(self):
        return _Counter(step=jnp.zeros((), jnp.int32))

    def batches(self, start_step):
        for i in itertools.count(start_step + 1):
            time.sleep(self.input_seconds)
            yield np.float32(i)

    def step(self, state, batch):
        time.sleep(self.step_seconds)
        return _Counter(step=state.step + 1), {"loss": jnp.float32(batch), "nonfinite": jnp.int32(0)}

    def scalars(self, step):
        return {}

    def describe(self, step, scalars):
        return f"sleepy step {step}"

    def monitor(self, state, step, manager, writer):
        return False


def _sleepy_run(tmp_path, input_seconds, step_seconds) -> tuple[list, str]:
    """(input_wait of each interval in metrics.jsonl, the log) of 15 steps logged every 3."""
    writer = writers.JsonlWriter(str(tmp_path / "metrics.jsonl"))
    with absl_log() as log:
        loop.run(_Sleepy(15, input_seconds, step_seconds), str(tmp_path), loop.Cadence(3, 100, 1, "stop"), writer)
    writer.close()
    return [r["input_wait"] for r in writers.read_jsonl(str(tmp_path / "metrics.jsonl"))], log.getvalue()


def test_a_slow_input_shows_as_input_wait_and_warns_once(tmp_path):
    """Half of each step waits for input: ~50% each interval, in the progress
    line too, and one warning at the 4th interval (the 2nd to 4th in a row,
    the first apart), not again at the 5th."""
    shares, log = _sleepy_run(tmp_path, input_seconds=0.04, step_seconds=0.04)
    assert len(shares) == 5 and all(0.35 < share < 0.65 for share in shares[1:]), shares
    assert re.findall(r"sleepy step \d+ \| input wait (\d+%)", log) == [f"{share:.0%}" for share in shares]
    assert log.count("the accelerator waited for the next batch") == 1
    assert re.search(r"waited for the next batch \d+%, \d+%, \d+% of the time .*augment_on=device", log)


def test_a_fast_input_shows_no_wait_and_no_warning(tmp_path):
    shares, log = _sleepy_run(tmp_path, input_seconds=0.0, step_seconds=0.04)
    assert max(shares[1:]) < 0.05, shares
    assert "the accelerator waited" not in log


def test_a_wait_while_the_device_is_busy_is_no_input_wait():
    """A loop that runs ahead of a slow step waits for input while the device
    works through the steps queued: that wait costs nothing and does not count."""
    done = threading.Event()

    class Running:  # a step's output the device is still computing
        def block_until_ready(self):
            done.wait()
            return self

    def slow_input():
        while True:
            time.sleep(0.05)
            yield 0

    batches = slow_input()
    with loop.InputWait("busy") as wait:
        wait.dispatched({"loss": Running()})
        wait.next_batch(batches)
        assert wait.waited == 0.0
        done.set()  # the device finishes: the next wait is all idle
        time.sleep(0.01)
        wait.next_batch(batches)
        assert 0.04 < wait.waited < 0.2
