"""A linear classifier on features extracted once: the evaluator and its core.

Features h of eval views (no augmentation) are computed once; each dimension
is standardised with the train features' statistics (one learning rate then
suits any encoder: random-init features are orders of magnitude smaller than
trained ones), and a linear classifier trains on them with the paper's
linear-evaluation optimiser (softmax cross-entropy, Nesterov SGD at
learning_rate x B/256 decayed by a cosine to 0). The whole run is one
compiled program, so this takes seconds where the paper's protocol
(classifier.py) sends augmented images through the encoder at every step.
It trains data parallel on features split over the mesh, as extracted.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from simclr_jax import numerics, optim, sharding
from simclr_jax.evaluation.features import FeatureEvaluator, ShardedFeatures, ShardedSplit
from simclr_jax.evaluation.metrics import check_labels, masked_topk_accuracy
from simclr_jax.sharding import DATA_AXIS as DATA


@jax.jit
def standardizer(features: jax.Array, valid: jax.Array) -> dict:
    """{'mean', 'inv_std'} per dimension of the training features, over the
    rows marked ``valid`` (padding rows of split features are not;
    numerics.standardization). On features split over the mesh each device
    reduces its rows and the partial sums are all-reduced."""
    keep, count = valid[:, None], jnp.sum(valid)
    mean = jnp.sum(jnp.where(keep, features, 0.0), axis=0) / count
    std = jnp.sqrt(jnp.sum(jnp.where(keep, jnp.square(features - mean), 0.0), axis=0) / count)
    constant = jnp.max(jnp.where(keep, features, -jnp.inf), axis=0) == jnp.min(jnp.where(keep, features, jnp.inf),
                                                                             axis=0)
    return numerics.standardization(mean, std, constant)


@jax.jit
def classifier_logits(params, features) -> jax.Array:
    """Logits [n, C] of a trained classifier on raw features (it standardises them)."""
    return numerics.standardize(jnp.asarray(features, jnp.float32), params) @ params["kernel"] + params["bias"]


@functools.partial(jax.jit, static_argnames=("mesh", "num_classes", "epochs", "batch_size"))
def _fit(features, row_labels, rows, stats, key, learning_rate, weight_decay, *, mesh, num_classes, epochs,
         batch_size):
    """The whole training run as one compiled program: scan over epochs, and
    inside each a scan over the minibatches of a fresh permutation of the n
    examples (``rows`` [n] says where each lives in ``features``). The float
    hyperparameters are traced, so a sweep over them compiles once.

    Data parallel over the mesh (jit of shard_map): every device draws the
    same minibatch, computes the loss of the examples it holds (standardised
    on the fly, so no second copy of the features), and the gradients are
    summed over devices; the replicated update then equals the whole-batch one."""
    n, d = rows.shape[0], features.shape[1]
    steps_per_epoch = n // batch_size

    def on_device(features, row_labels, rows, stats, key, learning_rate, weight_decay):
        optimizer = optim.create("momentum", optim.schedule(learning_rate, total_steps=epochs * steps_per_epoch),
                                 weight_decay=weight_decay, decay_mask={"kernel": True, "bias": False})
        # Zero init, as SimCLR's linear eval (zero_init_logits_layer): the problem
        # is convex, so the start only has to be deterministic.
        params = {"kernel": jnp.zeros((d, num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}
        local_rows = features.shape[0]

        def loss_fn(p, local, mine):  # examples held elsewhere weigh 0
            x = numerics.standardize(features[local], stats)
            losses = optax.softmax_cross_entropy_with_integer_labels(x @ p["kernel"] + p["bias"],
                                                                     jnp.maximum(row_labels[local], 0))
            return jnp.sum(jnp.where(mine, losses, 0.0)) / batch_size

        def step(carry, idx):
            p, opt_state = carry
            local = rows[idx] - lax.axis_index(DATA) * local_rows
            mine = (local >= 0) & (local < local_rows)
            # p is replicated and the loss varies by device, so shard_map hands
            # back this gradient already summed over devices: the whole batch's.
            grads = jax.grad(loss_fn)(p, jnp.clip(local, 0, local_rows - 1), mine)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), None

        def epoch(carry, epoch_index):
            order = jax.random.permutation(jax.random.fold_in(key, epoch_index), n)
            batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
            return lax.scan(step, carry, batches)[0], None

        (params, _), _ = lax.scan(epoch, (params, optimizer.init(params)), jnp.arange(epochs))
        return params

    return jax.shard_map(on_device, mesh=mesh, in_specs=(P(DATA), P(DATA), P(), P(), P(), P(), P()),
                         out_specs=P())(features, row_labels, rows, stats, key, learning_rate, weight_decay)


def train_sharded_classifier(features: ShardedSplit, num_classes: int, *, epochs: int, batch_size: int,
                             learning_rate: float, weight_decay: float, seed: int) -> dict:
    """Trains a linear classifier on frozen features split over the mesh; returns its params.

    Peak learning rate ``learning_rate * batch_size / 256`` (SimCLR's linear
    scaling), cosine to 0 over all steps. Each epoch is a fresh permutation
    (from ``seed``) cut into full batches; the remainder is dropped that epoch
    (the batch is capped at the number of examples). Weight decay applies to
    the kernel only. The params are {'kernel' [d, C], 'bias' [C]} plus the
    standardisation ('mean', 'inv_std'), so ``classifier_logits`` takes raw
    features. The features never leave their devices.
    """
    labels = check_labels(features.labels, num_classes)
    if features.x.ndim != 2 or len(features.rows) != len(labels) or len(labels) == 0:
        raise ValueError(f"need [n, d] features for n > 0 labels; got {features.x.shape} with "
                         f"{len(features.rows)} examples, {labels.shape} labels")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    batch_size = min(batch_size, len(labels))
    mesh, row_labels = features.mesh, features.row_labels()
    stats = standardizer(features.x, row_labels >= 0)
    rows = sharding.put_replicated(np.asarray(features.rows, np.int32), mesh)
    trained = _fit(features.x, row_labels, rows, stats, jax.random.key(seed),
                   optim.peak_learning_rate(learning_rate, batch_size), weight_decay, mesh=mesh,
                   num_classes=num_classes, epochs=epochs, batch_size=batch_size)
    return {**trained, **stats}


def train_classifier(train_features, train_labels, num_classes: int, *, epochs: int, batch_size: int,
                     learning_rate: float, weight_decay: float, seed: int, mesh=None) -> dict:
    """``train_sharded_classifier`` on host features (the same on every
    process), placed on ``mesh`` (default: one local device)."""
    features, labels = np.asarray(train_features, np.float32), np.asarray(train_labels)
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need [n, d] features for n > 0 labels; got {features.shape}, {labels.shape}")
    mesh = sharding.make_mesh(jax.local_devices()[:1]) if mesh is None else mesh
    return train_sharded_classifier(ShardedSplit.from_numpy(features, labels, mesh), num_classes, epochs=epochs,
                                    batch_size=batch_size, learning_rate=learning_rate,
                                    weight_decay=weight_decay, seed=seed)


class CachedLinearEvaluator(FeatureEvaluator):
    """A linear classifier trained on the train split's cached features
    (``config.linear``) and scored on the test split's."""

    name = "cached_linear"

    def __init__(self, model, config, mesh, head_layer: int = 0):
        super().__init__(model, config, mesh, head_layer)
        self.settings, self.seed = config.linear, config.seed

    def _score(self, features: ShardedFeatures) -> dict[str, float]:
        s, start = self.settings, time.perf_counter()
        logging.info("%s: training the classifier, %d epochs over %d features in one compiled program", self.name,
                     s.epochs, len(features.train.labels))
        params = jax.block_until_ready(train_sharded_classifier(
            features.train, self.num_classes, epochs=s.epochs, batch_size=s.batch_size,
            learning_rate=s.learning_rate, weight_decay=s.weight_decay, seed=self.seed))
        logging.info("%s: classifier trained (%d epochs, %.1f s)", self.name, s.epochs, time.perf_counter() - start)
        check_labels(features.test.labels, self.num_classes)
        return masked_topk_accuracy(classifier_logits(params, features.test.x), features.test.row_labels())
