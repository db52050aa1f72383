"""The one loop (simclr_jax/loop.py) in every protocol that trains: a real
SIGTERM mid-run saves and stops, the same call resumes, and the result equals
the uninterrupted run's bit for bit; non-finite steps stop or are skipped.
Pretraining's counterparts are in test_resilience.py (SIGTERM in a bucket,
non-finite steps) and test_pretrain.py (resume)."""
import os
import re
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simclr_jax import checkpoint, loop, writers
from simclr_jax.evaluation.classifier import ClassifierExperiment
from simclr_jax.evaluation.run import evaluate
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


def interrupted_and_resumed(monkeypatch, run, experiment_class, run_dir, stop_step) -> dict:
    """``run(run_dir)`` stopped by SIGTERM during step ``stop_step``, then run
    again (the resume); returns the second run's record."""
    with monkeypatch.context() as patch:
        _sigterm_at(patch, experiment_class, stop_step)
        assert not run(run_dir)  # stopped: no result yet
    assert checkpoint.latest_step(run_dir) == stop_step
    return run(run_dir)


def assert_same_end(full, record, cut, resumed, total) -> None:
    """Two runs ended alike: records (but wall time and paths), final
    checkpoints bit for bit, the last logged metrics."""
    assert {k: v for k, v in resumed.items() if k not in UNSTABLE} == {
        k: v for k, v in record.items() if k not in UNSTABLE}
    for a, b in zip(jax.tree.leaves(_saved(full, total)), jax.tree.leaves(_saved(cut, total)), strict=True):
        np.testing.assert_array_equal(a, b)
    last = lambda w: [r for r in writers.read_jsonl(os.path.join(w, "metrics.jsonl")) if "epoch" in r][-1]
    assert last(cut) == {**last(full), "images_per_sec": last(cut)["images_per_sec"]}


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
    experiment = ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=protocol == "linear_eval")
    run = lambda run_dir: experiment.run(encoder.variables, run_dir)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    record = run(full)
    trained = jax.device_get(experiment.trained_variables)
    resumed = interrupted_and_resumed(monkeypatch, run, ClassifierExperiment, cut, 4)
    assert_same_end(full, record, cut, resumed, total=6)
    assert record["train_steps"] == 6 and 0 < record["top1"] <= 1
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
    assert checkpoint.latest_step(str(tmp_path)) == good
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_saved(str(tmp_path), good)))


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
