"""The supervised protocols of evaluation/classifier.py (full linear evaluation
and fine-tuning): steps against hand-computed SGD, the frozen encoder, global
BatchNorm, fine-tuning from a head layer, label subsets, image folders, end
to end; and the quick protocols (kNN, cached linear) on an image folder
against an independent computation.

Every encoder here is the tiny test architecture at random init
(tests/helpers.py: a workdir holding only config.json, random_init=True).
"""
import functools
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import cached_linear as cached_linear_config
from configs import finetune as finetune_config
from configs import knn as knn_config
from configs import linear_eval as linear_eval_config
from simclr_jax import config_validation, sharding
from simclr_jax import encoder as encoder_lib
from simclr_jax.data import input_pipeline, sources
from simclr_jax.evaluation import cached_linear, classifier, knn
from simclr_jax.evaluation import run as evaluation
from simclr_jax.evaluation.metrics import topk_accuracy
from simclr_jax.models import SimCLR
from simclr_jax.models.classifier import feature_function
from simclr_jax.protocols import run as evaluate
from tests.helpers import IMAGE_SIZE, tiny_workdir

RECIPES = {"knn": knn_config, "cached_linear": cached_linear_config, "linear_eval": linear_eval_config,
           "finetune": finetune_config}
SEED = 0  # config.seed: the random-init encoder of every config here


def _config(protocol, pretrained, **overrides):
    """The protocol's recipe on a random-init tiny workdir, batches of 16."""
    config = RECIPES[protocol].get_config()
    config.pretrained = pretrained
    config.random_init = True
    config.seed = SEED
    config.eval_batch_size = 16
    if "linear" in config:
        config.linear.batch_size = 16
    if "finetune" in config:
        config.finetune.batch_size = 16
    if "write_pictures" in config:
        config.write_pictures = False
    config.update(overrides)
    return config


def _resolved(protocol, pretrained, **overrides):
    """_config with model.* and image_size read from the workdir, as evaluate() has it."""
    return evaluation.resolve_architecture(_config(protocol, pretrained, **overrides))


def _random_batch(seed, num_classes, n=16):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return images, rng.integers(0, num_classes, n).astype(np.int32)


@functools.cache
def _features(model, head_layer):
    """feature_function, compiled once per (model, head layer) for the whole module."""
    return feature_function(model, head_layer)


def _moved(a, b):
    """Largest absolute change over all leaves of two trees."""
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


# --------------------------------------------------------------------------- fixtures

# A labelled image folder whose classes are colours: random-init features tell
# them apart well but not perfectly (kNN ~0.6 top-1 against chance 1/6), so a
# protocol's accuracy is an informative number, not 0 or 1.
CLASSES = ("blue", "cyan", "green", "magenta", "red", "yellow")  # sorted: the label order
COLOURS = {"red": (1, .2, .2), "green": (.2, 1, .2), "blue": (.2, .2, 1), "yellow": (1, 1, .2),
           "cyan": (.2, 1, 1), "magenta": (1, .2, 1)}
FOLDER_FILES = {"train": 8, "test": 10}  # images per class
COLOUR_JITTER = 0.2  # per image: classes overlap a little
NUM_TRAIN, NUM_TEST = len(CLASSES) * FOLDER_FILES["train"], len(CLASSES) * FOLDER_FILES["test"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<split>/<colour>/*.png, 20x24, a colour with jitter and texture;
    each class holds one grayscale and one RGBA image per split.
    Returns (root, {path: (original array, label)})."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    originals = {}
    for split, per_class in FOLDER_FILES.items():
        for label, name in enumerate(CLASSES):
            os.makedirs(root / split / name)
            for i in range(per_class):
                colour = np.clip(np.asarray(COLOURS[name]) + COLOUR_JITTER * rng.normal(size=3), 0, 1)
                value = rng.uniform(0.3, 1.0) * (0.75 + 0.25 * rng.uniform(size=(20, 24, 1)))
                image = np.clip(value * colour * 255, 0, 255).round().astype(np.uint8)
                if i == 0:  # grayscale
                    image = image.mean(-1, keepdims=True).round().astype(np.uint8)
                elif i == 1:  # RGBA
                    image = np.concatenate([image, rng.integers(0, 256, (20, 24, 1), dtype=np.uint8)], -1)
                path = str(root / split / name / f"{i}.png")
                tf.io.write_file(path, tf.io.encode_png(image))
                originals[path] = (image, label)
    return str(root), originals


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tiny architecture (2-layer head): config.json only."""
    return tiny_workdir(tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh()


@pytest.fixture(scope="module")
def encoder(workdir, mesh):
    """The random-init encoder evaluate() builds for _config(..., workdir): embed compiles for 16 images."""
    return encoder_lib.load_encoder(workdir, random_init_seed=SEED, mesh=mesh, batch_size=16)


@pytest.fixture(scope="module")
def linear_experiment(workdir, image_folder, encoder, mesh):
    """Full linear evaluation on the folder, 8 devices, 6 steps of 16 (cosine
    over 6), learning rate 4.0 so two steps visibly move the classifier."""
    root, _ = image_folder
    config = _resolved("linear_eval", workdir, dataset=f"folder:{root}")
    config.linear.update(learning_rate=4.0, epochs=2, standardize=False)
    experiment = classifier.ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=True)
    assert experiment.total_steps == 6  # 2 epochs of 48
    return experiment


# --------------------------------------------------------------------------- config errors

def _no_compiling(monkeypatch):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(jax, "jit", no_compiling)


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_label_fraction_outside_unit_interval_fails_before_compiling(fraction, workdir, monkeypatch, tmp_path):
    _no_compiling(monkeypatch)
    config = _config("finetune", workdir)
    config.finetune.label_fraction = fraction
    with pytest.raises(ValueError, match=rf"config.finetune.label_fraction={fraction} is invalid: "
                                         r"expected in \(0, 1\]"):
        evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path), "nothing written"


@pytest.mark.parametrize("protocol,field", [("finetune", "finetune.batch_size"), ("linear_eval", "linear.batch_size"),
                                            ("finetune", "eval_batch_size"), ("linear_eval", "eval_batch_size")])
def test_batch_size_off_the_device_count_names_the_field_before_compiling(protocol, field, workdir, monkeypatch,
                                                                         tmp_path):
    _no_compiling(monkeypatch)
    config = _config(protocol, workdir)
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = 12
    with pytest.raises(ValueError, match=rf"config.{field}=12 must be a positive multiple of the 8 devices"):
        evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path), "nothing written"


def test_head_layer_beyond_the_checkpoints_head_fails_before_compiling(workdir, monkeypatch, tmp_path):
    _no_compiling(monkeypatch)
    with pytest.raises(ValueError, match=r"config.head_layer=3 is invalid: the checkpoint's head has 2 layers"):
        evaluate(_config("finetune", workdir, head_layer=3), str(tmp_path))


def test_batch_larger_than_the_labelled_subset_names_the_field(workdir, image_folder, encoder, mesh):
    root, _ = image_folder
    config = _resolved("finetune", workdir, dataset=f"folder:{root}")
    config.finetune.label_fraction = 0.1  # one image per class
    with pytest.raises(ValueError, match=r"config.finetune.batch_size=16 exceeds the 6 labelled training examples"):
        classifier.ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=False)


# --------------------------------------------------------------------------- the frozen step

@pytest.mark.parametrize("standardize", [False, True])
def test_frozen_step_is_nesterov_sgd_on_inference_features(standardize, linear_experiment, encoder, mesh):
    """Two linear-eval steps on 8 devices against numpy: softmax cross-entropy
    over the global batch, Nesterov momentum 0.9, cosine from lr x B/256, on
    raw h or on (h - mean) * inv_std."""
    experiment, variables = linear_experiment, encoder.variables
    num_classes = experiment.num_classes
    dim = encoder.feature_dim
    rng = np.random.default_rng(7)
    norm = ({"mean": rng.normal(size=dim).astype(np.float32),
             "inv_std": rng.uniform(0.5, 3.0, size=dim).astype(np.float32)} if standardize else None)
    state = experiment._initial_state(variables)
    assert state.feature_norm == {}  # linear.standardize=False
    if standardize:
        state = state.replace(feature_norm=sharding.put_replicated(norm, mesh))
    initial = jax.device_get(state)
    for t in range(2):
        images, labels = _random_batch(t, num_classes)
        state, _ = experiment._step(state, variables, sharding.put_batch(images, mesh),
                                    sharding.put_batch(labels, mesh))
    final = jax.device_get(state)

    features = _features(encoder.model, 0)  # BatchNorm in inference mode
    kernel = np.asarray(initial.params["classifier"]["kernel"], np.float64)
    bias = np.asarray(initial.params["classifier"]["bias"], np.float64)
    assert kernel.shape == (dim, num_classes) and not kernel.any()  # zero-initialised
    velocity = [np.zeros_like(kernel), np.zeros_like(bias)]
    peak, total = 4.0 * 16 / 256, experiment.total_steps
    for t in range(2):
        images, labels = _random_batch(t, num_classes)
        h = np.asarray(features(variables, images), np.float64)
        if standardize:
            h = (h - norm["mean"]) * norm["inv_std"]
        logits = h @ kernel + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dlogits = (p - np.eye(num_classes)[labels]) / len(labels)
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
    assert set(final.params) == {"classifier"} and final.batch_stats == {} and int(final.step) == 2


def test_feature_standardizer_matches_numpy_over_the_same_batches(linear_experiment, encoder, mesh):
    """Mean and 1/std per dimension over all rows of the batches it read, on 8
    devices; a dimension that never changes keeps scale 1. With
    linear.standardize, the experiment's state carries exactly these
    statistics of its own augmented training views (seed + 1)."""
    experiment, variables = linear_experiment, encoder.variables
    batches = [{"image": _random_batch(seed, 2)[0]} for seed in range(3)]
    features = _features(encoder.model, 0)

    def check(norm, batches):
        h = np.concatenate([np.asarray(features(variables, b["image"]), np.float64) for b in batches])
        std = h.std(0)
        constant = h.max(0) == h.min(0)
        np.testing.assert_allclose(norm["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(norm["inv_std"], np.where(constant, 1.0, 1.0 / np.where(constant, 1.0, std)),
                                   rtol=1e-3)
        assert std[~constant].min() > 0

    check(classifier.feature_standardizer(encoder.model, variables, batches, mesh, head_layer=0), batches)

    config = experiment.config.copy_and_resolve_references()
    config.linear.standardize = True
    standardized = classifier.ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=True)
    norm = jax.device_get(standardized._initial_state(variables).feature_norm)
    views = list(standardized._batches(SEED + 1).take(NUM_TRAIN // 16).as_numpy_iterator())
    assert len(views) == 3
    check(norm, views)


# --------------------------------------------------------------------------- fine-tuning steps

@pytest.fixture(scope="module")
def head_layer_runs(tmp_path_factory, image_folder):
    """Fine-tuning from head layer 1 of a 3-layer head: two steps on random
    batches, on 8 devices and on 1 from the same random-init variables. Per
    device count: the experiment, the encoder (on 8 devices), the state (numpy)
    at the start, after step 1 and at the end, and the two losses."""
    root, _ = image_folder
    workdir = tiny_workdir(tmp_path_factory.mktemp("pretrain_head3"), head_layers=3)
    config = _resolved("finetune", workdir, dataset=f"folder:{root}", head_layer=1)
    config.finetune.update(label_fraction=1.0, learning_rate=4.0, epochs=2.0)
    encoder = encoder_lib.load_encoder(workdir, random_init_seed=SEED, mesh=sharding.make_mesh())
    runs = {}
    for devices in (8, 1):
        mesh = sharding.make_mesh(jax.devices()[:devices])
        variables = sharding.put_replicated(jax.device_get(encoder.variables), mesh)
        experiment = classifier.ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=False)
        state = experiment._initial_state(variables)
        states, losses = [jax.device_get(state)], []
        for t in range(2):
            images, labels = _random_batch(t, experiment.num_classes)
            state, metrics = experiment._step(state, {}, sharding.put_batch(images, mesh),
                                              sharding.put_batch(labels, mesh))
            states.append(jax.device_get(state))
            losses.append(float(metrics["loss"]))
        runs[devices] = {"experiment": experiment, "encoder": encoder, "states": states, "losses": losses}
    return runs


def test_finetune_step_on_eight_devices_matches_one_device(head_layer_runs):
    """Global BatchNorm (encoder and head): 8 shards of 2 images train exactly like one batch of 16."""
    one, eight = head_layer_runs[1], head_layer_runs[8]
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    compare = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    jax.tree.map(compare, eight["states"][-1].params, one["states"][-1].params)
    jax.tree.map(compare, eight["states"][-1].batch_stats, one["states"][-1].batch_stats)
    # The encoder trains (from the second step: the classifier starts at zero).
    assert _moved(eight["states"][-1].params["model"]["encoder"], eight["states"][0].params["model"]["encoder"]) > 1e-4


def test_finetuning_from_head_layer_one_trains_up_to_it_and_classifies_its_output(head_layer_runs, image_folder):
    """SimCLR v2 fine-tunes from the first layer of a 3-layer head: the
    classifier reads head layer 1's output, the encoder and layer 1 learn,
    layers 2-3 (which feed nothing) keep their parameters and statistics."""
    run = head_layer_runs[8]
    experiment, encoder = run["experiment"], run["encoder"]
    start, after_one, final = run["states"]
    model, num_classes = encoder.model, experiment.num_classes
    head = start.params["model"]["head"]
    assert set(head) == {"dense1", "bn1", "dense2", "bn2", "dense3", "bn3"}

    # (a) The classifier has the width of head layer 1's output (= h's), not the projection's.
    width = head["dense1"]["kernel"].shape[1]
    assert width == encoder.feature_dim != head["dense3"]["kernel"].shape[1]
    assert final.params["classifier"]["kernel"].shape == (width, num_classes)

    # (b) The encoder and head layer 1 learnt; layers 2 and 3 are bit-identical.
    for collection in ("params", "batch_stats"):
        new = final.params["model"] if collection == "params" else final.batch_stats
        old = start.params["model"] if collection == "params" else start.batch_stats
        assert _moved(new["encoder"], old["encoder"]) > 0, collection
        assert _moved(new["head"]["bn1"], old["head"]["bn1"]) > 0, collection
        for name in ("bn2", "bn3") + (("dense2", "dense3") if collection == "params" else ()):
            jax.tree.map(np.testing.assert_array_equal, new["head"][name], old["head"][name])
    assert _moved(final.params["model"]["head"]["dense1"], head["dense1"]) > 0

    # (c) Trained on head layer 1's output: the first step (from the zero
    # classifier, so only the classifier moves) is Nesterov SGD on the features
    # of layer 1 in train mode, with BatchNorm over the global batch of 16.
    images, labels = _random_batch(0, num_classes)
    initial_variables = {"params": start.params["model"], "batch_stats": start.batch_stats}
    h1, _ = model.apply(initial_variables, images, True, 1, method=SimCLR.features, mutable=["batch_stats"])
    h1 = np.asarray(h1, np.float64)
    dlogits = (np.full((16, num_classes), 1 / num_classes) - np.eye(num_classes)[labels]) / 16
    lr = 4.0 * 16 / 256
    np.testing.assert_allclose(after_one.params["classifier"]["kernel"], -lr * 1.9 * h1.T @ dlogits,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(after_one.params["classifier"]["bias"], -lr * 1.9 * dlogits.sum(0),
                               rtol=1e-4, atol=1e-7)
    jax.tree.map(np.testing.assert_array_equal, after_one.params["model"], start.params["model"])

    # ... and scored on it: the test logits are layer 1's inference features
    # of the trained variables times the classifier (h would give others).
    trained = {"params": final.params["model"], "batch_stats": final.batch_stats}
    params = final.params["classifier"]
    test = list(input_pipeline.eval_dataset(experiment.config, "test", batch_size=16).as_numpy_iterator())
    images, test_labels = (np.concatenate([b[key] for b in test]) for key in ("image", "label"))
    want = np.asarray(_features(model, 1)(trained, images), np.float64) @ params["kernel"] + params["bias"]
    logits = experiment._logits(trained, params, {}, sharding.put_batch(images[:16], experiment.mesh))
    np.testing.assert_allclose(logits, want[:16], rtol=1e-4, atol=1e-5)
    from_h = np.asarray(_features(model, 0)(trained, images), np.float64) @ params["kernel"] + params["bias"]
    assert np.max(np.abs(from_h - want)) > 1e-2
    score = experiment.score(trained, params, {})
    assert score["num_examples"] == NUM_TEST == len(test_labels)
    want = topk_accuracy(want, test_labels)
    assert (score["top1"], score["top5"]) == pytest.approx((want["top1"], want["top5"]), abs=1e-6)


# --------------------------------------------------------------------------- image folders

def test_image_folder_decodes_grayscale_and_rgba_to_three_channels(image_folder):
    root, originals = image_folder
    ds, num_examples, info = sources.load_split(f"folder:{root}", "train", None)
    assert num_examples == NUM_TRAIN and info.features["label"].names == list(CLASSES)
    seen = 0
    for example in ds.as_numpy_iterator():
        image, label = originals[example["image/filename"].decode()]
        assert example["image"].shape == (20, 24, 3) and example["label"] == label
        want = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        np.testing.assert_array_equal(example["image"], want)
        seen += 1
    assert seen == num_examples


def test_missing_image_folder_or_split_is_a_clear_error(image_folder, workdir, encoder, mesh, tmp_path):
    config = _resolved("linear_eval", workdir, dataset=f"folder:{tmp_path}/nowhere")
    with pytest.raises(ValueError, match="does not exist; expected ROOT/<split>/<class_name>"):
        classifier.ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=True)
    root, _ = image_folder
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
        sources.load_split(f"folder:{root}", "validation", None)


def _folder_split(root, split):
    """(uint8 images [n, 20, 24, 3], labels) of a folder split, read by TFDS itself, in its order."""
    examples = list(tfds.ImageFolder(root).as_dataset(split=split).as_numpy_iterator())
    return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


def test_knn_and_cached_linear_on_an_image_folder_match_an_independent_computation(image_folder, workdir,
                                                                                    encoder, tmp_path):
    """evaluate() of both quick protocols gives the top-1/top-5 of the same
    classifiers computed here from Encoder.embed features of the same images;
    the colours make both well above chance (1/6)."""
    root, _ = image_folder
    config = _config("knn", workdir, dataset=f"folder:{root}")
    config.knn.k = 16
    records = [evaluate(config, str(tmp_path))]
    config = _config("cached_linear", workdir, dataset=f"folder:{root}")
    config.linear.update(epochs=10, learning_rate=1.0)
    records.append(evaluate(config, str(tmp_path)))
    with open(tmp_path / "eval_results.json") as f:
        assert [r["protocol"] for r in json.load(f)] == ["knn", "cached_linear"]

    (train_images, train_y), (test_images, test_y) = _folder_split(root, "train"), _folder_split(root, "test")
    train_x, test_x = encoder.embed(train_images), encoder.embed(test_images)
    want_knn = knn.knn_accuracy(train_x, train_y, test_x, test_y, len(CLASSES), k=16, temperature=0.1)
    params = cached_linear.train_classifier(train_x, train_y, len(CLASSES), epochs=10, batch_size=16,
                                            learning_rate=1.0, weight_decay=0.0, seed=SEED)
    want_linear = topk_accuracy(cached_linear.classifier_logits(params, test_x), test_y)
    for record, want in zip(records, (want_knn, want_linear)):
        assert record["num_examples"] == NUM_TEST and record["split"] == "test", record
        assert record["random_init"] and record["checkpoint_step"] == 0 and record["head_layer"] == 0
        assert record["top1"] == pytest.approx(want["top1"], abs=1e-6), (record, want)
        assert record["top5"] == pytest.approx(want["top5"], abs=1e-6), (record, want)
        assert 2 / len(CLASSES) < record["top1"] < 1.0, record  # informative: twice chance, not saturated


def test_frozen_encoder_stays_bit_identical_while_finetuning_changes_it(linear_experiment, image_folder,
                                                                        workdir, encoder, mesh, tmp_path):
    """run() on the folder: 6 steps of 16 frozen (linear, 8 devices), 3 of 16
    fine-tuning on half the labels from h (head_layer=0, 1 device)."""
    root, _ = image_folder
    variables = encoder.variables
    before = jax.device_get(variables)

    result = linear_experiment.run(variables, str(tmp_path / "linear"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(linear_experiment.trained_variables), before)
    assert result["train_steps"] == 6 and result["num_examples"] == NUM_TEST
    assert result["num_train_examples"] == NUM_TRAIN

    config = _resolved("finetune", workdir, dataset=f"folder:{root}")
    config.finetune.update(label_fraction=0.5, learning_rate=4.0, epochs=2.0)
    one = sharding.make_mesh(jax.devices()[:1])
    variables = sharding.put_replicated(before, one)
    experiment = classifier.ClassifierExperiment(encoder.model, config, one, freeze_encoder=False)
    result = experiment.run(variables, str(tmp_path / "finetune"))
    assert result["train_steps"] == 3 and result["label_fraction"] == 0.5
    assert result["num_train_examples"] == NUM_TRAIN // 2  # half of each class
    tuned = jax.device_get(experiment.trained_variables)
    for collection in ("params", "batch_stats"):
        assert _moved(tuned[collection]["encoder"], before[collection]["encoder"]) > 0, collection
        # head_layer=0: the projection head feeds nothing, so it stays as it was.
        jax.tree.map(np.testing.assert_array_equal, tuned[collection]["head"], before[collection]["head"])
    # The caller's variables survive the donated training state.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), before)


# --------------------------------------------------------------------------- real CIFAR-10

@pytest.mark.slow
def test_label_subset_is_balanced_seeded_and_is_what_training_reads(real_data_dir, workdir, encoder, mesh):
    reference = tfds.as_numpy(tfds.load("cifar10", split="train[:2000]", data_dir=real_data_dir, batch_size=-1))
    labels = reference["label"]
    position = {image.tobytes(): i for i, image in enumerate(reference["image"])}
    assert len(position) == len(labels)  # every image is unique, so an image names its position

    def experiment(subset_seed=0):
        config = _resolved("finetune", workdir, data_dir=real_data_dir, download=False, train_split="train[:2000]")
        config.finetune.update(label_fraction=0.1, subset_seed=subset_seed, batch_size=40)
        return classifier.ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=False)

    def read(experiment):
        fed = list(experiment.examples.as_numpy_iterator())
        indices = np.array([position[e["image"].tobytes()] for e in fed])
        np.testing.assert_array_equal([e["label"] for e in fed], labels[indices])
        return indices

    tuned = experiment()
    assert (tuned.dataset, tuned.split, tuned.num_train) == ("cifar10", "train[:2000]", 200)
    indices = read(tuned)
    assert len(indices) == len(set(indices)) == 200 and np.all(np.diff(indices) > 0)
    counts = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(labels[indices], minlength=10), np.floor(0.1 * counts + 0.5))
    np.testing.assert_array_equal(indices, input_pipeline.balanced_subset(labels, 0.1, 0))
    np.testing.assert_array_equal(read(experiment()), indices)  # same seed, same subset
    assert not np.array_equal(read(experiment(subset_seed=1)), indices)

    # The first epoch of training batches (5 of 40) holds exactly the subset's labels.
    batches = list(tuned._batches(SEED).take(5).as_numpy_iterator())
    fed_labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.bincount(fed_labels, minlength=10), np.bincount(labels[indices], minlength=10))

    test_ids = tfds.as_numpy(tfds.load("cifar10", split="test", data_dir=real_data_dir, batch_size=-1,
                                       decoders={"image": tfds.decode.SkipDecoding()}))["id"]
    assert not set(reference["id"][indices]) & set(test_ids)


@pytest.mark.slow
def test_full_linear_eval_and_finetune_end_to_end_on_real_cifar10(real_data_dir, workdir, tmp_path):
    """A random-init encoder (restoring checkpoints is test_evaluate's): 4 steps of each protocol,
    scored on the first 2,000 test images."""
    eval_dir, test_split = str(tmp_path), "test[:2000]"
    config = _config("linear_eval", workdir, data_dir=real_data_dir, download=False, eval_batch_size=512,
                     train_split="train[:256]", test_split=test_split)
    config.linear.update(batch_size=64, epochs=1)  # standardize=True: the recipe's default
    linear = evaluate(config, eval_dir)
    assert linear["train_steps"] == 4 and linear["num_train_examples"] == 256

    config = _config("finetune", workdir, data_dir=real_data_dir, download=False, eval_batch_size=512,
                     test_split=test_split)
    config.finetune.update(label_fraction=0.01, batch_size=64, epochs=0.5)
    tuned = evaluate(config, eval_dir)
    assert tuned["train_steps"] == 4 and tuned["num_train_examples"] == 500 and tuned["label_fraction"] == 0.01

    with open(os.path.join(eval_dir, "eval_results.json")) as f:
        records = json.load(f)
    assert [r["protocol"] for r in records] == ["linear_eval", "finetune"]
    for record in records:
        assert record["num_examples"] == 2000 and record["split"] == test_split
        assert 0 < record["top1"] <= record["top5"] <= 1.0

    # The fine-tuned network was written as a run of its own: loaded like a
    # pretraining workdir, its logits give the recorded accuracy.
    network = encoder_lib.load_encoder(tuned["finetuned"])  # its config.json says the classifier's head layer
    assert network.head_layer == config.head_layer
    ds, _, _ = sources.load_split("cifar10", test_split, real_data_dir)
    examples = list(ds.as_numpy_iterator())
    images, labels = np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])
    logits = network.logits(network.preprocess(images))
    assert network.step == tuned["train_steps"]
    untuned = encoder_lib.load_encoder(workdir, head_layer=config.head_layer, random_init_seed=SEED)
    moved = np.abs(network.embed(images[:64]) - untuned.embed(images[:64])).max()
    assert moved > 1e-3, moved  # the encoder it wrote is the fine-tuned one, not where it started
    assert float(np.mean(np.argmax(logits, -1) == labels)) == pytest.approx(tuned["top1"], abs=2 / 2000)
    with pytest.raises(config_validation.ConfigError, match="already holds a fine-tuned network"):
        evaluate(config, eval_dir)  # refuses before training, rather than overwrite it
