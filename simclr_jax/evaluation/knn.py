"""Weighted kNN on frozen features: the evaluator and its numeric core.

As InstDisc, solo-learn and lightly: cosine similarity, the k = 200 nearest
train images (the bank) vote for their label with weight exp(sim / T),
T = 0.1. The same ``KnnEvaluator`` serves the kNN recipe and pretraining's
kNN monitor.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from simclr_jax.data import sources
from simclr_jax.evaluation.features import FeatureExtractor, SplitFeatures
from simclr_jax.evaluation.metrics import check_labels, topk_accuracy
from simclr_jax.pretraining.losses import l2_normalize


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_block(bank, bank_labels, queries, temperature, *, num_classes, k):
    """Class scores [b, C] of one block of queries against the whole
    (l2-normalised) bank; only a [b, N] similarity block is live."""
    sims = l2_normalize(queries.astype(jnp.float32)) @ bank.T  # [b, N]
    top_sims, top_idx = lax.top_k(sims, k)  # [b, k]
    weights = jnp.exp(top_sims / temperature)
    rows = jnp.arange(queries.shape[0])[:, None]
    scores = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
    return scores.at[rows, bank_labels[top_idx]].add(weights)


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


class KnnEvaluator:
    """``run(variables)`` -> {'top1', 'top5', 'num_examples'} of weighted kNN
    (train split = bank, test split = queries) on the features of
    ``head_layer`` (0 = h), with ``config.knn``'s k and temperature.

    Built once; ``features`` and ``score`` are the two halves of ``run``, for
    callers that also want the features (the pictures).
    """

    name = "knn"

    def __init__(self, model, config, mesh, head_layer: int = 0):
        self.features = FeatureExtractor(model, config, mesh, head_layer)
        self.num_classes = sources.num_classes(config.dataset, config.train_split, config.data_dir,
                                               download=config.download)
        self.k, self.temperature = config.knn.k, config.knn.temperature

    def score(self, features: SplitFeatures) -> dict[str, float]:
        result = knn_accuracy(features.train_x, features.train_y, features.test_x, features.test_y,
                              self.num_classes, k=self.k, temperature=self.temperature)
        return dict(result, num_examples=len(features.test_y))

    def run(self, variables) -> dict[str, float]:
        return self.score(self.features(variables))
