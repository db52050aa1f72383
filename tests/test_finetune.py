"""Full linear evaluation and fine-tuning: steps against hand-computed SGD, the
frozen encoder, global BatchNorm, label subsets, image folders, end to end."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import finetune as finetune_config
from configs import smoke
from simclr_jax import evaluate, finetune, input_pipeline, models, sharding

IMAGE_SIZE = 16
NUM_CLASSES = 10


def _model_config():
    config = smoke.get_config().model
    config.width_multiplier = 1 / 16
    return config


def _config(protocol="finetune", **overrides):
    """The fine-tuning recipe shrunk to a tiny random-init encoder at 16 px."""
    config = finetune_config.get_config()
    config.protocol = protocol
    config.pretrained = "random"
    config.image_size = IMAGE_SIZE
    config.model = _model_config()
    config.eval_batch_size = 16
    config.linear.batch_size = 16
    config.finetune.batch_size = 16
    config.update(overrides)
    return config


def _settings(**fields):
    return ml_collections.ConfigDict(dict(dict(batch_size=16, learning_rate=4.0, epochs=1), **fields))


def _random_batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return images, rng.integers(0, NUM_CLASSES, n).astype(np.int32)


def _run_steps(mesh, train_encoder, num_steps=2, total_steps=4, feature_norm=None):
    """(initial variables, initial state, final state, per-step losses) of the real step."""
    model = models.model_from_config(_model_config())
    variables, _ = evaluate.encoder_variables(model, IMAGE_SIZE, "random", mesh=mesh)
    tx = finetune._optimizer(_settings(), 16, total_steps)
    dim = 8 * models.stage_widths(_model_config().width_multiplier)[0]
    classifier = finetune._classifier(NUM_CLASSES).init(jax.random.key(1), np.zeros((1, dim)))["params"]
    classifier = sharding.put_replicated(classifier, mesh)
    state = finetune._create_state(tx, classifier, variables, train_encoder, mesh, feature_norm)
    initial = jax.device_get(state)
    step = finetune.make_train_step(model.clone(axis_name=sharding.DATA_AXIS), tx, NUM_CLASSES, 0, mesh,
                                    train_encoder=train_encoder)
    losses = []
    for i in range(num_steps):
        images, labels = _random_batch(i)
        state, metrics = step(state, {} if train_encoder else variables,
                              sharding.put_batch(images, mesh), sharding.put_batch(labels, mesh))
        losses.append(float(metrics["loss"]))
    return jax.device_get(variables), initial, jax.device_get(state), losses


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_label_fraction_outside_unit_interval_fails_before_compiling(fraction, monkeypatch, tmp_path):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(jax, "jit", no_compiling)
    config = _config()
    config.finetune.label_fraction = fraction
    with pytest.raises(ValueError, match=r"label_fraction=.*must be in \(0, 1\]"):
        evaluate.evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path), "nothing written"


@pytest.mark.parametrize("protocol,field", [("finetune", "finetune"), ("linear_eval", "linear")])
def test_batch_size_off_the_device_count_names_the_field(protocol, field, tmp_path):
    config = _config(protocol)
    config.linear.cached = False
    config[field].batch_size = 12
    with pytest.raises(ValueError, match=rf"config.{field}.batch_size=12 must be a positive multiple of the 8"):
        evaluate.evaluate(config, str(tmp_path))


# --------------------------------------------------------------------------- the step

@pytest.mark.parametrize("standardize", [False, True])
def test_frozen_step_is_nesterov_sgd_on_inference_features(standardize):
    """Two linear-eval steps on 8 devices against numpy: softmax cross-entropy
    over the global batch, Nesterov momentum 0.9, cosine from lr x B/256, on
    raw h or on (h - mean) * inv_std."""
    mesh = sharding.make_mesh()
    dim = 8 * models.stage_widths(_model_config().width_multiplier)[0]
    rng = np.random.default_rng(7)
    norm = ({"mean": rng.normal(size=dim).astype(np.float32),
             "inv_std": rng.uniform(0.5, 3.0, size=dim).astype(np.float32)} if standardize else None)
    variables, initial, final, _ = _run_steps(mesh, train_encoder=False, feature_norm=norm)
    feature_fn = evaluate.make_feature_fn(models.model_from_config(_model_config()), 0)
    kernel = np.asarray(initial.params["classifier"]["kernel"], np.float64)
    bias = np.asarray(initial.params["classifier"]["bias"], np.float64)
    velocity = [np.zeros_like(kernel), np.zeros_like(bias)]
    peak, total = 4.0 * 16 / 256, 4
    for t in range(2):
        images, labels = _random_batch(t)
        h = np.asarray(feature_fn(variables, images), np.float64)  # BatchNorm in inference mode
        if standardize:
            h = (h - norm["mean"]) * norm["inv_std"]
        logits = h @ kernel + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dlogits = (p - np.eye(NUM_CLASSES)[labels]) / len(labels)
        grads = [h.T @ dlogits, dlogits.sum(0)]
        lr = peak * 0.5 * (1 + np.cos(np.pi * t / total))
        for i, g in enumerate(grads):
            velocity[i] = g + 0.9 * velocity[i]
            step = -lr * (g + 0.9 * velocity[i])
            if i == 0:
                kernel = kernel + step
            else:
                bias = bias + step
    got = final.params["classifier"]
    assert np.max(np.abs(got["kernel"] - initial.params["classifier"]["kernel"])) > 1e-3  # it learnt
    np.testing.assert_allclose(got["kernel"], kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["bias"], bias, rtol=1e-4, atol=1e-6)
    assert set(final.params) == {"classifier"} and final.batch_stats == {}


def test_feature_standardizer_matches_numpy_over_the_same_batches():
    """Mean and 1/std per dimension over all rows of the batches it read, on
    8 devices; a dimension that never changes keeps scale 1."""
    mesh = sharding.make_mesh()
    model = models.model_from_config(_model_config())
    variables, _ = evaluate.encoder_variables(model, IMAGE_SIZE, "random", mesh=mesh)
    batches = [{"image": _random_batch(seed)[0]} for seed in range(3)]
    norm = finetune.feature_standardizer(model, variables, batches, mesh, head_layer=0)
    feature_fn = evaluate.make_feature_fn(model, 0)
    h = np.concatenate([np.asarray(feature_fn(variables, b["image"]), np.float64) for b in batches])
    std = h.std(0)
    constant = h.max(0) == h.min(0)
    np.testing.assert_allclose(norm["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm["inv_std"], np.where(constant, 1.0, 1.0 / np.where(constant, 1.0, std)),
                               rtol=1e-3)
    assert std[~constant].min() > 0


def test_finetune_step_on_eight_devices_matches_one_device():
    """Global BatchNorm: 8 shards of 2 images train exactly like one batch of 16."""
    _, _, one, one_losses = _run_steps(sharding.make_mesh(jax.devices()[:1]), train_encoder=True)
    _, initial, eight, eight_losses = _run_steps(sharding.make_mesh(), train_encoder=True)
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    compare = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    jax.tree.map(compare, eight.params, one.params)
    jax.tree.map(compare, eight.batch_stats, one.batch_stats)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), eight.params["model"]["encoder"],
                         initial.params["model"]["encoder"])
    assert max(jax.tree.leaves(moved)) > 1e-4  # the encoder trains


# --------------------------------------------------------------------------- image folders

FOLDER_FILES = {"train": 8, "test": 3}  # images per class
CLASSES = ("cat", "dog")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<split>/<class>/*.png, 20x24; each class holds one grayscale and one RGBA image."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    originals = {}
    for split, per_class in FOLDER_FILES.items():
        for label, name in enumerate(CLASSES):
            os.makedirs(root / split / name)
            for i in range(per_class):
                channels = {0: 1, 1: 4}.get(i, 3)
                image = rng.integers(0, 256, (20, 24, channels), dtype=np.uint8)
                path = str(root / split / name / f"{i}.png")
                tf.io.write_file(path, tf.io.encode_png(image))
                originals[path] = (image, label)
    return str(root), originals


def test_image_folder_decodes_grayscale_and_rgba_to_three_channels(image_folder):
    root, originals = image_folder
    ds, num_examples, info = input_pipeline.load_split(f"folder:{root}", "train", None)
    assert num_examples == 2 * FOLDER_FILES["train"] and info.features["label"].names == list(CLASSES)
    seen = 0
    for example in ds.as_numpy_iterator():
        image, label = originals[example["image/filename"].decode()]
        assert example["image"].shape == (20, 24, 3) and example["label"] == label
        want = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        np.testing.assert_array_equal(example["image"], want)
        seen += 1
    assert seen == num_examples


def test_missing_image_folder_or_split_is_a_clear_error(image_folder, tmp_path):
    with pytest.raises(ValueError, match="does not exist; expected ROOT/<split>/<class_name>"):
        evaluate.evaluate(_config("knn", dataset=f"folder:{tmp_path}/nowhere"), str(tmp_path))
    root, _ = image_folder
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
        input_pipeline.load_split(f"folder:{root}", "validation", None)


def test_cached_linear_eval_and_knn_on_an_image_folder(image_folder, tmp_path):
    root, _ = image_folder
    config = _config("knn", dataset=f"folder:{root}")
    config.knn.k = 4
    config.linear.epochs = 2
    records = [evaluate.evaluate(config, str(tmp_path))]
    config.protocol = "linear_eval"
    records.append(evaluate.evaluate(config, str(tmp_path)))
    with open(tmp_path / "eval_results.json") as f:
        assert [r["protocol"] for r in json.load(f)] == ["knn", "linear_eval"]
    for record in records:
        assert record["num_examples"] == 2 * FOLDER_FILES["test"]
        assert 0 <= record["top1"] <= record["top5"] == 1.0  # top-5 of 2 classes


def test_frozen_encoder_stays_bit_identical_while_finetuning_changes_it(image_folder):
    """Through train_classifier on the folder: 2 steps of 16 (linear), 2 of 8 (fine-tune on half the labels)."""
    root, _ = image_folder
    mesh = sharding.make_mesh()
    model = models.model_from_config(_model_config())
    variables, _ = evaluate.encoder_variables(model, IMAGE_SIZE, "random", mesh=mesh)
    before = jax.device_get(variables)
    config = _config("linear_eval", dataset=f"folder:{root}")
    config.linear.epochs = 2

    result, frozen = finetune.train_classifier(config, model, variables, mesh, section="linear",
                                               train_encoder=False, dataset=config.dataset, split="train")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), before)
    assert result["train_steps"] == 2 and result["num_examples"] == 2 * FOLDER_FILES["test"]

    config.protocol = "finetune"
    config.finetune.label_fraction = 0.5
    config.finetune.batch_size = 8
    config.finetune.epochs = 2.0
    dataset, split, indices = finetune.labelled_subset(config)
    assert len(indices) == FOLDER_FILES["train"]  # half of each class
    result, tuned = finetune.train_classifier(config, model, variables, mesh, section="finetune",
                                              train_encoder=True, dataset=dataset, split=split, indices=indices)
    tuned = jax.device_get(tuned)
    assert result["train_steps"] == 2 and result["num_train_examples"] == FOLDER_FILES["train"]
    for collection in ("params", "batch_stats"):
        moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), tuned[collection]["encoder"],
                             before[collection]["encoder"])
        assert max(jax.tree.leaves(moved)) > 0, collection
        # head_layer=0: the projection head feeds nothing, so it stays as it was.
        jax.tree.map(np.testing.assert_array_equal, tuned[collection]["head"], before[collection]["head"])
    # The caller's variables survive the donated training state.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), before)


# --------------------------------------------------------------------------- real CIFAR-10

@pytest.mark.slow
def test_label_subset_is_balanced_seeded_and_is_what_training_reads(real_data_dir):
    config = _config(data_dir=real_data_dir, train_split="train[:2000]")
    config.finetune.label_fraction = 0.1
    reference = tfds.load("cifar10", split="train[:2000]", data_dir=real_data_dir, batch_size=-1)
    reference = tfds.as_numpy(reference)
    labels = reference["label"]

    dataset, split, indices = finetune.labelled_subset(config)
    assert (dataset, split) == ("cifar10", "train[:2000]")
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    np.testing.assert_array_equal(np.bincount(labels[indices], minlength=NUM_CLASSES),
                                  np.floor(0.1 * counts + 0.5))
    np.testing.assert_array_equal(finetune.labelled_subset(config)[2], indices)  # same seed, same subset
    config.finetune.subset_seed = 1
    assert not np.array_equal(finetune.labelled_subset(config)[2], indices)

    examples, num_examples, _ = finetune.labelled_examples(config, dataset, split, indices)
    fed = list(examples.as_numpy_iterator())
    assert num_examples == len(fed) == len(indices) == 200
    np.testing.assert_array_equal(np.stack([e["image"] for e in fed]), reference["image"][indices])
    np.testing.assert_array_equal([e["label"] for e in fed], labels[indices])

    test_ids = tfds.as_numpy(tfds.load("cifar10", split="test", data_dir=real_data_dir, batch_size=-1,
                                       decoders={"image": tfds.decode.SkipDecoding()}))["id"]
    assert not set(reference["id"][indices]) & set(test_ids)


@pytest.mark.slow
def test_full_linear_eval_and_finetune_end_to_end_on_real_cifar10(real_data_dir, tmp_path):
    """A random-init encoder (restoring checkpoints is test_evaluate's): 4 steps of each protocol."""
    eval_dir = str(tmp_path)
    config = _config("linear_eval", data_dir=real_data_dir, eval_batch_size=512, train_split="train[:256]")
    config.linear.cached = False
    config.linear.batch_size = 64
    config.linear.epochs = 1
    linear = evaluate.evaluate(config, eval_dir)
    assert linear["train_steps"] == 4 and linear["num_train_examples"] == 256

    config = _config(data_dir=real_data_dir, eval_batch_size=512)
    config.finetune.label_fraction = 0.01
    config.finetune.batch_size = 64
    config.finetune.epochs = 0.5
    tuned = evaluate.evaluate(config, eval_dir)
    assert tuned["train_steps"] == 4 and tuned["num_train_examples"] == 500

    with open(os.path.join(eval_dir, "eval_results.json")) as f:
        records = json.load(f)
    assert [r["protocol"] for r in records] == ["linear_eval", "finetune"]
    for record in records:
        assert record["num_examples"] == 10_000 and record["split"] == "test"
        assert 0 < record["top1"] <= record["top5"] <= 1.0
