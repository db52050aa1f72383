"""configs/distill.py end to end on a small labelled image folder: a teacher
fine-tuned by configs/finetune.py, then distillation into the same and a
smaller student; the record, the student written as a network of its own,
exact resume, and the errors raised before anything is restored.

The encoders are the tiny test architecture (tests/helpers.py) at random
init; the folder is test_classifier's (six colour classes).
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import distill as distill_config
from configs import finetune as finetune_config
from simclr_jax import config_validation, sharding
from simclr_jax.weights import checkpoint, pretrained
from simclr_jax.data import input_pipeline, sources
from simclr_jax.distillation import experiment
from simclr_jax import encoder as encoder_lib
from simclr_jax.protocols import run as evaluate
from tests.test_classifier import CLASSES, NUM_TEST, NUM_TRAIN, image_folder  # noqa: F401 (a fixture)
from tests.test_loop import _saved, assert_same_end, interrupted_and_resumed
from tests.helpers import tiny_pretrain_config, tiny_workdir

BATCH = 16


@pytest.fixture(scope="module")
def teacher(image_folder, tmp_path_factory):  # noqa: F811
    """WORKDIR/finetuned of 6 fine-tuning steps from head layer 1 (random-init encoder)."""
    root, _ = image_folder
    config = finetune_config.get_config()
    config.update(pretrained=tiny_workdir(tmp_path_factory.mktemp("pretrain")), random_init=True,
                  dataset=f"folder:{root}", eval_batch_size=BATCH, head_layer=1)
    config.finetune.update(label_fraction=1.0, batch_size=BATCH, epochs=2, learning_rate=0.4)
    record = evaluate(config, str(tmp_path_factory.mktemp("finetune")))
    return record


def _config(teacher_record, root, **distill):
    config = distill_config.get_config()
    config.update(teacher=teacher_record["finetuned"], dataset=f"folder:{root}", eval_batch_size=BATCH,
                  log_every_steps=2, checkpoint_every_steps=3)
    config.distill.update(dict(batch_size=BATCH, epochs=2, learning_rate=0.4), **distill)
    return config


@pytest.fixture(scope="module")
def self_distilled(teacher, image_folder, tmp_path_factory):  # noqa: F811
    workdir = str(tmp_path_factory.mktemp("distill"))
    return workdir, experiment.distill(_config(teacher, image_folder[0]), workdir)


def test_record_describes_teacher_and_student_and_scores_what_it_saved(self_distilled, teacher, image_folder):  # noqa: F811
    workdir, record = self_distilled
    assert record["protocol"] == "distill" and record["teacher"] == teacher["finetuned"]
    assert record["num_train_examples"] == NUM_TRAIN and record["num_examples"] == NUM_TEST
    assert record["train_steps"] == 2 * NUM_TRAIN // BATCH and record["num_labelled_examples"] == 0
    # The teacher's test score is the one fine-tuning recorded: the same network on the same views.
    assert record["teacher_top1"] == pytest.approx(teacher["top1"], abs=1e-9)
    # Same architecture (self-distillation), the teacher's head layer, a fresh student.
    assert record["student_architecture"] == record["teacher_architecture"]
    assert record["student_architecture"]["head_layer"] == 1 and record["init_from"] is None
    with open(os.path.join(workdir, "eval_results.json")) as f:
        assert json.load(f) == [record]

    # The student is a network of its own: reloaded, its logits give the recorded accuracy
    # and it can teach the next round.
    student = encoder_lib.load_encoder(record["student"])
    assert student.head_layer == 1 and student.step == record["train_steps"]
    ds, _, _ = sources.load_split(f"folder:{image_folder[0]}", "test", None)
    examples = list(ds.as_numpy_iterator())
    views = student.preprocess(np.stack([e["image"] for e in examples]))
    labels = np.array([e["label"] for e in examples])
    assert len(labels) == NUM_TEST
    top1 = float(np.mean(np.argmax(student.logits(views), -1) == labels))
    assert top1 == pytest.approx(record["top1"], abs=1.5 / NUM_TEST)
    assert pretrained.architecture(record["student"]).protocol == "distill"


def test_sigterm_then_resume_ends_as_the_uninterrupted_run(self_distilled, teacher, image_folder,  # noqa: F811
                                                           tmp_path, monkeypatch):
    full, record = self_distilled
    cut = str(tmp_path / "cut")
    run = lambda workdir: experiment.distill(_config(teacher, image_folder[0]), workdir)
    resumed = interrupted_and_resumed(monkeypatch, run, experiment.Distillation, cut, stop_step=2)
    assert_same_end(full, record, cut, resumed, total=record["train_steps"])
    for a, b in zip(jax.tree.leaves(_saved(record["student"], 6)), jax.tree.leaves(_saved(resumed["student"], 6)),
                    strict=True):  # the student it writes is the same too
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_warms_up_then_follows_the_schedule(schedule):
    settings = distill_config.get_config().distill
    settings.update(learning_rate=0.2, batch_size=512, warmup_epochs=2.0, schedule=schedule)
    _, rate = experiment.make_optimizer(settings, steps_per_epoch=10, total_steps=100)
    peak = 0.2 * 512 / 256
    steps = np.array([0, 5, 20, 60, 100])
    after = (steps - 20) / 80
    want = np.where(steps < 20, peak * steps / 20,
                    peak * (0.5 * (1 + np.cos(np.pi * after)) if schedule == "cosine" else 1.0))
    np.testing.assert_allclose([float(rate(s)) for s in steps], want, rtol=1e-6, atol=1e-7)


def test_lars_scales_kernel_steps_by_their_norm_and_momentum_does_not():
    settings = distill_config.get_config().distill
    settings.update(learning_rate=0.256, batch_size=256, schedule="constant", weight_decay=0.0)
    params = {"kernel": np.full((4, 4), 10.0, np.float32), "bias": np.ones(4, np.float32)}
    grads = {"kernel": np.full((4, 4), 1.0, np.float32), "bias": np.ones(4, np.float32)}
    steps = {}
    for name in ("momentum", "lars"):
        settings.optimizer = name
        tx, _ = experiment.make_optimizer(settings, steps_per_epoch=1, total_steps=1)
        updates, _ = tx.update(grads, tx.init(params), params)
        steps[name] = jax.tree.map(np.asarray, updates)
    # Nesterov SGD's first step: -lr (g + 0.9 g); LARS (no Nesterov): -lr * 1e-3 * |w| / |g| * g on kernels.
    np.testing.assert_allclose(steps["momentum"]["kernel"], -0.256 * 1.9, rtol=1e-6)
    np.testing.assert_allclose(steps["lars"]["kernel"], -0.256 * 1e-3 * 10.0, rtol=1e-5)
    np.testing.assert_allclose(steps["lars"]["bias"], -0.256, rtol=1e-6)


def test_partly_labelled_examples_keep_the_subsets_labels_in_place(image_folder):  # noqa: F811
    root, _ = image_folder
    config = distill_config.get_config()
    dataset = f"folder:{root}"
    ds, total, _ = sources.load_split(dataset, "train", None)
    everything = list(ds.as_numpy_iterator())
    subset = np.array([0, 5, 17, 40])
    ds, count, _ = input_pipeline.partly_labelled_examples(config, dataset, "train", subset)
    got = list(ds.as_numpy_iterator())
    assert count == total == len(got) == NUM_TRAIN
    assert [e["label"] for e in got] == [int(e["label"]) if i in subset else -1 for i, e in enumerate(everything)]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(got, everything))
    ds, _, _ = input_pipeline.partly_labelled_examples(config, dataset, "train", None)
    assert {int(e["label"]) for e in ds.as_numpy_iterator()} == {-1}


def _saved_random_network(workdir, model_config, image_size, seed):
    """A pretraining-like workdir holding ``model_config`` at random init: config.json and one checkpoint."""
    config = tiny_pretrain_config()
    config.image_size = image_size
    config.model.update(model_config)
    checkpoint.write_run_config(workdir, config)
    variables = encoder_lib.load_encoder(workdir, random_init_seed=seed).variables
    manager = checkpoint.create_manager(workdir, save_every_steps=1, max_to_keep=1)
    checkpoint.save(manager, 1, variables, force=True)
    manager.wait_until_finished()
    manager.close()
    return variables


@pytest.mark.slow
def test_an_official_teacher_teaches_a_small_student_from_init_from_with_labels(official_files, real_data_dir,
                                                                                 tmp_path):
    """The official ResNet-18's 10-class head teaches a 1/16-width student on real
    CIFAR-10, started from another run's weights, with the supervised term on
    half the labels. The teacher's recorded score is that head's own on the
    same eval views (computed here through load_encoder)."""
    teacher = official_files["r18_cifar", "saved_model"]
    student_model = dict(pretrained.architecture(teacher).model, width_multiplier=1 / 16)
    init = _saved_random_network(str(tmp_path / "init"), student_model, 32, seed=5)
    config = distill_config.get_config()
    config.update(teacher=teacher, init_from=str(tmp_path / "init"), data_dir=real_data_dir, download=False,
                  train_split="train[:64]", test_split="test[:200]", eval_batch_size=40)
    config.distill.update(batch_size=BATCH, epochs=0.5, alpha=0.5, label_fraction=0.5)

    # The student starts from init_from's weights (the architecture defaults to its).
    run = experiment.Distillation(experiment.resolve(config), sharding.make_mesh())
    start = run.initial_state()
    started = {"params": start.params["model"], "batch_stats": start.batch_stats}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), started, init)

    record = experiment.distill(config, str(tmp_path / "distill"))
    assert record["train_steps"] == 2 and record["num_train_examples"] == 64 and record["num_examples"] == 200
    labels = [e["label"] for e in sources.load_split("cifar10", "train[:64]", real_data_dir)[0].as_numpy_iterator()]
    per_class = np.bincount(labels)
    assert record["num_labelled_examples"] == sum(int(np.floor(c / 2 + 0.5)) for c in per_class if c)  # halves up
    assert record["alpha"] == 0.5
    assert record["teacher_architecture"]["width_multiplier"] == 1 and record["teacher_architecture"]["head_layer"] == 0
    assert record["student_architecture"] == dict(record["teacher_architecture"], width_multiplier=1 / 16)

    examples = list(sources.load_split("cifar10", "test[:200]", real_data_dir)[0].as_numpy_iterator())
    encoder = encoder_lib.load_encoder(teacher, batch_size=40)
    logits = encoder.logits(encoder.preprocess(np.stack([e["image"] for e in examples])))
    want = np.mean(logits.argmax(1) == np.array([e["label"] for e in examples]))
    assert record["teacher_top1"] == pytest.approx(want, abs=1 / 200)


# --------------------------------------------------------------------------- errors before loading

@pytest.fixture
def nothing_loads(monkeypatch):
    def loading(*args, **kwargs):
        raise AssertionError("restored weights before the error")

    monkeypatch.setattr(encoder_lib, "load_encoder", loading)
    monkeypatch.setattr(pretrained, "restore", loading)


def test_a_pretraining_workdir_is_no_teacher(teacher, image_folder, tmp_path, nothing_loads):  # noqa: F811
    config = _config(teacher, image_folder[0])
    config.teacher = tiny_workdir(tmp_path / "pretrain")
    with pytest.raises(config_validation.ConfigError, match="is a pretraining workdir, not a fine-tuned network"):
        experiment.distill(config, str(tmp_path / "distill"))


def test_teacher_and_student_class_counts_must_agree(teacher, image_folder, tmp_path, nothing_loads):  # noqa: F811
    root = tmp_path / "three"
    for split in ("train", "test"):
        for name in CLASSES[:3]:
            shutil.copytree(os.path.join(image_folder[0], split, name), root / split / name)
    config = _config(teacher, str(root))
    with pytest.raises(config_validation.ConfigError, match="classifies 6 classes but the student learns the 3"):
        experiment.distill(config, str(tmp_path / "distill"))


def test_main_prints_the_teacher_error_as_one_line(tmp_path):
    pretrain = tiny_workdir(tmp_path / "pretrain")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "main.py", "--config=configs/distill.py", f"--config.teacher={pretrain}",
                             f"--workdir={tmp_path / 'distill'}"], cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is a pretraining workdir, not a fine-tuned network" in result.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "distill")  # nothing written


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature, teacher, image_folder, tmp_path, nothing_loads):  # noqa: F811
    config = _config(teacher, image_folder[0], temperature=temperature)
    with pytest.raises(config_validation.ConfigError, match="distillation temperature must be > 0"):
        experiment.distill(config, str(tmp_path / "distill"))


def test_an_existing_student_is_not_overwritten(self_distilled, teacher, image_folder, nothing_loads):  # noqa: F811
    workdir, _ = self_distilled
    with pytest.raises(config_validation.ConfigError, match="already holds a distilled student"):
        experiment.distill(_config(teacher, image_folder[0]), workdir)
