"""Pretraining workdirs for evaluation tests, without pretraining.

``tiny_workdir(path)`` writes only the config.json that evaluation reads the
architecture from: the tiny test architecture (ResNet-18 at width 1/16 with
the CIFAR stem, a 2-layer head, proj_dim 128) at 16 px. Evaluating it with
``config.random_init=True`` needs no checkpoint.
"""
import ml_collections

from configs import smoke
from simclr_jax import checkpoint

IMAGE_SIZE = 16
WIDTH_MULTIPLIER = 1 / 16


def tiny_pretrain_config(**model_overrides) -> ml_collections.ConfigDict:
    """configs/smoke.py at 16 px and width 1/16; ``model_overrides`` set model.* fields."""
    config = smoke.get_config()
    config.image_size = IMAGE_SIZE
    config.model.width_multiplier = WIDTH_MULTIPLIER
    for name, value in model_overrides.items():
        if name not in config.model:
            raise KeyError(f"no model field {name!r}")
        config.model[name] = value
    return config


def tiny_workdir(path, **model_overrides) -> str:
    """Writes ``path``/config.json of the tiny architecture; returns ``path`` as a str."""
    path = str(path)
    checkpoint.write_run_config(path, tiny_pretrain_config(**model_overrides))
    return path
