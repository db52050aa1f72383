"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR.

For 2N l2-normalised projections (two views of N images) and temperature tau,

    l(i, j) = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) )

with j the other view of i's image, and L is the mean of l over all 2N
anchors. The reference TF code reports the sum of both directions (2L); this
project reports L.

Under ``shard_map`` each device holds n = N/D images per view. With
``axis_name`` the projections of every device are all-gathered, so each local
anchor is contrasted with all 2N - 1 global candidates: the negatives do not
depend on how the batch is split. Each device computes only its own 2n rows of
the [2N, 2N] similarity matrix, and the gradient flows back through the
all-gather to the device that owns each projection.
"""
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

# Stands in for -inf on the self-similarity entries: finite, so 0 * masked
# stays 0 in the entropy, and exp(masked - logsumexp) underflows to exactly 0.
_MASKED_LOGIT = -1e9


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scales each row to unit length (zero rows stay zero)."""
    norm_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(norm_sq, eps))


def nt_xent(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float,
    axis_name: Optional[str] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """NT-Xent over the two views' projections.

    Args:
      z1, z2: [n, d] projections of the first and second view of this device's
        n images (row i of z1 and row i of z2 are the positive pair).
      temperature: tau > 0.
      axis_name: mesh axis to gather negatives over (inside shard_map); None
        means this call sees the whole batch.

    Returns:
      (loss, metrics): the loss L averaged over all 2N global anchors, and
      ``contrastive_acc`` (fraction of anchors whose positive has the highest
      similarity among the 2N - 1 candidates) and ``contrastive_entropy``
      (mean entropy of each anchor's softmax over its candidates). Under
      ``axis_name`` all three are already averaged over devices.
    """
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [n, d]; got {z1.shape} and {z2.shape}")

    n = z1.shape[0]
    z1 = l2_normalize(z1.astype(jnp.float32))
    z2 = l2_normalize(z2.astype(jnp.float32))
    anchors = jnp.concatenate([z1, z2], axis=0)  # [2n, d]: local rows

    if axis_name is None:
        all_z1, all_z2, offset = z1, z2, 0
    else:
        all_z1 = lax.all_gather(z1, axis_name, tiled=True)  # [N, d]
        all_z2 = lax.all_gather(z2, axis_name, tiled=True)
        offset = lax.axis_index(axis_name) * n
    num_global = all_z1.shape[0]
    candidates = jnp.concatenate([all_z1, all_z2], axis=0)  # [2N, d]

    logits = anchors @ candidates.T / temperature  # [2n, 2N]

    # Global column of each local row's own entry and of its positive: the
    # first view's row i is column offset + i, the second view's is N + offset + i.
    row = jnp.arange(2 * n)
    view = row // n
    image = offset + row % n
    self_col = view * num_global + image
    positive_col = (1 - view) * num_global + image

    columns = jnp.arange(2 * num_global)
    logits = jnp.where(columns[None, :] == self_col[:, None], _MASKED_LOGIT, logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)

    loss = -jnp.mean(jnp.take_along_axis(log_probs, positive_col[:, None], axis=1))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == positive_col)
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))

    metrics = {"contrastive_acc": accuracy, "contrastive_entropy": entropy}
    if axis_name is not None:
        loss = lax.pmean(loss, axis_name)
        metrics = lax.pmean(metrics, axis_name)
    return loss, metrics
