"""Evaluation from a pretraining workdir: restore across device counts, the
architecture read from config.json, the random-init baseline, errors, and the
protocols end to end on real data."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import cached_linear as cached_linear_config
from configs import knn as knn_config
from simclr_jax import config_validation, models, optim, protocols, sharding
from simclr_jax import encoder as encoder_lib
from simclr_jax.data import sources
from simclr_jax.evaluation import knn
from simclr_jax.evaluation import run as evaluation
from simclr_jax.models.classifier import feature_function
from simclr_jax.pretraining import step
from simclr_jax.weights import checkpoint
from simclr_jax.weights.pretrained import CheckpointError
from tests.helpers import IMAGE_SIZE, absl_log, tiny_pretrain_config


def _pretrain_config():
    return tiny_pretrain_config()


def _initial_run(workdir, num_devices, tx, num_classes=0):
    """(model, mesh, initial state) of the tiny architecture, its config.json written to ``workdir``."""
    config = _pretrain_config()
    checkpoint.write_run_config(workdir, config)
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    model = models.model_from_config(config.model, axis_name=sharding.DATA_AXIS)
    return model, mesh, step.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh,
                                                num_classes=num_classes)


def _save(workdir, step_number, state):
    manager = checkpoint.create_manager(workdir, save_every_steps=1, max_to_keep=1)
    checkpoint.save(manager, step_number, state, force=True)
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def eight_device_workdir(tmp_path_factory):
    """A workdir (config.json + checkpoint) written from an 8-device mesh after one step."""
    workdir = str(tmp_path_factory.mktemp("pretrain8"))
    tx = optim.lars(0.5, 1e-4)
    model, mesh, state = _initial_run(workdir, 8, tx)
    train_step = step.make_train_step(model, tx, learning_rate=lambda s: 0.5, temperature=0.5, mesh=mesh)
    views = np.random.default_rng(0).uniform(size=(16, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    state, _ = train_step(state, sharding.put_batch({"views": views}, mesh))
    _save(workdir, 1, state)
    return workdir, jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def test_eight_device_checkpoint_restores_on_one_device_with_same_features(eight_device_workdir):
    workdir, saved = eight_device_workdir
    one = sharding.make_mesh(jax.devices()[:1])
    encoder = encoder_lib.load_encoder(workdir, mesh=one)
    assert encoder.step == 1 and encoder.image_size == IMAGE_SIZE
    assert encoder.model_config.width_multiplier == 1 / 16  # from config.json, no flags
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(encoder.variables))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(encoder.variables), saved)

    images = np.random.default_rng(1).uniform(size=(8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    for head_layer in (0, 1, 2):
        features = feature_function(encoder.model, head_layer)
        np.testing.assert_allclose(features(encoder.variables, images), features(saved, images), rtol=1e-6,
                                   atol=1e-6)
    assert features(saved, images).shape == (8, 128)  # the last head layer: z
    # And the 1-device restore evaluates on 8 devices again, batch split over the mesh.
    eight = sharding.make_mesh(jax.devices()[:8])
    encoder8 = encoder_lib.load_encoder(workdir, mesh=eight)
    h = feature_function(encoder8.model, 0)
    np.testing.assert_allclose(h(encoder8.variables, sharding.put_batch(images, eight)), h(saved, images),
                               rtol=1e-5, atol=1e-6)


def test_random_init_baseline_has_the_architecture_and_not_the_weights(eight_device_workdir, tmp_path):
    workdir, saved = eight_device_workdir
    baseline = encoder_lib.load_encoder(workdir, random_init_seed=0)
    assert baseline.step == 0
    assert jax.tree.structure(baseline.variables) == jax.tree.structure(saved)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), baseline.variables["params"],
                         saved["params"])
    assert max(jax.tree.leaves(diffs)) > 1e-4
    # It needs only config.json: no checkpoint is read.
    checkpoint.write_run_config(str(tmp_path), _pretrain_config())
    assert encoder_lib.load_encoder(str(tmp_path), random_init_seed=0).feature_dim == 32


def test_workdir_without_checkpoint_or_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        encoder_lib.load_encoder(str(tmp_path))
    checkpoint.write_run_config(str(tmp_path), _pretrain_config())
    with pytest.raises(CheckpointError, match="no checkpoint for step None"):
        encoder_lib.load_encoder(str(tmp_path))


def test_checkpoint_that_does_not_fit_config_json_is_a_clear_error(eight_device_workdir, tmp_path):
    workdir, _ = eight_device_workdir
    wrong = str(tmp_path / "wrong")
    os.makedirs(wrong)
    os.symlink(checkpoint.checkpoint_dir(workdir), os.path.join(wrong, "checkpoints"))
    config = _pretrain_config()
    config.model.width_multiplier = 1 / 8
    checkpoint.write_run_config(wrong, config)
    with pytest.raises(ValueError, match="does not fit the architecture in config.json"):
        encoder_lib.load_encoder(wrong)


def _evaluation_config(recipe, workdir, **overrides):
    config = recipe.get_config()
    config.pretrained = workdir
    config.update(overrides)
    return config


def test_architecture_comes_from_the_checkpoint_and_a_contradiction_names_both(eight_device_workdir):
    workdir, _ = eight_device_workdir
    resolved = evaluation.resolve_architecture(_evaluation_config(knn_config, workdir))
    assert resolved.image_size == IMAGE_SIZE
    trained = _pretrain_config().model
    assert dict(resolved.model) == {name: trained[name] for name in config_validation.MODEL_FIELDS}
    agreeing = _evaluation_config(knn_config, workdir, image_size=IMAGE_SIZE)
    agreeing.model.depth = 18
    assert evaluation.resolve_architecture(agreeing).model.depth == 18
    contradicting = _evaluation_config(knn_config, workdir)
    contradicting.model.depth = 50
    with pytest.raises(ValueError, match=r"--config.model.depth=18 \(the config has 50\)"):
        evaluation.resolve_architecture(contradicting)
    with pytest.raises(ValueError, match="--config.random_init=True"):
        evaluation.resolve_architecture(_evaluation_config(knn_config, "random"))
    too_deep = _evaluation_config(knn_config, workdir, head_layer=3)
    with pytest.raises(ValueError, match="head_layer=3 is invalid: the checkpoint's head has 2 layers"):
        evaluation.resolve_architecture(too_deep)


@pytest.mark.slow
def test_pretrain_then_knn_and_cached_linear_on_real_cifar10(tiny_pretraining, real_data_dir, tmp_path):
    pretrain_dir = tiny_pretraining[0]  # 4 steps of tests/helpers.py's tiny_real_data_config
    eval_dir = str(tmp_path / "eval")
    splits = dict(data_dir=real_data_dir, train_split="train[:2000]", test_split="test[:500]",
                  write_pictures=False)  # tests/test_pictures.py covers them
    with absl_log() as log:
        knn_record = protocols.run(_evaluation_config(knn_config, pretrain_dir, **splits), eval_dir)
        linear_config = _evaluation_config(cached_linear_config, pretrain_dir, **splits)
        linear_config.linear.epochs = 10
        linear_record = protocols.run(linear_config, eval_dir)
    # The baseline on the kNN monitor's test split: pretraining's summary read the same number.
    baseline_record = protocols.run(_evaluation_config(knn_config, pretrain_dir, random_init=True,
                                                       **dict(splits, test_split="test[:1000]")), eval_dir)
    with open(os.path.join(pretrain_dir, "random_init.json")) as f:
        assert json.load(f)["scores"]["knn"]["top1"] == pytest.approx(baseline_record["top1"], abs=1 / 1000)

    # Each protocol says how far it got, and ends with the protocol that comes next.
    log = log.getvalue()
    assert "knn: features of cifar10:train[:2000]: 2000/2000 images (" in log
    assert "cached_linear: features of cifar10:test[:500]: 500/500 images (" in log
    assert "cached_linear: classifier trained (10 epochs, " in log
    assert log.count(evaluation.next_command(linear_config, eval_dir)) == 2  # after kNN, after cached_linear

    with open(os.path.join(eval_dir, "eval_results.json")) as f:
        records = json.load(f)
    assert [(r["protocol"], r["random_init"], r["num_examples"]) for r in records] == [
        ("knn", False, 500), ("cached_linear", False, 500), ("knn", True, 1000)]
    for record in (knn_record, linear_record):
        assert record["num_examples"] == 500 and record["split"] == "test[:500]"
        assert record["checkpoint_step"] == 4
    assert baseline_record["checkpoint_step"] == 0

    # The recorded kNN is the kNN of the checkpoint's features, computed here
    # independently: the encoder's embed on the raw images, numpy-side labels.
    encoder = encoder_lib.load_encoder(pretrain_dir)

    def raw(split):
        ds, _, _ = sources.load_split("cifar10", split, real_data_dir)
        examples = list(ds.as_numpy_iterator())
        return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])

    (train_images, train_labels), (test_images, test_labels) = raw("train[:2000]"), raw("test[:500]")
    want = knn.knn_accuracy(encoder.embed(train_images), train_labels, encoder.embed(test_images), test_labels,
                            10, k=200, temperature=0.1)
    assert knn_record["top1"] == pytest.approx(want["top1"], abs=1 / 500)
    assert knn_record["top5"] == pytest.approx(want["top5"], abs=1 / 500)


@pytest.fixture(scope="module")
def probe_workdir(tmp_path_factory):
    """A one-device workdir whose checkpoint holds an online probe with random weights."""
    workdir = str(tmp_path_factory.mktemp("probe"))
    _, mesh, state = _initial_run(workdir, 1, optim.lars(0.5, 1e-4), num_classes=10)
    rng = np.random.default_rng(2)
    # A small kernel, so the bias decides as much as h does.
    probe = {"kernel": 0.02 * rng.normal(size=(state.params[step.PROBE]["kernel"].shape)).astype(np.float32),
             "bias": rng.normal(size=10).astype(np.float32)}
    state = state.replace(params={**state.params, step.PROBE: sharding.put_replicated(probe, mesh)})
    _save(workdir, 3, state)
    return workdir, probe


def test_online_probe_is_the_supervised_head_and_scores_as_numpy(probe_workdir, real_data_dir, tmp_path):
    workdir, probe = probe_workdir
    encoder = encoder_lib.load_encoder(workdir, batch_size=32)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(encoder.supervised_head), probe)
    assert "online_probe" not in encoder.variables["params"]

    from configs import supervised_head as supervised_head_config
    config = supervised_head_config.get_config()
    config.update(pretrained=workdir, data_dir=real_data_dir, test_split="test[:96]", eval_batch_size=32)
    record = protocols.run(config, str(tmp_path))
    examples = list(sources.load_split("cifar10", "test[:96]", real_data_dir)[0].as_numpy_iterator())
    images, labels = np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])
    logits = encoder.embed(images).astype(np.float64) @ probe["kernel"] + probe["bias"]
    assert record["checkpoint_step"] == 3 and record["num_examples"] == 96
    assert record["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1 / 96)
    assert 0.0 < record["top1"] < 0.5  # random weights: an informative number, not 0 or 1


def test_supervised_head_protocol_errors(eight_device_workdir, probe_workdir, real_data_dir, tmp_path):
    from configs import supervised_head as supervised_head_config
    from simclr_jax.config_validation import ConfigError

    config = supervised_head_config.get_config()
    config.update(pretrained=eight_device_workdir[0], data_dir=real_data_dir, test_split="test[:32]",
                  eval_batch_size=32)
    with pytest.raises(ValueError, match="has no supervised head to score"):
        protocols.run(config, str(tmp_path / "none"))
    config.random_init = True
    with pytest.raises(ConfigError, match="random_init=True is invalid: a randomly initialised encoder has no"):
        protocols.run(config, str(tmp_path / "random"))
    folder = tmp_path / "three_classes"  # a labelled folder dataset of 3 classes
    for label in range(3):
        os.makedirs(folder / "test" / f"class{label}")
        (folder / "test" / f"class{label}" / "0.png").write_bytes(
            tf.io.encode_png(np.full((8, 8, 3), 40 * label, np.uint8)).numpy())
    config.update(random_init=False, pretrained=probe_workdir[0], dataset=f"folder:{folder}", test_split="test")
    with pytest.raises(ValueError, match="the supervised head has 10 classes but"):
        protocols.run(config, str(tmp_path / "classes"))
    assert not any((tmp_path / name).exists() for name in ("none", "random", "classes"))
