"""Every recipe checked in one place, before anything is loaded or compiled.

There are seven recipe kinds: pretraining (no ``protocol`` field), the
evaluation protocols ``knn``, ``cached_linear``, ``linear_eval``,
``finetune`` and ``supervised_head``, and SimCLR v2's distillation
(``distill``). Each kind has exactly the fields ``config_schema.KINDS``
declares for it (a missing or an extra field is an error, so no field is ever
read through a silent default and none is set without effect), and each field
the rule declared with it, the declarations the recipes are built from. Then
the checks across fields and devices (batch sizes, microbatches, the memory
queue, the crop against the stem). A failure is one ConfigError (a
ValueError) naming the field, the bad value and what to set.
"""
import json
from typing import Optional

import jax
import ml_collections

from simclr_jax import config_schema, sharding
from simclr_jax.config_schema import KINDS
from simclr_jax.errors import UserError

PROTOCOLS = tuple(kind for kind in KINDS if kind != "pretrain")
MODEL_FIELDS = tuple(name.split(".", 1)[1] for name in config_schema.ARCHITECTURE)  # what a checkpoint records
FIELDS = {kind: tuple(fields) for kind, fields in KINDS.items()}
# What a resumed run may change (config_schema.Field.resumable).
RESUMABLE = tuple(dict.fromkeys(name for fields in KINDS.values() for name, field in fields.items()
                                if field.resumable))


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


def _check_field_set(config, kind: str) -> None:
    expected, present = set(KINDS[kind]), set(config_schema.flatten(config.to_dict()))
    if missing := sorted(expected - present):
        raise ConfigError(f"the {kind} config lacks {missing}; start from a recipe in configs/ (they set "
                         "every field)")
    if extra := sorted(present - expected):
        raise ConfigError(f"config fields {extra} are not read by a {kind} run; remove them")


def _get(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
             num_processes: Optional[int] = None) -> str:
    """Raises ValueError on the first bad field; returns the recipe kind.

    Batch sizes must split evenly over ``num_devices`` and ``num_processes``
    (default: JAX's global device and process counts).
    """
    kind = recipe_kind(config)
    _check_field_set(config, kind)
    for name, field in KINDS[kind].items():
        value = _get(config, name)
        if not field.rule.holds(value):
            _fail(name, value, field.rule.expected)
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
    old, new = config_schema.flatten(saved), config_schema.flatten(json.loads(config.to_json_best_effort()))
    changed = {f: (old[f], new[f]) for f in sorted(old.keys() & new.keys()) if old[f] != new[f]}
    refused = [f"{f}={a!r} (now {b!r})" for f, (a, b) in changed.items() if f not in RESUMABLE]
    if refused:
        raise ConfigError(
            "this workdir holds a run trained with other settings: " + ", ".join(refused) + "; resume with "
            "the run's values (its config.json), or give the new run another --workdir. A resume may change "
            "only " + ", ".join(RESUMABLE) + ".")
    return changed


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
