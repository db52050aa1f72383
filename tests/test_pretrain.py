"""Pretraining end to end on the real CIFAR-10 copy: learning, resume, errors."""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from configs import knn as knn_config
from configs import smoke
from simclr_jax import config_validation, models, optim, protocols, sharding, writers
from simclr_jax import encoder as encoder_lib
from simclr_jax.errors import CheckpointError
from simclr_jax.pretraining import step, train
from simclr_jax.weights import checkpoint
from tests.helpers import absl_log, pretrain
from tests.helpers import tiny_real_data_config as _tiny_config


def _flat(params):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(params))])


def _scalars(workdir, key):
    return [r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if key in r]


@pytest.mark.slow
def test_resume_continues_from_saved_step_with_identical_state(tiny_pretraining, real_data_dir, tmp_path, caplog):
    # The session's tiny run (tests/conftest.py: _tiny_config's 4 steps), continued in a copy.
    source, _, first = tiny_pretraining
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    assert int(first.step) == 4

    # What resume would load is exactly the state the run ended with.
    manager = checkpoint.create_manager(workdir, save_every_steps=2, max_to_keep=3)
    assert manager.latest_step() == 4
    restored = jax.device_get(checkpoint.restore(manager, first))
    manager.close()
    jax.tree.map(np.testing.assert_array_equal, restored, first)

    # A longer run in the same workdir resumes at step 4 rather than starting over.
    with absl_log() as log:
        second = pretrain(_tiny_config(real_data_dir, num_train_steps=6), workdir)
    # Its summary's random-initialisation baseline is the first run's, read back: one kNN pass of
    # each split (the trained network's) where scoring the baseline again would make two.
    assert log.getvalue().count("knn: features of cifar10:train[:2000]") == 1
    assert "the same network at random initialisation" in log.getvalue()
    assert int(second.step) == 6
    logged_steps = [r["step"] for r in _scalars(workdir, "loss")]
    assert logged_steps == [1, 2, 3, 4, 5, 6]
    # The label-using monitors ran: the online probe every step, kNN at each run's end.
    assert all("probe_acc" in r for r in _scalars(workdir, "loss"))
    assert [r["step"] for r in _scalars(workdir, "knn_top1")] == [4, 6]
    # The resume changed num_train_steps, which it may: recorded. A changed batch size is refused
    # before anything is written.
    assert writers.read_jsonl(os.path.join(workdir, "resumes.jsonl")) == [
        {"step": 4, "changed": {"num_train_steps": [4, 6]}}]
    metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
    with pytest.raises(config_validation.ConfigError, match=r"batch_size=16 \(now 32\)"):
        pretrain(_tiny_config(real_data_dir, num_train_steps=8, batch_size=32), workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics
    assert checkpoint.saved_config(workdir)["batch_size"] == 16

    # A damaged latest checkpoint (its array files cut in half): resume names it and the step that
    # reads; evaluation falls back to that step with a warning.
    for folder, _, names in os.walk(os.path.join(checkpoint.checkpoint_dir(workdir), "6")):
        for name in names:
            if os.path.basename(folder) == "d":
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(os.path.getsize(os.path.join(folder, name)) // 2)
    with pytest.raises(CheckpointError, match=r"checkpoint step 6 in .* cannot be read .*; step 4 reads: delete "
                                              r".*/checkpoints/6 \(and any later step\) to resume from step 4"):
        pretrain(_tiny_config(real_data_dir, num_train_steps=8), workdir)
    with caplog.at_level("WARNING"):
        encoder = encoder_lib.load_encoder(workdir)
    assert encoder.step == 4 and "step 6" in caplog.text and "using step 4" in caplog.text


@pytest.mark.slow
def test_what_a_first_run_logs_and_records(tiny_pretraining, tiny_pretraining_log):
    """The session's tiny run (4 steps, a progress line each, the kNN monitor at the end)."""
    workdir, _, state = tiny_pretraining
    log = tiny_pretraining_log
    # clu's parameter overview first: the network's arrays (the online probe's are not the network's).
    count = sum(np.size(leaf) for leaf in jax.tree.leaves(step.model_params(state.params)))
    assert count < sum(np.size(leaf) for leaf in jax.tree.leaves(state.params))
    assert train.PARAMETERS_MESSAGE in log and f"Total: {count:,} -- " in log
    # One progress output: the project's line at each logged step, no second line of the same
    # scalars (clu's LoggingWriter) and no clu ReportProgress (work-unit notes, steps_per_sec).
    assert re.findall(r"step (\d)/4 \(epoch .* images/s \| ETA \S+ \| input wait \d+%", log) == ["1", "2", "3", "4"]
    assert "contrastive_acc=" not in log  # clu's LoggingWriter: "[4] contrastive_acc=0.09, ..."
    assert "work unit notes" not in log  # clu's ReportProgress: "Setting work unit notes: 5.9 steps/s, ..."
    records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [(r["step"], "loss" in r, "knn_top1" in r) for r in records] == [
        (1, True, False), (2, True, False), (3, True, False), (4, True, False), (4, False, True)]
    assert all(0 <= r["input_wait"] <= 1 for r in records if "loss" in r)  # the share waiting for input
    # The monitor's feature passes say how far they got; the summary sets its kNN beside the
    # same network at random initialisation, scored once and kept in the workdir.
    assert "knn: features of cifar10:train[:2000]: 2000/2000 images (" in log
    assert "knn: features of cifar10:test[:1000]: 1000/1000 images (" in log
    trained = _scalars(workdir, "knn_top1")[-1]
    with open(os.path.join(workdir, "random_init.json")) as f:
        baseline = json.load(f)["scores"]["knn"]
    assert (f"  knn           top-1 {trained['knn_top1']:.1%}, top-5 {trained['knn_top5']:.1%} (the same network "
            f"at random initialisation: {baseline['top1']:.1%}, {baseline['top5']:.1%})") in log


@pytest.mark.slow
def test_smoke_recipe_learns_on_real_cifar10(real_data_dir, tmp_path):
    """A shortened smoke run: loss falls and contrastive accuracy leaves chance far behind."""
    config = smoke.get_config()
    config.data_dir = real_data_dir
    config.num_train_steps = 100  # measured: loss 5.28 -> 4.74, contrastive acc 0.05 -> 0.10, kNN 29.4% vs 22.4%
    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
    config.knn_monitor = False  # evaluation has its own tests
    workdir = str(tmp_path)
    pretrain(config, workdir)

    records = _scalars(workdir, "loss")
    first, last = records[0], records[-1]
    chance = 1 / (2 * config.batch_size - 1)
    assert last["loss"] < first["loss"] - 0.2, (first, last)
    assert last["contrastive_acc"] > 20 * chance, (first, last)
    assert last["contrastive_acc"] > first["contrastive_acc"] + 0.03, (first, last)

    # What it learnt shows in kNN against the same architecture at random init
    # (which already reaches ~30% on CIFAR-10: a fixed threshold would not do).
    knn = knn_config.get_config()
    knn.update(pretrained=workdir, data_dir=real_data_dir, train_split="train[:2000]", test_split="test[:1000]",
               write_pictures=False)
    learnt = protocols.run(knn, str(tmp_path / "eval"))["top1"]
    knn.random_init = True
    baseline = protocols.run(knn, str(tmp_path / "eval"))["top1"]
    print({"knn_top1": learnt, "random_init_knn_top1": baseline})
    assert learnt > baseline + 0.04, (learnt, baseline)


@pytest.mark.parametrize("override,message", [
    ({"batch_size": 12}, "multiple of 8"),
    ({"temperature": 0.0}, "temperature"),
    ({"dataset": "no_such_dataset"}, "no_such_dataset"),
    ({"train_split": "validation"}, "split"),
    ({"image_size": 4}, "image_size"),
])
def test_bad_config_fails_early_with_clear_message(real_data_dir, tmp_path, override, message):
    config = _tiny_config(real_data_dir, **override)
    with pytest.raises(ValueError, match=message):
        pretrain(config, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints")), "nothing half-written"


def test_missing_data_names_the_data_dir(tmp_path):
    config = _tiny_config(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="empty"):
        pretrain(config, str(tmp_path / "work"))


@pytest.mark.slow
def test_bfloat16_compute_trains_like_float32(real_data_dir):
    """bfloat16 activations (float32 parameters, BatchNorm statistics and loss)
    against float32, both from the same weights, on one batch of real views
    trained on repeatedly (a fixed target, so the two curves can be compared
    step by step rather than only in level): the first step's loss within 1%,
    both fit the batch, and they stay within 5% of each other throughout."""
    from simclr_jax.data import input_pipeline

    config = _tiny_config(real_data_dir, batch_size=32)
    views = next(iter(input_pipeline.pretrain_dataset(config, per_process_batch_size=32, seed=0)))["views"]
    mesh = sharding.make_mesh(jax.devices()[:1])
    curves, updates = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = models.model_from_config(config.model, axis_name=sharding.DATA_AXIS, dtype=jax.numpy.dtype(dtype))
        tx = optim.lars(0.1, 1e-6)
        state = step.create_train_state(model, tx, image_size=config.image_size, seed=0, mesh=mesh)
        train_step = step.make_train_step(model, tx, learning_rate=lambda _: 0.1, temperature=0.1, mesh=mesh)
        batch, losses = sharding.put_batch({"views": np.asarray(views)}, mesh), []
        initial = _flat(state.params)
        for _ in range(15):
            state, metrics = train_step(state, batch)
            losses.append(float(metrics["loss"]))
            if len(losses) == 1:
                updates[dtype] = _flat(state.params) - initial
        curves[dtype] = np.array(losses)
    f32, bf16 = curves["float32"], curves["bfloat16"]
    cosine = updates["float32"] @ updates["bfloat16"] / np.linalg.norm(updates["float32"]) / np.linalg.norm(
        updates["bfloat16"])
    print({"float32": f32.round(4).tolist(), "bfloat16": bf16.round(4).tolist(), "cosine": cosine})
    np.testing.assert_allclose(bf16[0], f32[0], rtol=0.01)  # step 1: same weights and batch
    assert cosine > 0.95  # its update points where float32's does (0.988 measured)
    assert f32[-1] < 0.5 * f32[0] and bf16[-1] < 0.5 * bf16[0]  # both fit the batch


def test_init_from_starts_from_another_runs_weights_with_a_fresh_optimiser(real_data_dir, tmp_path):
    source = str(tmp_path / "source")
    config = _tiny_config(real_data_dir, seed=1)
    checkpoint.write_run_config(source, config)
    mesh = sharding.make_mesh()
    model = models.model_from_config(config.model, axis_name=sharding.DATA_AXIS)
    saved = step.create_train_state(model, optim.lars(0.1, 0.0), image_size=config.image_size, seed=7, mesh=mesh)
    manager = checkpoint.create_manager(source, save_every_steps=1, max_to_keep=1)
    checkpoint.save(manager, 5, saved, force=True)
    manager.wait_until_finished()
    manager.close()

    config.init_from = source
    state = jax.device_get(train.Pretraining(config, str(tmp_path / "run"), mesh, None).initial_state())
    saved = jax.device_get(saved)
    assert int(state.step) == 0
    for part in ("encoder", "head"):
        jax.tree.map(np.testing.assert_array_equal, state.params[part], saved.params[part])
    jax.tree.map(np.testing.assert_array_equal, state.batch_stats, saved.batch_stats)
    assert not np.any(state.params["online_probe"]["kernel"])  # the probe starts afresh (zeros)
    momentum = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert momentum and not any(np.any(x) for x in momentum)
    # Without init_from the same config starts elsewhere (seed 1, not the source's 7).
    config.init_from = None
    fresh = jax.device_get(train.Pretraining(config, str(tmp_path / "fresh"), mesh, None).initial_state())
    assert not np.array_equal(fresh.params["head"]["dense1"]["kernel"], saved.params["head"]["dense1"]["kernel"])


def test_init_from_another_architecture_names_the_fields_and_writes_nothing(real_data_dir, tmp_path):
    from simclr_jax.config_validation import ConfigError
    from simclr_jax.weights.pretrained import CheckpointError
    from tests.helpers import tiny_workdir

    source = tiny_workdir(tmp_path / "source", head_layers=3)
    config = _tiny_config(real_data_dir, init_from=source)
    config.model.width_multiplier = 0.125
    with pytest.raises(ConfigError, match=r"holds another architecture: set --config.model.width_multiplier=0.0625 "
                       r"\(the config has 0.125\), --config.model.head_layers=3 \(the config has 2\)"):
        pretrain(config, str(tmp_path / "run"))
    config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no such directory"):
        pretrain(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
