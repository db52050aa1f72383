"""Bad config values fail before anything loads or compiles, naming the field; every recipe
kind has exactly the fields it reads."""
import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import (
    cached_linear,
    cifar10,
    distill,
    finetune,
    imagenet,
    imagenet_v2,
    knn,
    linear_eval,
    smoke,
    supervised_head,
)
from simclr_jax import config_schema, config_validation

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
    ("augment_on", "gpu", "augment_on='gpu' is invalid: choose one of ('host', 'device')"),
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


ALL_RECIPES = [cifar10, smoke, imagenet, imagenet_v2, knn, cached_linear, linear_eval, finetune, supervised_head,
               distill]
KINDS = {cifar10: "pretrain", smoke: "pretrain", imagenet: "pretrain", imagenet_v2: "pretrain", knn: "knn",
         cached_linear: "cached_linear", linear_eval: "linear_eval", finetune: "finetune",
         supervised_head: "supervised_head", distill: "distill"}
CASES = [(recipe, field) for recipe in ALL_RECIPES if recipe not in (smoke, imagenet, imagenet_v2)
         for field in config_schema.KINDS[KINDS[recipe]]]

# Fields where None is a choice (TFDS's data_dir, random initialisation, the teacher's head layer, ...);
# evaluations' architecture and image size are None until the checkpoint fills them in.
NONE_MEANS_SOMETHING = {kind: {"data_dir"} | extra for kind, extra in [
    ("pretrain", {"init_from"}), ("knn", set()), ("cached_linear", set()), ("linear_eval", set()),
    ("finetune", {"finetune.subset_split"}), ("supervised_head", set()),
    ("distill", {"init_from", "teacher_head_layer", "head_layer"})]}


def _runnable(recipe):
    return _evaluation_config(recipe) if "protocol" in recipe.get_config() else recipe.get_config()


def _with(config, field, value=None, remove=False):
    """``config`` with ``field`` set to ``value`` (any type: past ConfigDict's type check) or removed."""
    tree = config.to_dict()
    *parents, leaf = field.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    if remove:
        del node[leaf]
    else:
        node[leaf] = value
    return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda r: r.__name__)
def test_every_recipe_is_valid_as_its_kind(recipe):
    assert config_validation.validate(_runnable(recipe), 8, 1) == KINDS[recipe]


@pytest.mark.parametrize("recipe, field", CASES, ids=[f"{r.__name__}:{f}" for r, f in CASES])
def test_each_field_is_required_and_checked(recipe, field):
    config = _runnable(recipe)
    if field != "protocol":  # without it, a config is a pretraining one
        with pytest.raises(config_validation.ConfigError, match=re.escape(f"lacks ['{field}']")):
            config_validation.validate(_with(config, field, remove=True), 8, 1)
    # Some value of these is wrong for every field; the message names the field and the value.
    rejected = []
    for bad in (None, -3, 0, 0.5, 1.5, "", "nonsense", True, [1]):
        try:
            config_validation.validate(_with(config, field, bad), 8, 1)
        except config_validation.ConfigError as e:
            assert str(e).startswith(f"config.{field}={bad!r} is invalid: "), str(e)
            rejected.append(bad)
    assert rejected, f"{field} accepts any value"
    from_checkpoint = KINDS[recipe] != "pretrain" and (field.startswith("model.") or field == "image_size")
    assert (None not in rejected) == (from_checkpoint or field in NONE_MEANS_SOMETHING[KINDS[recipe]]), field


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda r: r.__name__)
def test_an_unknown_field_is_refused_by_name(recipe):
    kind = KINDS[recipe]
    for field in ("bogus", "model.bogus", "optimizer.warmup_epoch"):
        message = re.escape(f"['{field}'] are not read by a {kind} run")
        with pytest.raises(config_validation.ConfigError, match=message):
            config_validation.validate(_with(_runnable(recipe), field, 1), 8, 1)


@pytest.mark.parametrize("kind", list(config_schema.KINDS))
def test_unset_fields_keep_their_type_for_command_line_overrides(kind):
    config = config_schema.build(kind)
    for name, field in config_schema.KINDS[kind].items():
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node[part]
        assert node.get_ref(leaf).get_type() is field.value_type, name
        if field.default is None:  # --config.FIELD=VALUE parses as the declared type
            node[leaf] = {str: "x", int: 1, float: 0.5, bool: True}[field.value_type]


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
