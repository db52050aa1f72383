"""Bad config values fail before anything loads or compiles, naming the field."""
import os
import subprocess
import sys

import pytest

from configs import cifar10, imagenet, smoke
from simclr_jax.config_validation import validate_pretrain_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_VALUES = [
    ("batch_size", 0, "batch_size=0 is invalid: expected a positive integer"),
    ("batch_size", -8, "batch_size=-8"),
    ("image_size", 0, "image_size=0"),
    ("log_every_steps", 0, "log_every_steps"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps"),
    ("keep_checkpoints", 0, "keep_checkpoints"),
    ("eval_batch_size", 0, "eval_batch_size"),
    ("knn.k", 0, "knn.k"),
    ("temperature", 0.0, "temperature=0.0 is invalid: the NT-Xent temperature must be > 0"),
    ("temperature", -0.5, "temperature"),
    ("knn.temperature", 0.0, "knn.temperature"),
    ("knn_every_epochs", -1.0, "knn_every_epochs"),
    ("loss_impl", "fast", "loss_impl='fast' is invalid: choose 'auto', 'naive' or 'blockwise'"),
    ("nonfinite_policy", "ignore", "nonfinite_policy='ignore' is invalid: choose 'stop' or 'skip'"),
    ("dtype", "float8", "dtype='float8'"),
    ("color_jitter_strength", -1.0, "color_jitter_strength"),
    ("model.depth", 19, "model.depth=19 is invalid: choose one of (18, 34, 50, 101, 152, 200)"),
    ("model.width_multiplier", 0.0, "model.width_multiplier"),
    ("model.head_layers", 0, "model.head_layers"),
    ("model.proj_dim", 0, "model.proj_dim"),
    ("probe_learning_rate", 0.0, "probe_learning_rate"),
    ("image_size", 4, "image_size=4 is invalid: the CIFAR-stem ResNet downsamples by 8"),
    ("optimizer.lr_scaling", "cubic", "optimizer.lr_scaling='cubic'"),
    ("optimizer.base_learning_rate", 0.0, "optimizer.base_learning_rate"),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay"),
    ("optimizer.warmup_epochs", -1.0, "optimizer.warmup_epochs"),
    ("optimizer.momentum", 1.0, "optimizer.momentum=1.0 is invalid: expected in [0, 1)"),
]


def _set(config, field, value):
    *parents, leaf = field.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


@pytest.mark.parametrize("field, value, message", BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_bad_value_names_field_and_fix(field, value, message):
    config = cifar10.get_config()
    _set(config, field, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate_pretrain_config(config)


def test_no_epochs_and_no_steps():
    config = cifar10.get_config()
    config.num_epochs, config.num_train_steps = 0, -1
    with pytest.raises(ValueError, match="set num_epochs > 0 or num_train_steps > 0"):
        validate_pretrain_config(config)


def test_imagenet_stem_needs_32_pixels():
    config = imagenet.get_config()
    config.image_size = 16
    with pytest.raises(ValueError, match="ImageNet-stem ResNet downsamples by 32"):
        validate_pretrain_config(config)


@pytest.mark.parametrize("recipe", [cifar10, imagenet, smoke])
def test_shipped_recipes_are_valid(recipe):
    validate_pretrain_config(recipe.get_config())


def test_mistyped_override_names_the_closest_field(tmp_path):
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/smoke.py", "--config.optimizer.warmup_epoch=3",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert ("unknown config field 'warmup_epoch': Did you mean \"warmup_epochs\"" in result.stderr)
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)  # nothing written
