"""Evaluation from checkpoints: restore across device counts, protocols, errors."""
import json
import os

import jax
import numpy as np
import pytest

from configs import knn as knn_config
from configs import smoke
from simclr_jax import checkpoint, evaluate, models, optim, sharding, step, train

IMAGE_SIZE = 16


def _model_config():
    config = smoke.get_config().model
    config.width_multiplier = 1 / 16
    return config


@pytest.fixture(scope="module")
def eight_device_checkpoint(tmp_path_factory):
    """A workdir whose checkpoint was written from an 8-device mesh after one step."""
    workdir = str(tmp_path_factory.mktemp("pretrain8"))
    mesh = sharding.make_mesh(jax.devices()[:8])
    model = models.model_from_config(_model_config(), axis_name=sharding.DATA_AXIS)
    tx = optim.lars(0.5, 1e-4)
    state = step.create_train_state(model, tx, IMAGE_SIZE, seed=0, mesh=mesh)
    train_step = step.make_train_step(model, tx, lambda s: 0.5, 0.5, mesh)
    views = np.random.default_rng(0).uniform(size=(16, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    state, _ = train_step(state, sharding.put_batch({"views": views}, mesh))
    manager = checkpoint.create_manager(workdir, save_every_steps=1, max_to_keep=1)
    checkpoint.save(manager, 1, state, force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir, jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def test_eight_device_checkpoint_restores_on_one_device_with_same_features(eight_device_checkpoint):
    workdir, saved = eight_device_checkpoint
    model = models.model_from_config(_model_config())
    one = sharding.make_mesh(jax.devices()[:1])
    variables, restored_step = evaluate.encoder_variables(model, IMAGE_SIZE, workdir, mesh=one)
    assert restored_step == 1
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(variables))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), saved)

    images = np.random.default_rng(1).uniform(size=(8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    for head_layer in (0, 1, 2):
        features = evaluate.make_feature_fn(model, head_layer)
        want = features(saved, images)
        got = features(variables, images)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert features(saved, images).shape == (8, 128)  # the last head layer: z
    # And the 1-device restore evaluates on 8 devices again, batch split over the mesh.
    eight = sharding.make_mesh(jax.devices()[:8])
    variables8, _ = evaluate.encoder_variables(model, IMAGE_SIZE, workdir, mesh=eight)
    h = evaluate.make_feature_fn(model, 0)
    np.testing.assert_allclose(h(variables8, sharding.put_batch(images, eight)), h(saved, images),
                               rtol=1e-5, atol=1e-6)


def test_random_baseline_differs_from_checkpoint(eight_device_checkpoint):
    workdir, saved = eight_device_checkpoint
    model = models.model_from_config(_model_config())
    mesh = sharding.make_mesh(jax.devices()[:1])
    random_vars, random_step = evaluate.encoder_variables(model, IMAGE_SIZE, "random", mesh=mesh)
    assert random_step == 0
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), random_vars["params"],
                         saved["params"])
    assert max(jax.tree.leaves(diffs)) > 1e-4


def test_workdir_without_checkpoint_is_a_clear_error(tmp_path):
    model = models.model_from_config(_model_config())
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        evaluate.encoder_variables(model, IMAGE_SIZE, str(tmp_path), mesh=sharding.make_mesh())


def test_other_architecture_is_a_clear_error(eight_device_checkpoint):
    workdir, _ = eight_device_checkpoint
    wider = _model_config()
    wider.width_multiplier = 1 / 8
    with pytest.raises(ValueError, match="does not fit the configured architecture"):
        evaluate.encoder_variables(models.model_from_config(wider), IMAGE_SIZE, workdir,
                                   mesh=sharding.make_mesh())


@pytest.mark.slow
def test_pretrain_then_knn_and_linear_probe_on_real_cifar10(real_data_dir, tmp_path):
    from tests.test_pretrain import _tiny_config

    pretrain_dir = str(tmp_path / "pretrain")
    train.train_and_evaluate(_tiny_config(real_data_dir, num_train_steps=4), pretrain_dir)

    config = knn_config.get_config()
    config.pretrained = pretrain_dir
    config.data_dir = real_data_dir
    config.image_size = IMAGE_SIZE
    config.model = _model_config()
    config.train_split = "train[:5000]"
    config.linear.epochs = 10
    config.write_pictures = False  # tests/test_pictures.py covers them
    eval_dir = str(tmp_path / "eval")
    knn_result = evaluate.evaluate(config, eval_dir)
    config.protocol = "linear_eval"
    linear_result = evaluate.evaluate(config, eval_dir)

    with open(os.path.join(eval_dir, "eval_results.json")) as f:
        records = json.load(f)
    assert [r["protocol"] for r in records] == ["knn", "linear_eval"]
    for record in (knn_result, linear_result):
        assert record["num_examples"] == 10_000 and record["split"] == "test"
        assert record["checkpoint_step"] == 4
        # Even 4 steps of a tiny encoder carry signal: well above 10% chance.
        assert 0.15 < record["top1"] <= record["top5"] <= 1.0

    # A model section that contradicts the checkpoint's config.json fails clearly.
    config.model.depth = 34
    with pytest.raises(ValueError, match="different architecture.*model.depth"):
        evaluate.evaluate(config, eval_dir)
