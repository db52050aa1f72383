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

Two forms compute the same numbers. The naive one materialises each device's
[2n, 2N] logits (and its backward pass the softmax of the same size), so its
memory grows with the square of the batch. The blockwise one scans over
column blocks of the candidates with a running log-sum-exp and recomputes the
blocks in its backward pass, so it never holds more than a [2n, block_size]
tile. ``nt_xent(impl='auto')`` picks the blockwise form above
``BLOCKWISE_MIN_COLUMNS`` global candidates.

SimCLR v2's memory adds ``negatives``: more candidate rows (a queue of
earlier batches' key projections, see memory.py), never anyone's positive,
appended to every anchor's 2N - 1. Only the first ``num_negatives`` count: a
queue that is still filling up masks its empty tail.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from simclr_jax.numerics import l2_normalize

# Stands in for -inf on the self-similarity entries: finite, so 0 * masked
# stays 0 in the entropy, and exp(masked - logsumexp) underflows to exactly 0.
_MASKED_LOGIT = -1e9

# 'auto' switches to the blockwise form when the global candidate count 2N
# exceeds this. Up to it every recipe here keeps its exact naive numbers
# (ImageNet's batch 4096 is 2N = 8192); past it the naive form's peak memory
# grows 4x per doubling of the batch and the blockwise one's 2x. The measured
# times and peaks are in docs/results.md ("NT-Xent memory"); benchmarks/loss.py
# re-measures them on any machine, so they are not copied here to go stale.
BLOCKWISE_MIN_COLUMNS = 8192

# Candidate columns per block of the blockwise form: large enough that each
# block is a matmul worth its loop step, small enough that a [2n, block] tile
# is a small fraction of the naive [2n, 2N] matrix.
DEFAULT_BLOCK_SIZE = 1024


def nt_xent(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float,
    axis_name: Optional[str] = None,
    impl: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    negatives: Optional[jax.Array] = None,
    num_negatives: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """NT-Xent over the two views' projections.

    Args:
      z1, z2: [n, d] projections of the first and second view of this device's
        n images (row i of z1 and row i of z2 are the positive pair).
      temperature: tau > 0.
      axis_name: mesh axis to gather negatives over (inside shard_map); None
        means this call sees the whole batch.
      impl: 'naive' (materialise the [2n, 2N] logits), 'blockwise' (see
        ``nt_xent_blockwise``) or 'auto': blockwise when the global number of
        candidates 2N exceeds ``BLOCKWISE_MIN_COLUMNS``, else naive.
      block_size: candidate columns per block of the blockwise form.
      negatives: optional [M, d] extra negatives, the same on every device
        (not normalised yet; no gradient is wanted through them).
      num_negatives: how many leading rows of ``negatives`` count (a scalar,
        may be traced); default all M.

    Returns:
      (loss, metrics): the loss L averaged over all 2N global anchors, and
      ``contrastive_acc`` (fraction of anchors whose positive has the highest
      similarity among the 2N - 1 (+ M) candidates) and ``contrastive_entropy``
      (mean entropy of each anchor's softmax over its candidates). Under
      ``axis_name`` all three are already averaged over devices.
    """
    _check_inputs(z1, z2, temperature, negatives)
    if impl == "auto":
        num_devices = 1 if axis_name is None else lax.axis_size(axis_name)
        num_columns = 2 * z1.shape[0] * num_devices + (0 if negatives is None else negatives.shape[0])
        impl = "blockwise" if num_columns > BLOCKWISE_MIN_COLUMNS else "naive"
    if impl == "blockwise":
        return nt_xent_blockwise(z1, z2, temperature, axis_name, block_size, negatives, num_negatives)
    if impl != "naive":
        raise ValueError(f"impl must be 'auto', 'naive' or 'blockwise', got {impl!r}")

    anchors, candidates, self_col, positive_col, num_valid = _anchors_and_candidates(
        z1, z2, axis_name, negatives, num_negatives)
    logits = anchors @ candidates.T / temperature  # [2n, 2N (+ M)]

    columns = jnp.arange(candidates.shape[0])
    masked = (columns[None, :] == self_col[:, None]) | (columns[None, :] >= num_valid)
    logits = jnp.where(masked, _MASKED_LOGIT, logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)

    loss = -jnp.mean(jnp.take_along_axis(log_probs, positive_col[:, None], axis=1))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == positive_col)
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
    return _mean_over_devices(loss, accuracy, entropy, axis_name)


def nt_xent_blockwise(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float,
    axis_name: Optional[str] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    negatives: Optional[jax.Array] = None,
    num_negatives: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """NT-Xent without the [2n, 2N] matrix: same arguments and results as ``nt_xent``.

    The log-sum-exp over candidates runs over blocks of ``block_size``
    columns, and the backward pass recomputes each block instead of storing
    the softmax, so memory is O(2n * block_size) instead of O(2n * 2N) at the
    cost of one more [2n, d] x [d, 2N] matmul. Gradients (through the
    all-gather under ``axis_name`` too) equal the naive form's.
    """
    _check_inputs(z1, z2, temperature, negatives)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    anchors, candidates, self_col, positive_col, num_valid = _anchors_and_candidates(
        z1, z2, axis_name, negatives, num_negatives)
    # Scaling the anchors rather than the logits keeps tau differentiable by
    # plain autodiff, outside the custom gradient.
    queries = anchors / temperature
    block_size = min(block_size, candidates.shape[0])
    cross_entropy, entropy, best_col = _blockwise_cross_entropy(
        queries, candidates, self_col, positive_col, num_valid, block_size
    )
    loss = jnp.mean(cross_entropy)
    accuracy = jnp.mean(best_col == positive_col)
    return _mean_over_devices(loss, accuracy, jnp.mean(entropy), axis_name)


def _check_inputs(z1: jax.Array, z2: jax.Array, temperature: float, negatives=None) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [n, d]; got {z1.shape} and {z2.shape}")
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != z1.shape[1]):
        raise ValueError(f"negatives must be [M, {z1.shape[1]}]; got {negatives.shape}")


def _anchors_and_candidates(z1, z2, axis_name, negatives=None, num_negatives=None):
    """Normalised local anchors [2n, d], global candidates [2N (+ M), d], each
    anchor's global self and positive column, and the number of leading
    candidate columns that count (the rest are an empty queue's tail)."""
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
    num_valid = 2 * num_global
    if negatives is not None:
        candidates = jnp.concatenate([candidates, l2_normalize(negatives.astype(jnp.float32))], axis=0)
        num_valid += negatives.shape[0] if num_negatives is None else num_negatives

    # Global column of each local row's own entry and of its positive: the
    # first view's row i is column offset + i, the second view's is N + offset + i.
    row = jnp.arange(2 * n)
    view = row // n
    image = offset + row % n
    self_col = view * num_global + image
    positive_col = (1 - view) * num_global + image
    return anchors, candidates, self_col, positive_col, num_valid


def _mean_over_devices(loss, accuracy, entropy, axis_name):
    metrics = {"contrastive_acc": accuracy, "contrastive_entropy": entropy}
    if axis_name is not None:
        loss = lax.pmean(loss, axis_name)
        metrics = lax.pmean(metrics, axis_name)
    return loss, metrics


def _candidate_blocks(candidates: jax.Array, block_size: int) -> jax.Array:
    """[2N, d] -> [num_blocks, d, block_size], zero-padded (padding is masked).

    Blocks are stored transposed, [d, block]: both matmuls that read them then
    contract over a leading dimension, which XLA:CPU ran faster than [block, d]
    (measure with benchmarks/loss.py; no difference expected on GPU/TPU).
    """
    num_columns, dim = candidates.shape
    num_blocks = -(-num_columns // block_size)
    padded = jnp.pad(candidates, ((0, num_blocks * block_size - num_columns), (0, 0)))
    return padded.reshape(num_blocks, block_size, dim).transpose(0, 2, 1)


def _block_logits(queries, block, start, self_col, num_valid):
    """[2n, block_size] logits of one [d, block_size] block, self and padding
    columns (and those from ``num_valid`` on) masked, and the block's global
    column indices."""
    logits = queries @ block
    columns = start + jnp.arange(block.shape[1])
    masked = (columns[None, :] == self_col[:, None]) | (columns[None, :] >= num_valid)
    return jnp.where(masked, _MASKED_LOGIT, logits), columns


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise_cross_entropy(queries, candidates, self_col, positive_col, num_valid, block_size):
    """Per anchor, for the softmax over its masked logits ``queries @ candidates.T``
    (the first ``num_valid`` columns but its own): the cross-entropy with its
    positive column, the entropy, and the column of the largest logit."""
    outputs, _ = _blockwise_forward(queries, candidates, self_col, positive_col, num_valid, block_size)
    return outputs


def _blockwise_forward(queries, candidates, self_col, positive_col, num_valid, block_size):
    blocks = _candidate_blocks(candidates, block_size)
    starts = jnp.arange(blocks.shape[0]) * block_size

    def step(carry, inputs):
        # Online softmax with m = running max: sum_exp = sum e^(l - m) and
        # sum_shifted = sum e^(l - m) (l - m) over the columns seen so far.
        # Raising m to m' scales both sums by e^(m - m'), and each old (l - m)
        # becomes (l - m') = (l - m) + (m - m').
        running_max, sum_exp, sum_shifted, positive, best_col = carry
        start, block = inputs
        logits, columns = _block_logits(queries, block, start, self_col, num_valid)
        block_max = jnp.max(logits, axis=1)
        new_max = jnp.maximum(running_max, block_max)
        rebase = running_max - new_max
        scale = jnp.exp(rebase)
        shifted = logits - new_max[:, None]
        exp_shifted = jnp.exp(shifted)
        sum_shifted = scale * (sum_shifted + rebase * sum_exp) + jnp.sum(exp_shifted * shifted, axis=1)
        sum_exp = scale * sum_exp + jnp.sum(exp_shifted, axis=1)
        # Taken from the same tile as the max, so max - positive is exactly 0
        # when the positive wins, as in the naive log-softmax.
        is_positive = columns[None, :] == positive_col[:, None]
        positive = positive + jnp.sum(jnp.where(is_positive, logits, 0.0), axis=1)
        # Strictly greater: on ties the earlier column wins, as in jnp.argmax.
        best_col = jnp.where(block_max > running_max, start + jnp.argmax(logits, axis=1), best_col)
        return (new_max, sum_exp, sum_shifted, positive, best_col), None

    # Start from the masked value: finite, so 0 * (m - m') never makes a NaN;
    # every row has a real (unmasked) column, so it is always overtaken.
    # The zeros derive from queries so they carry its shard_map variance.
    zeros = jnp.zeros_like(queries[:, 0])
    init = (zeros + _MASKED_LOGIT, zeros, zeros, zeros, jnp.zeros_like(self_col))
    carry, _ = lax.scan(step, init, (starts, blocks))
    running_max, sum_exp, sum_shifted, positive, best_col = carry

    log_sum_exp = jnp.log(sum_exp)
    cross_entropy = (running_max - positive) + log_sum_exp  # lse - l_positive
    mean_shifted = sum_shifted / sum_exp  # E_p[l] - m
    entropy = log_sum_exp - mean_shifted  # lse - E_p[l]
    lse = running_max + log_sum_exp
    mean_logit = running_max + mean_shifted
    return (cross_entropy, entropy, best_col), (lse, mean_logit)


def _blockwise_fwd(queries, candidates, self_col, positive_col, num_valid, block_size):
    outputs, (lse, mean_logit) = _blockwise_forward(queries, candidates, self_col, positive_col, num_valid,
                                                    block_size)
    return outputs, (queries, candidates, self_col, positive_col, num_valid, lse, mean_logit)


def _blockwise_bwd(block_size, residuals, cotangents):
    """Recomputes each block's softmax p and pulls the cotangents back.

    d cross_entropy / d l_j = p_j - [j is the positive] and
    d entropy / d l_j = -p_j (l_j - E_p[l]); with l = queries @ candidates.T,
    the logit cotangent g gives d queries = g @ candidates and
    d candidates = g.T @ queries. The one-hot part touches one column per row,
    so it is applied once, outside the scan.
    """
    queries, candidates, self_col, positive_col, num_valid, lse, mean_logit = residuals
    cross_entropy_bar, entropy_bar, _ = cotangents
    num_columns = candidates.shape[0]
    blocks = _candidate_blocks(candidates, block_size)
    starts = jnp.arange(blocks.shape[0]) * block_size

    def step(queries_bar, inputs):
        start, block = inputs
        logits, _ = _block_logits(queries, block, start, self_col, num_valid)
        probs = jnp.exp(logits - lse[:, None])  # masked columns: exactly 0
        logits_bar = probs * (
            cross_entropy_bar[:, None] - entropy_bar[:, None] * (logits - mean_logit[:, None])
        )
        return queries_bar + logits_bar @ block.T, queries.T @ logits_bar  # [d, block]

    queries_bar, block_bars = lax.scan(step, jnp.zeros_like(queries), (starts, blocks))
    candidates_bar = block_bars.transpose(0, 2, 1).reshape(-1, candidates.shape[1])[:num_columns]
    queries_bar = queries_bar - cross_entropy_bar[:, None] * candidates[positive_col]
    candidates_bar = candidates_bar.at[positive_col].add(-cross_entropy_bar[:, None] * queries)
    return queries_bar, candidates_bar, None, None, None


_blockwise_cross_entropy.defvjp(_blockwise_fwd, _blockwise_bwd)
