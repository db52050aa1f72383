"""Bad config values fail before anything loads or compiles, naming the field; every recipe
kind has exactly the fields it reads."""
import json
import os
import subprocess
import sys

import pytest

from configs import cached_linear, cifar10, distill, finetune, imagenet, imagenet_v2, knn, linear_eval, smoke
from simclr_jax import config_validation

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
    ("eval_every_epochs", -1.0, "eval_every_epochs"),
    ("loss_impl", "fast", "loss_impl='fast' is invalid: choose 'auto', 'naive' or 'blockwise'"),
    ("nonfinite_policy", "ignore", "nonfinite_policy='ignore' is invalid: choose 'stop' or 'skip'"),
    ("dtype", "float8", "dtype='float8'"),
    ("dtype", "float16", "float16 needs loss scaling, which is not implemented: use bfloat16"),
    ("color_jitter_strength", -1.0, "color_jitter_strength"),
    ("model.depth", 19, "model.depth=19 is invalid: choose one of (18, 34, 50, 101, 152, 200)"),
    ("model.width_multiplier", 0.0, "model.width_multiplier"),
    ("model.head_layers", 0, "model.head_layers"),
    ("model.proj_dim", 0, "model.proj_dim"),
    ("model.variant", "resnet_d", "model.variant='resnet_d' is invalid: choose one of ('torchvision', 'official')"),
    ("model.sk_ratio", -0.1, "model.sk_ratio"),
    ("model.se_ratio", 1.0, "model.se_ratio"),
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
        config_validation.validate(config, 8, 1)


def test_no_epochs_and_no_steps():
    config = cifar10.get_config()
    config.num_epochs, config.num_train_steps = 0, -1
    with pytest.raises(ValueError, match="set num_epochs > 0 or num_train_steps > 0"):
        config_validation.validate(config, 8, 1)


def test_imagenet_stem_needs_32_pixels():
    config = imagenet.get_config()
    config.image_size = 16
    with pytest.raises(ValueError, match="ImageNet-stem ResNet downsamples by 32"):
        config_validation.validate(config, 8, 1)


@pytest.mark.parametrize("recipe", [cifar10, imagenet, imagenet_v2, smoke])
def test_shipped_recipes_are_valid(recipe):
    assert config_validation.validate(recipe.get_config(), 8, 1) == "pretrain"


def test_mistyped_override_names_the_closest_field(tmp_path):
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/smoke.py", "--config.optimizer.warmup_epoch=3",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert ("unknown config field 'warmup_epoch': Did you mean \"warmup_epochs\"" in result.stderr)
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)  # nothing written


EVALUATION_RECIPES = [knn, cached_linear, linear_eval, finetune, distill]


def _evaluation_config(recipe):
    config = recipe.get_config()
    if recipe is distill:
        config.teacher = "runs/x/eval/finetuned"
    else:
        config.pretrained = "runs/x"
    return config


@pytest.mark.parametrize("recipe", EVALUATION_RECIPES, ids=lambda r: r.__name__)
def test_evaluation_recipes_are_valid_and_hold_exactly_their_fields(recipe):
    config = _evaluation_config(recipe)
    kind = config_validation.validate(config, 8, 1)
    assert kind == config.protocol
    assert config_validation._leaves(config) == set(config_validation.FIELDS[kind])


def test_a_field_nothing_reads_or_a_missing_field_is_an_error():
    config = _evaluation_config(knn)
    config.linear = cached_linear.get_config().linear  # kNN trains no classifier
    with pytest.raises(ValueError, match=r"'linear.batch_size'.*not read by a knn run"):
        config_validation.validate(config, 8, 1)
    config = cifar10.get_config()
    del config["seed"]
    with pytest.raises(ValueError, match=r"lacks \['seed'\]"):
        config_validation.validate(config, 8, 1)


BAD_EVALUATION_VALUES = [
    (knn, "pretrained", None, "set --config.pretrained=PRETRAIN_WORKDIR"),
    (knn, "protocol", "linear", "protocol='linear' is invalid: choose one of"),
    (knn, "checkpoint_step", -2, "checkpoint_step=-2"),
    (knn, "eval_batch_size", 12, "eval_batch_size=12 must be a positive multiple of the 8 devices"),
    (cached_linear, "linear.epochs", 0, "linear.epochs=0"),
    (linear_eval, "linear.batch_size", 100, "linear.batch_size=100 must be a positive multiple of the 8"),
    (finetune, "finetune.label_fraction", 1.5, r"label_fraction=1.5 is invalid: expected in \(0, 1\]"),
    (finetune, "finetune.label_fraction", 0.0, "label_fraction=0.0"),
    (finetune, "finetune.schedule", "step", "finetune.schedule='step'"),
    (finetune, "model.depth", 19, "model.depth=19"),
    (distill, "teacher", None, "set --config.teacher=PATH: a fine-tuned network"),
    (distill, "distill.temperature", 0.0, "the distillation temperature must be > 0"),
    (distill, "distill.alpha", -0.5, "distill.alpha=-0.5"),
    (distill, "distill.optimizer", "adam", "distill.optimizer='adam' is invalid: choose one of"),
    (distill, "distill.batch_size", 100, "distill.batch_size=100 must be a positive multiple of the 8"),
    (distill, "head_layer", -1, "head_layer=-1"),
    (distill, "model.width_multiplier", 0.0, "model.width_multiplier"),
]


@pytest.mark.parametrize("recipe, field, value, message", BAD_EVALUATION_VALUES,
                         ids=[f"{r.__name__}:{f}={v}" for r, f, v, _ in BAD_EVALUATION_VALUES])
def test_bad_evaluation_value_names_field(recipe, field, value, message):
    config = _evaluation_config(recipe)
    _set(config, field, value)
    with pytest.raises(ValueError, match=message):
        config_validation.validate(config, 8, 1)


def test_resume_refuses_what_changes_the_run_and_allows_the_rest():
    saved = json.loads(smoke.get_config().to_json_best_effort())
    config = smoke.get_config()
    config.num_train_steps, config.log_every_steps = 900, 7  # extend the run, log more often
    assert config_validation.resume_changes(saved, config) == {"num_train_steps": (500, 900),
                                                               "log_every_steps": (25, 7)}
    config.batch_size, config.optimizer.base_learning_rate = 64, 2.0
    with pytest.raises(config_validation.ConfigError) as error:
        config_validation.resume_changes(saved, config)
    assert "batch_size=128 (now 64), optimizer.base_learning_rate=8.0 (now 2.0);" in str(error.value)
    assert "num_train_steps" not in str(error.value).split(";")[0]  # allowed changes are not named as refused
    del saved["optimizer"]["base_learning_rate"]  # a run from a version without the field
    config.batch_size = 128
    assert set(config_validation.resume_changes(saved, config)) == {"num_train_steps", "log_every_steps"}
