"""Weighted kNN on frozen features: the evaluator and its numeric core.

As InstDisc, solo-learn and lightly: cosine similarity, the k = 200 nearest
train images (the bank) vote for their label with weight exp(sim / T),
T = 0.1. The same ``KnnEvaluator`` serves the kNN recipe and pretraining's
kNN monitor. It reads features split over the mesh (``sharded_knn_scores``):
each device searches its own bank rows, and only the per-device top-k
candidates travel. ``knn_scores`` is the single-device form, on host arrays.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from simclr_jax.data import sources
from simclr_jax.evaluation.features import FeatureEvaluator, ShardedFeatures, ShardedSplit
from simclr_jax.evaluation.metrics import check_labels, masked_topk_accuracy, topk_accuracy
from simclr_jax.numerics import l2_normalize
from simclr_jax.sharding import DATA_AXIS as DATA


def _vote(top_sims, top_labels, temperature, num_classes: int) -> jax.Array:
    """Class scores [b, C]: each neighbour adds exp(sim / T) to its label."""
    rows = jnp.arange(top_sims.shape[0])[:, None]
    scores = jnp.zeros((top_sims.shape[0], num_classes), jnp.float32)
    return scores.at[rows, top_labels].add(jnp.exp(top_sims / temperature))


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_block(bank, bank_labels, queries, temperature, *, num_classes, k):
    """Class scores [b, C] of one block of queries against the whole
    (l2-normalised) bank; only a [b, N] similarity block is live."""
    sims = l2_normalize(queries.astype(jnp.float32)) @ bank.T  # [b, N]
    top_sims, top_idx = lax.top_k(sims, k)  # [b, k]
    return _vote(top_sims, bank_labels[top_idx], temperature, num_classes)


def knn_scores(train_features, train_labels, query_features, num_classes: int, k: int = 200,
               temperature: float = 0.1, query_batch_size: int = 1024) -> np.ndarray:
    """Weighted-kNN class scores [Q, C] of each query against the training bank.

    k is capped at the bank size. Queries run in fixed-size blocks (the last
    one zero-padded, so one compilation serves all) to bound memory by a
    [query_batch_size, N] block: 10k queries x 50k bank never forms [Q, N].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train_labels = check_labels(train_labels, num_classes)
    query_features = np.asarray(query_features, np.float32)
    num_queries = query_features.shape[0]
    if num_queries == 0:
        return np.zeros((0, num_classes), np.float32)
    bank = l2_normalize(jnp.asarray(train_features, jnp.float32))
    k = min(k, bank.shape[0])
    batch = min(query_batch_size, num_queries)
    num_batches = -(-num_queries // batch)
    padded = np.zeros((num_batches * batch, query_features.shape[1]), np.float32)
    padded[:num_queries] = query_features
    blocks = [np.asarray(_knn_block(bank, jnp.asarray(train_labels), padded[i * batch:(i + 1) * batch],
                                    temperature, num_classes=num_classes, k=k))
              for i in range(num_batches)]
    return np.concatenate(blocks)[:num_queries]


def knn_accuracy(train_features, train_labels, query_features, query_labels, num_classes: int,
                 k: int = 200, temperature: float = 0.1, query_batch_size: int = 1024) -> dict[str, float]:
    """{'top1', 'top5'} of the weighted-kNN classifier (see ``knn_scores``)."""
    scores = knn_scores(train_features, train_labels, query_features, num_classes, k=k,
                        temperature=temperature, query_batch_size=query_batch_size)
    return topk_accuracy(scores, check_labels(query_labels, num_classes))


@functools.partial(jax.jit, static_argnames=("mesh", "num_classes", "k", "block"))
def _sharded_scores(bank, bank_labels, queries, temperature, *, mesh, num_classes, k, block):
    """jit(shard_map): class scores [Rq, C], rows split as the queries' rows."""
    def on_device(bank, bank_labels, queries, temperature):
        # Each bank row's 1 / norm, applied to the similarities: no normalised copy of the bank.
        inv_norm = lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(bank.astype(jnp.float32)), axis=1), 1e-12))
        local_k = min(k, bank.shape[0])

        def one_block(mine):  # [block, d] of this device's queries
            everyone = l2_normalize(lax.all_gather(mine, DATA, tiled=True).astype(jnp.float32))
            sims = jnp.where(bank_labels >= 0, (everyone @ bank.T) * inv_norm, -jnp.inf)  # padding: never chosen
            sims, index = lax.top_k(sims, local_k)
            sims = lax.all_gather(sims, DATA, axis=1, tiled=True)  # [devices * block, devices * local_k]
            labels = lax.all_gather(bank_labels[index], DATA, axis=1, tiled=True)
            sims, best = lax.top_k(sims, k)
            scores = _vote(sims, jnp.take_along_axis(labels, best, axis=1), temperature, num_classes)
            return lax.dynamic_slice_in_dim(scores, lax.axis_index(DATA) * block, block)

        num_blocks = -(-queries.shape[0] // block)
        padded = jnp.pad(queries, ((0, num_blocks * block - queries.shape[0]), (0, 0)))
        scores = lax.map(one_block, padded.reshape(num_blocks, block, -1))
        return scores.reshape(-1, num_classes)[:queries.shape[0]]

    return jax.shard_map(on_device, mesh=mesh, in_specs=(P(DATA), P(DATA), P(DATA), P()),
                         out_specs=P(DATA))(bank, bank_labels, queries, temperature)


def sharded_knn_scores(bank: ShardedSplit, queries: ShardedSplit, num_classes: int, k: int = 200,
                       temperature: float = 0.1, query_batch_size: int = 1024) -> jax.Array:
    """``knn_scores`` on features split over the mesh: class scores [Rq, C],
    one per row of ``queries.x``, split as those rows (padding rows included).

    Each device scores a block of queries against its own bank rows and keeps
    its top-k (sims and labels); all devices' candidates are gathered and a
    final top-k picks the exact global k nearest, which then vote. The queries
    stay split like the bank: per block each device contributes
    query_batch_size / devices of its rows, the block is all-gathered (small)
    so every device sees the same queries, and each keeps the scores of its
    own. No device holds more than its bank rows, its queries and a
    [query_batch_size, bank rows / devices] similarity block: the bank is not
    normalised in a copy, its rows' inverse norms scale the similarities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_labels(bank.labels, num_classes)
    mesh = bank.mesh
    block = max(1, query_batch_size // mesh.shape[DATA])
    return _sharded_scores(bank.x, bank.row_labels(), queries.x, temperature, mesh=mesh, num_classes=num_classes,
                           k=min(k, len(bank.labels)), block=block)


def sharded_knn_accuracy(bank: ShardedSplit, queries: ShardedSplit, num_classes: int, k: int = 200,
                         temperature: float = 0.1, query_batch_size: int = 1024) -> dict[str, float]:
    """{'top1', 'top5'} of the weighted-kNN classifier (see ``sharded_knn_scores``)."""
    check_labels(queries.labels, num_classes)
    scores = sharded_knn_scores(bank, queries, num_classes, k=k, temperature=temperature,
                                query_batch_size=query_batch_size)
    return masked_topk_accuracy(scores, queries.row_labels())


class KnnEvaluator(FeatureEvaluator):
    """Weighted kNN (train split = bank, test split = queries) on the features
    of ``head_layer`` (0 = h), with ``config.knn``'s k and temperature."""

    name = "knn"

    def __init__(self, model, config, mesh, head_layer: int = 0):
        super().__init__(model, config, mesh, head_layer)
        self.k, self.temperature = config.knn.k, config.knn.temperature

    def _score(self, features: ShardedFeatures) -> dict[str, float]:
        return sharded_knn_accuracy(features.train, features.test, self.num_classes, k=self.k,
                                    temperature=self.temperature)


def monitors(config, model, mesh) -> list:
    """Pretraining's monitors (every ``eval_every_epochs``): this kNN on h when
    ``config.knn_monitor`` is on and the data has labels, so the number a run
    reports is the number the kNN recipe gives."""
    if not config.knn_monitor:
        return []
    _, _, info = sources.load_split(config.dataset, config.train_split, config.data_dir, download=config.download)
    return [KnnEvaluator(model, config, mesh)] if sources.label_classes(info) else []
