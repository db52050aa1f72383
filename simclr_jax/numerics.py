"""Small numeric helpers every protocol shares: unit rows and standardised features."""
import jax
import jax.numpy as jnp
from jax import lax


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scales each row to unit length (zero rows stay zero)."""
    norm_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(norm_sq, eps))


def standardization(mean, std, constant) -> dict:
    """{'mean', 'inv_std'} per feature dimension. Constant dimensions (dead
    ReLUs are exactly 0) keep scale 1: dividing by a rounding-error std
    would blow up test values."""
    return {"mean": mean, "inv_std": 1.0 / jnp.where(constant | (std == 0), 1.0, std)}


def standardize(features, stats: dict):
    """(features - mean) * inv_std, or the features themselves for ``stats={}``.
    An affine map: a linear classifier on standardised features is still one
    linear classifier on the features, and one learning rate suits any encoder
    (raw h spans orders of magnitude between encoders)."""
    if not stats:
        return features
    return (features - stats["mean"]) * stats["inv_std"]
