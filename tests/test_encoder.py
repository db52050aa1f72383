"""load_encoder(workdir).embed(images): the evaluation code's features, from user code."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

import simclr_jax
from configs import smoke
from simclr_jax import sharding
from simclr_jax.data import augment, sources
from simclr_jax import encoder
from simclr_jax.evaluation.features import FeatureExtractor
from simclr_jax.weights.pretrained import CheckpointError
from tests.helpers import tiny_workdir

SPLIT = "test[:64]"


@pytest.fixture(scope="module")
def random_encoder(tmp_path_factory):
    """The tiny test architecture at random init (needs only config.json), 16 px."""
    workdir = tiny_workdir(tmp_path_factory.mktemp("random"))
    return encoder.load_encoder(workdir, random_init_seed=0, batch_size=16)


@pytest.fixture(scope="module")
def pretrained(tiny_pretraining):
    """The session's tiny pretraining workdir (4 steps, tests/conftest.py) and its config."""
    workdir, config, _ = tiny_pretraining
    return workdir, config


@pytest.fixture(scope="module")
def reference(pretrained):
    """uint8 images of SPLIT and the features evaluation computes for them."""
    workdir, config = pretrained
    ds, _, _ = sources.load_split(config.dataset, SPLIT, config.data_dir)
    images = np.stack([example["image"] for example in ds.as_numpy_iterator()])
    restored = encoder.load_encoder(workdir, mesh=sharding.make_mesh())
    features, _ = FeatureExtractor(restored.model, config, restored.mesh).split(restored.variables, SPLIT)
    return images, features


@pytest.mark.slow
def test_embed_equals_evaluation_features(pretrained, reference):
    workdir, config = pretrained
    images, want = reference
    enc = simclr_jax.load_encoder(workdir)
    assert (enc.image_size, enc.feature_dim, enc.step) == (16, 32, 4)  # ResNet-18 at 1/16: 512/16
    got = enc.embed(images)
    print("max |embed - evaluation features|:", float(np.max(np.abs(got - want))))
    assert got.dtype == np.float32 and got.shape == want.shape == (64, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.std(got) > 1e-3  # not trivially equal

    # The checkpoints folder works too; a chunk that is not a multiple of the
    # 8 devices is rounded up, and 37 images leave a padded last chunk.
    enc = simclr_jax.load_encoder(os.path.join(workdir, "checkpoints"), step=4, batch_size=12)
    assert enc.batch_size == 16 and simclr_jax.load_encoder(workdir, step=2).step == 2
    np.testing.assert_allclose(enc.embed(images[:37]), want[:37], rtol=1e-5, atol=1e-5)
    single = enc.embed(images[5])
    assert single.shape == (32,)
    np.testing.assert_allclose(single, want[5], rtol=1e-5, atol=1e-5)
    assert enc.embed(images[:0]).shape == (0, 32)

    z = simclr_jax.load_encoder(workdir, head_layer=config.model.head_layers).embed(images[:4])
    assert z.shape == (4, config.model.proj_dim)


def test_batches_devices_and_single_images_agree(random_encoder):
    enc = random_encoder
    images = np.random.default_rng(0).integers(0, 256, size=(37, 32, 32, 3), dtype=np.uint8)
    batched = enc.embed(images)
    assert batched.shape == (37, enc.feature_dim) and batched.dtype == np.float32
    np.testing.assert_allclose(enc.embed(images[7]), batched[7], rtol=1e-5, atol=1e-6)
    one_device = encoder.Encoder(enc.model_config, jax.device_get(enc.variables), 16,
                                 mesh=sharding.make_mesh(jax.devices()[:1]), batch_size=5)
    np.testing.assert_allclose(one_device.embed(images), batched, rtol=1e-5, atol=1e-6)


def test_preprocessing_is_eval_view_for_any_size(random_encoder):
    enc = random_encoder
    rng = np.random.default_rng(1)
    for shape in ((3, 32, 32, 3), (3, 48, 40, 3), (2, 8, 12, 3)):
        images = rng.integers(0, 256, size=shape, dtype=np.uint8)
        want = np.stack([augment.eval_view(tf.constant(image), 16, 16).numpy() for image in images])
        np.testing.assert_array_equal(enc.preprocess(images), want)
    assert enc.embed(rng.integers(0, 256, size=(2, 48, 40, 3), dtype=np.uint8)).shape == (2, 32)


@pytest.mark.parametrize("images,message", [
    (np.zeros((2, 32, 32, 3), np.float32), r"uint8.*got float32.*\* 255"),
    (np.zeros((2, 32, 32), np.uint8), r"\[B, H, W, 3\].*\(2, 32, 32\)"),
    (np.zeros((2, 32, 32, 4), np.uint8), r"\[B, H, W, 3\].*\(2, 32, 32, 4\)"),
    (np.zeros((1, 2, 32, 32, 3), np.uint8), r"\[B, H, W, 3\]"),
    (np.zeros((2, 0, 32, 3), np.uint8), "empty images"),
])
def test_bad_images_are_clear_errors(random_encoder, images, message):
    with pytest.raises(ValueError, match=message):
        random_encoder.embed(images)


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory.*pretraining workdir"):
        simclr_jax.load_encoder(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="no config.json.*pretraining workdir"):
        simclr_jax.load_encoder(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        simclr_jax.load_encoder(str(tmp_path / "checkpoints"))
    (tmp_path / "config.json").write_text(json.dumps({"model": smoke.get_config().model.to_dict(),
                                                       "image_size": 32}))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        simclr_jax.load_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="head_layer"):
        simclr_jax.load_encoder(str(tmp_path), head_layer=5)


def test_package_import_stays_free_of_tensorflow():
    code = ("import sys, simclr_jax, simclr_jax.pretraining.step, simclr_jax.models; "
            "assert 'tensorflow' not in sys.modules; assert callable(simclr_jax.load_encoder)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
