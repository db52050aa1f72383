"""Checks a pretraining config before anything is loaded or compiled.

Each failure is one ValueError that names the field, the bad value and what
to set instead, so a mistake costs seconds rather than a compile.
"""
import ml_collections

_VALID_DEPTHS = (18, 34, 50, 101, 152, 200)
_VALID_DTYPES = ("float32", "bfloat16", "float16")


def _fail(field: str, value, expected: str):
    raise ValueError(f"config.{field}={value!r} is invalid: {expected}.")


def _positive_int(config, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(field, value, "expected a positive integer")


def validate_pretrain_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError on the first invalid field of a pretraining config."""
    for field in ("batch_size", "image_size", "log_every_steps", "checkpoint_every_steps",
                  "keep_checkpoints", "shuffle_buffer_size", "eval_batch_size", "knn.k"):
        _positive_int(config, field)

    if not config.temperature > 0:
        _fail("temperature", config.temperature, "the NT-Xent temperature must be > 0 (SimCLR uses 0.1-0.5)")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        _fail("num_epochs", config.num_epochs, "set num_epochs > 0 or num_train_steps > 0")
    if not config.knn.temperature > 0:
        _fail("knn.temperature", config.knn.temperature, "expected > 0 (peers use 0.1)")
    if config.knn_every_epochs < 0:
        _fail("knn_every_epochs", config.knn_every_epochs, "expected >= 0 (0 = only at the end)")
    if config.loss_impl not in ("auto", "naive", "blockwise"):
        _fail("loss_impl", config.loss_impl, "choose 'auto', 'naive' or 'blockwise'")
    if config.get("nonfinite_policy", "stop") not in ("stop", "skip"):
        _fail("nonfinite_policy", config.nonfinite_policy, "choose 'stop' or 'skip'")
    if config.dtype not in _VALID_DTYPES:
        _fail("dtype", config.dtype, f"choose one of {_VALID_DTYPES}")
    if config.color_jitter_strength < 0:
        _fail("color_jitter_strength", config.color_jitter_strength, "expected >= 0 (0.5 for CIFAR, 1.0 for ImageNet)")

    model = config.model
    if model.depth not in _VALID_DEPTHS:
        _fail("model.depth", model.depth, f"choose one of {_VALID_DEPTHS}")
    if not model.width_multiplier > 0:
        _fail("model.width_multiplier", model.width_multiplier, "expected > 0")
    if not config.probe_learning_rate > 0:
        _fail("probe_learning_rate", config.probe_learning_rate, "expected > 0")
    _positive_int(config, "model.head_layers")
    _positive_int(config, "model.proj_dim")

    # The ImageNet stem halves the resolution five times, the CIFAR stem three.
    downsampling = 8 if model.cifar_stem else 32
    if config.image_size < downsampling:
        stem = "CIFAR" if model.cifar_stem else "ImageNet"
        _fail("image_size", config.image_size,
              f"the {stem}-stem ResNet downsamples by {downsampling}, so the crop must be at least "
              f"{downsampling}x{downsampling} pixels")

    opt = config.optimizer
    if opt.lr_scaling not in ("linear", "sqrt"):
        _fail("optimizer.lr_scaling", opt.lr_scaling, "choose 'linear' (base*B/256) or 'sqrt' (base*sqrt(B))")
    if not opt.base_learning_rate > 0:
        _fail("optimizer.base_learning_rate", opt.base_learning_rate, "expected > 0")
    if opt.weight_decay < 0:
        _fail("optimizer.weight_decay", opt.weight_decay, "expected >= 0")
    if opt.warmup_epochs < 0:
        _fail("optimizer.warmup_epochs", opt.warmup_epochs, "expected >= 0")
    if not 0 <= opt.momentum < 1:
        _fail("optimizer.momentum", opt.momentum, "expected in [0, 1)")
