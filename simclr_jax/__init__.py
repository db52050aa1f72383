"""SimCLR in JAX/Flax.

``simclr_jax.load_encoder(workdir)`` restores a pretrained encoder for user
code (see simclr_jax/encoder.py). It is imported on first use, so
importing the package, or modules that must run without TensorFlow (models,
pretraining.step, losses, optim, sharding), stays light.
"""

__all__ = ["Encoder", "load_encoder"]


def __getattr__(name):
    if name in __all__:
        from simclr_jax import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
