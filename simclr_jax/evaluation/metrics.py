"""Top-k accuracy of class scores, and the label check every evaluator shares."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def topk_correct(scores, labels, ks=(1, 5)) -> dict[int, jax.Array]:
    """Per-example booleans: is the label among the k highest scores?

    Ties are broken as ``lax.top_k`` breaks them (the lower class index ranks
    first), so top-1 agrees with argmax. A k at or above the number of classes
    is capped to it, which makes that top-k trivially all True (e.g. top-5 with
    2 classes).
    """
    scores, labels = jnp.asarray(scores), jnp.asarray(labels)
    num_classes = scores.shape[-1]
    _, top = lax.top_k(scores, min(max(ks), num_classes))  # [n, kmax]
    hits = top == labels[:, None]
    return {k: jnp.any(hits[:, :min(k, num_classes)], axis=1) for k in ks}


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict[str, float]:
    """{'top1': ..., 'top5': ...}: fractions of examples correct at each k."""
    correct = topk_correct(scores, labels, ks)
    return {f"top{k}": float(np.mean(np.asarray(c))) for k, c in correct.items()}


@functools.partial(jax.jit, static_argnames="ks")
def _masked_topk_counts(scores, labels, ks):
    correct = topk_correct(scores, labels, ks)
    return jnp.sum(labels >= 0), {k: jnp.sum(c) for k, c in correct.items()}


def masked_topk_accuracy(scores, labels, ks=(1, 5)) -> dict[str, float]:
    """``topk_accuracy`` over the rows whose label is >= 0: padding rows of
    features split over a mesh carry -1. Counts are summed where the rows
    live (the scores are never gathered), then divided exactly as the mean."""
    total, hits = _masked_topk_counts(scores, labels, tuple(ks))
    return {f"top{k}": int(hits[k]) / int(total) for k in ks}


def check_labels(labels, num_classes: int) -> np.ndarray:
    """Labels as int32, checked: an out-of-range label would be silently dropped
    by a JAX scatter or gather instead of failing."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int32)
