"""Every recipe checked in one place, before anything is loaded or compiled.

There are seven recipe kinds: pretraining (no ``protocol`` field), the
evaluation protocols ``knn``, ``cached_linear``, ``linear_eval``,
``finetune`` and ``supervised_head``, and SimCLR v2's distillation
(``distill``). Each kind has exactly the fields listed in ``FIELDS`` (a
missing or an extra field is an error, so no field is ever read through a
silent default and none is set without effect), and each field has one rule.
A failure is one ConfigError (a ValueError) naming the field, the bad value
and what to set.
"""
import json
from typing import Callable, Optional

import jax
import ml_collections

from simclr_jax import sharding
from simclr_jax.errors import UserError
from simclr_jax.models import VALID_DEPTHS, VARIANTS

DTYPES = ("float32", "bfloat16")
PROTOCOLS = ("knn", "cached_linear", "linear_eval", "finetune", "supervised_head", "distill")
OPTIMIZERS = ("momentum", "lars")
LOSS_IMPLS = ("auto", "naive", "blockwise")
SCHEDULES = ("cosine", "constant")
MODEL_FIELDS = ("depth", "width_multiplier", "cifar_stem", "head_layers", "proj_dim", "variant", "sk_ratio",
                "se_ratio")

_DATA = ("dataset", "data_dir", "download", "train_split", "cache_dataset", "seed")
_KNN = ("knn.k", "knn.temperature")
_LOOP = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "nonfinite_policy")  # loop.Cadence
_LINEAR = ("linear.epochs", "linear.batch_size", "linear.learning_rate", "linear.weight_decay")
_EVALUATION = (*_DATA, "protocol", "pretrained", "checkpoint_step", "random_init", "test_split",
               "image_size", *(f"model.{name}" for name in MODEL_FIELDS), "head_layer", "eval_batch_size")
FIELDS = {
    "pretrain": (
        *_DATA, "image_size", "color_jitter_strength", "blur", "shuffle_buffer_size",
        *(f"model.{name}" for name in MODEL_FIELDS), "model.remat", "init_from", "dtype", "batch_size", "num_epochs",
        "num_train_steps", "temperature", "loss_impl", "microbatches", "memory.size", "memory.momentum",
        "optimizer.base_learning_rate",
        "optimizer.lr_scaling", "optimizer.warmup_epochs", "optimizer.weight_decay", "optimizer.momentum",
        "optimizer.trust_coefficient", "online_probe", "probe_learning_rate", "knn_monitor",
        "eval_every_epochs", "test_split", "eval_batch_size", *_KNN, *_LOOP, "write_pictures"),
    "knn": (*_EVALUATION, *_KNN, "write_pictures"),
    "cached_linear": (*_EVALUATION, *_LINEAR, "write_pictures"),
    "supervised_head": _EVALUATION,
    "linear_eval": (*_EVALUATION, *_LINEAR, "linear.standardize", "shuffle_buffer_size", *_LOOP),
    "finetune": (*_EVALUATION, "shuffle_buffer_size", "finetune.label_fraction", "finetune.subset_seed",
                 "finetune.subset_split", "finetune.epochs", "finetune.batch_size", "finetune.learning_rate",
                 "finetune.weight_decay", "finetune.schedule", *_LOOP),
    "distill": (*_DATA, "protocol", "teacher", "teacher_step", "teacher_head_layer", "init_from", "test_split",
                "shuffle_buffer_size", "image_size", *(f"model.{name}" for name in MODEL_FIELDS), "head_layer",
                "distill.temperature", "distill.alpha", "distill.label_fraction", "distill.subset_seed",
                "distill.epochs", "distill.batch_size", "distill.optimizer", "distill.learning_rate",
                "distill.warmup_epochs", "distill.weight_decay", "distill.schedule", "eval_batch_size", *_LOOP),
}

# What a resumed pretraining run may change: how it reports, checkpoints and
# monitors, where the data lies, and num_train_steps (to extend a run). Any
# other field would continue a different run than the checkpoint holds.
RESUMABLE = ("data_dir", "download", "cache_dataset", "init_from", "num_train_steps", "knn_monitor",
             "eval_every_epochs", "test_split", "eval_batch_size", *_KNN, "log_every_steps",
             "checkpoint_every_steps", "keep_checkpoints", "nonfinite_policy", "write_pictures")


class ConfigError(UserError):
    """A config that cannot run, with what to set instead. main.py prints its
    message alone, without a traceback: the fix is in the message."""


def recipe_kind(config: ml_collections.ConfigDict) -> str:
    """'pretrain', or the evaluation protocol the config names."""
    if "protocol" not in config:
        return "pretrain"
    if config.protocol not in PROTOCOLS:
        _fail("protocol", config.protocol, f"choose one of {PROTOCOLS}")
    return config.protocol


def _fail(field: str, value, expected: str):
    raise ConfigError(f"config.{field}={value!r} is invalid: {expected}.")


def _leaves(config) -> set:
    return set(_flat(config.to_dict()))


def _check_field_set(config, kind: str) -> None:
    expected, present = set(FIELDS[kind]), _leaves(config)
    if missing := sorted(expected - present):
        raise ConfigError(f"the {kind} config lacks {missing}; start from a recipe in configs/ (they set "
                         "every field)")
    if extra := sorted(present - expected):
        raise ConfigError(f"config fields {extra} are not read by a {kind} run; remove them")


def _get(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Rules: field -> (holds(value), what to say when it does not).
_POSITIVE_INT = (lambda v: _is_int(v) and v > 0, "expected a positive integer")
_NONNEG_INT = (lambda v: _is_int(v) and v >= 0, "expected an integer >= 0")
_POSITIVE = (lambda v: _is_number(v) and v > 0, "expected > 0")
_NONNEG = (lambda v: _is_number(v) and v >= 0, "expected >= 0")
_BOOL = (lambda v: isinstance(v, bool), "expected True or False")
_NAME = (lambda v: isinstance(v, str) and bool(v), "expected a non-empty string")
_OPTIONAL_NAME = (lambda v: v is None or (isinstance(v, str) and bool(v)), "expected a string or None")
RULES: dict[str, tuple[Callable, str]] = {
    "dataset": _NAME, "data_dir": _OPTIONAL_NAME, "download": _BOOL, "train_split": _NAME,
    "test_split": _NAME, "cache_dataset": _BOOL, "seed": (_is_int, "expected an integer"),
    "image_size": _POSITIVE_INT, "shuffle_buffer_size": _POSITIVE_INT, "blur": _BOOL,
    "color_jitter_strength": (lambda v: _is_number(v) and v >= 0,
                              "expected >= 0 (0.5 for CIFAR, 1.0 for ImageNet)"),
    "model.depth": (lambda v: v in VALID_DEPTHS, f"choose one of {VALID_DEPTHS}"),
    "model.width_multiplier": _POSITIVE, "model.cifar_stem": _BOOL,
    "model.head_layers": _POSITIVE_INT, "model.proj_dim": _POSITIVE_INT,
    "model.variant": (lambda v: v in VARIANTS, f"choose one of {VARIANTS} ('official': google-research/simclr's "
                      "ResNet, a projection shortcut on the first block of every group)"),
    "model.sk_ratio": (lambda v: _is_number(v) and 0 <= v < 1,
                       "expected in [0, 1): 0 = no selective kernels, 0.0625 in SimCLR v2"),
    "model.se_ratio": (lambda v: _is_number(v) and 0 <= v < 1, "expected in [0, 1): 0 = no squeeze-excitation"),
    "model.remat": _BOOL,
    "dtype": (lambda v: v in DTYPES,
              f"choose one of {DTYPES}" + "; float16 needs loss scaling, which is not implemented: use "
              "bfloat16 (float32's range at half the memory, what TPUs and recent GPUs compute in)"),
    "batch_size": _POSITIVE_INT, "eval_batch_size": _POSITIVE_INT,
    "num_epochs": _NONNEG, "num_train_steps": (_is_int, "expected an integer (> 0 overrides num_epochs)"),
    "temperature": (lambda v: _is_number(v) and v > 0,
                    "the NT-Xent temperature must be > 0 (SimCLR uses 0.1-0.5)"),
    "loss_impl": (lambda v: v in LOSS_IMPLS, "choose 'auto', 'naive' or 'blockwise'"),
    "microbatches": (lambda v: _is_int(v) and v > 0,
                     "expected a positive integer (1 = the whole per-device batch at once)"),
    "memory.size": (lambda v: _is_int(v) and v >= 0,
                    "expected an integer >= 0: the number of queued negatives (0 = no memory; 65536 in SimCLR v2)"),
    "memory.momentum": (lambda v: _is_number(v) and 0 <= v < 1,
                        "expected in [0, 1): the moving average's momentum (0.999 in SimCLR v2)"),
    "optimizer.base_learning_rate": _POSITIVE,
    "optimizer.lr_scaling": (lambda v: v in ("linear", "sqrt"),
                             "choose 'linear' (base*B/256) or 'sqrt' (base*sqrt(B))"),
    "optimizer.warmup_epochs": _NONNEG, "optimizer.weight_decay": _NONNEG,
    "optimizer.momentum": (lambda v: _is_number(v) and 0 <= v < 1, "expected in [0, 1)"),
    "optimizer.trust_coefficient": _POSITIVE,
    "online_probe": _BOOL, "probe_learning_rate": _POSITIVE, "knn_monitor": _BOOL,
    "eval_every_epochs": (lambda v: _is_number(v) and v >= 0, "expected >= 0 (0 = only at the end)"),
    "knn.k": _POSITIVE_INT, "knn.temperature": (lambda v: _is_number(v) and v > 0, "expected > 0 (peers use 0.1)"),
    "log_every_steps": _POSITIVE_INT, "checkpoint_every_steps": _POSITIVE_INT, "keep_checkpoints": _POSITIVE_INT,
    "nonfinite_policy": (lambda v: v in ("stop", "skip"), "choose 'stop' or 'skip'"),
    "write_pictures": _BOOL,
    "init_from": (lambda v: v is None or (isinstance(v, str) and bool(v)),
                  "expected None or a path: a pretraining workdir or an official SimCLR TF2 checkpoint"),
    "pretrained": (lambda v: isinstance(v, str) and bool(v),
                   "set --config.pretrained=PRETRAIN_WORKDIR (a pretraining workdir)"),
    "checkpoint_step": (lambda v: _is_int(v) and v >= -1, "expected a step number, or -1 for the latest"),
    "protocol": _NAME, "random_init": _BOOL, "head_layer": _NONNEG_INT, "teacher_head_layer": _NONNEG_INT,
    "linear.epochs": _POSITIVE_INT, "linear.batch_size": _POSITIVE_INT, "linear.learning_rate": _POSITIVE,
    "linear.weight_decay": _NONNEG, "linear.standardize": _BOOL,
    "finetune.label_fraction": (lambda v: _is_number(v) and 0 < v <= 1,
                                "expected in (0, 1]: the fraction of the train split's labels (the paper "
                                "uses 0.01 and 0.1; 1.0 = all labels)"),
    "finetune.subset_seed": (_is_int, "expected an integer"), "finetune.subset_split": _OPTIONAL_NAME,
    "finetune.epochs": _POSITIVE, "finetune.batch_size": _POSITIVE_INT, "finetune.learning_rate": _POSITIVE,
    "finetune.weight_decay": _NONNEG,
    "finetune.schedule": (lambda v: v in SCHEDULES, f"choose one of {SCHEDULES}"),
    "teacher": (lambda v: isinstance(v, str) and bool(v),
                "set --config.teacher=PATH: a fine-tuned network (the finetuned/ folder configs/finetune.py "
                "writes into its workdir) or an official fine-tuned SimCLR checkpoint"),
    "teacher_step": (lambda v: _is_int(v) and v >= -1, "expected a step number, or -1 for the latest"),
    "distill.temperature": (lambda v: _is_number(v) and v > 0,
                            "the distillation temperature must be > 0 (1.0 in the SimCLR v2 paper)"),
    "distill.alpha": (lambda v: _is_number(v) and v >= 0,
                      "expected >= 0: the supervised term's weight (0 = distillation alone)"),
    "distill.label_fraction": (lambda v: _is_number(v) and 0 < v <= 1,
                               "expected in (0, 1]: the labelled subset, as finetune.label_fraction"),
    "distill.subset_seed": (_is_int, "expected an integer"),
    "distill.epochs": _POSITIVE, "distill.batch_size": _POSITIVE_INT, "distill.learning_rate": _POSITIVE,
    "distill.warmup_epochs": _NONNEG, "distill.weight_decay": _NONNEG,
    "distill.optimizer": (lambda v: v in OPTIMIZERS, f"choose one of {OPTIMIZERS}"),
    "distill.schedule": (lambda v: v in SCHEDULES, f"choose one of {SCHEDULES}"),
}
# Evaluation configs may leave the architecture unset: it comes from the checkpoint
# (distillation's student from init_from or the teacher, head layers likewise).
_FROM_CHECKPOINT = {"image_size", *(f"model.{name}" for name in MODEL_FIELDS)}
_FROM_TEACHER = {*_FROM_CHECKPOINT, "head_layer", "teacher_head_layer"}


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
             num_processes: Optional[int] = None) -> str:
    """Raises ValueError on the first bad field; returns the recipe kind.

    Batch sizes must split evenly over ``num_devices`` and ``num_processes``
    (default: JAX's global device and process counts).
    """
    kind = recipe_kind(config)
    _check_field_set(config, kind)
    for field in FIELDS[kind]:
        value = _get(config, field)
        if value is None and field in (_FROM_TEACHER if kind == "distill" else
                                       _FROM_CHECKPOINT if kind != "pretrain" else ()):
            continue
        holds, expected = RULES[field]
        if not holds(value):
            _fail(field, value, expected)
    if kind == "pretrain":
        _check_pretrain(config)
    if kind == "supervised_head" and config.random_init:
        _fail("random_init", True, "a randomly initialised encoder has no trained supervised head to score")
    num_devices = num_devices or jax.device_count()
    _check_batch_sizes(config, kind, num_devices, num_processes or jax.process_count())
    if kind == "pretrain":
        _check_microbatches(config.batch_size, num_devices, config.microbatches)
        _check_memory_size(config.memory.size, config.batch_size)
    return kind


def resume_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{field: (saved value, new value)} of the fields ``RESUMABLE`` allows to
    differ between ``saved`` (the run's config.json, as a dict) and ``config``;
    a ConfigError naming every other difference with both values. Fields only
    one side has (a run from an older version) are not compared."""
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    changed = {f: (old[f], new[f]) for f in sorted(old.keys() & new.keys()) if old[f] != new[f]}
    refused = [f"{f}={a!r} (now {b!r})" for f, (a, b) in changed.items() if f not in RESUMABLE]
    if refused:
        raise ConfigError(
            "this workdir holds a run trained with other settings: " + ", ".join(refused) + "; resume with "
            "the run's values (its config.json), or give the new run another --workdir. A resume may change "
            "only " + ", ".join(RESUMABLE) + ".")
    return changed


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _check_pretrain(config) -> None:
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        _fail("num_epochs", config.num_epochs, "set num_epochs > 0 or num_train_steps > 0")
    check_image_size(config.image_size, config.model.cifar_stem)


def check_image_size(image_size: int, cifar_stem: bool) -> None:
    """The ImageNet stem halves the resolution five times, the CIFAR stem three."""
    downsampling = 8 if cifar_stem else 32
    if image_size < downsampling:
        stem = "CIFAR" if cifar_stem else "ImageNet"
        _fail("image_size", image_size, f"the {stem}-stem ResNet downsamples by {downsampling}, so the crop "
              f"must be at least {downsampling}x{downsampling} pixels")


def _check_microbatches(batch_size: int, num_devices: int, microbatches: int) -> None:
    """Each device splits its share of the batch into ``microbatches`` equal chunks."""
    per_device = batch_size // num_devices
    if per_device % microbatches:
        _fail("microbatches", microbatches,
              f"each of the {num_devices} devices gets batch_size {batch_size} / {num_devices} = {per_device} "
              f"images, which do not split into {microbatches} equal chunks; set microbatches to a divisor "
              f"of {per_device}")


def _check_memory_size(size: int, batch_size: int) -> None:
    """The queue holds whole steps of keys: 2 * batch_size per step."""
    if size % (2 * batch_size):
        whole = max(1, round(size / (2 * batch_size))) * 2 * batch_size
        _fail("memory.size", size, f"the queue holds whole steps of keys, 2 x batch_size = {2 * batch_size} per "
              f"step; set a multiple of {2 * batch_size}, e.g. {whole}")


def _check_batch_sizes(config, kind: str, num_devices: int, num_processes: int) -> None:
    fields = {"pretrain": ("batch_size", "eval_batch_size"), "linear_eval": ("eval_batch_size", "linear.batch_size"),
              "finetune": ("eval_batch_size", "finetune.batch_size"),
              "distill": ("eval_batch_size", "distill.batch_size")}.get(kind, ("eval_batch_size",))
    for field in fields:
        try:
            sharding.check_batch_size(_get(config, field), num_devices, num_processes, field)
        except ValueError as e:
            raise ConfigError(str(e)) from None
