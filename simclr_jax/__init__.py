"""SimCLR in JAX/Flax: the public API.

- Loss: ``nt_xent`` (and ``nt_xent_blockwise``, the same in column blocks)
  over two views' projections, negatives gathered from every device.
- Augmentations: ``train_view`` and ``eval_view``, TensorFlow ops a user's
  own tf.data pipeline can map over images.
- Models: ``ResNet`` (the encoder f), ``ProjectionHead`` (g) and ``SimCLR``
  (both), Flax modules.
- Optimisation: ``lars`` and the warm-up + cosine ``schedule``, optax.
- Pretrained encoders: ``load_encoder`` (our workdirs, official SimCLR
  checkpoints and torchvision ResNet state_dicts in safetensors) giving an
  ``Encoder``; ``export_saved_model`` writes one in the official TF2 format,
  ``export_torchvision`` as a torchvision state_dict (docs/pytorch.md).

Each name is imported on first use, so ``import simclr_jax`` stays light and
the JAX-only names (loss, models, optimisation) never load TensorFlow.
"""
import importlib

_SOURCES = {
    "nt_xent": "simclr_jax.pretraining.losses",
    "nt_xent_blockwise": "simclr_jax.pretraining.losses",
    "train_view": "simclr_jax.data.augment",
    "eval_view": "simclr_jax.data.augment",
    "ResNet": "simclr_jax.models",
    "ProjectionHead": "simclr_jax.models",
    "SimCLR": "simclr_jax.models",
    "lars": "simclr_jax.optim",
    "schedule": "simclr_jax.optim",
    "Encoder": "simclr_jax.encoder",
    "load_encoder": "simclr_jax.encoder",
    "export_saved_model": "simclr_jax.weights.official_export",
    "export_torchvision": "simclr_jax.weights.torchvision",
}
__all__ = sorted(_SOURCES)


def __getattr__(name):
    if name in _SOURCES:
        return getattr(importlib.import_module(_SOURCES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
