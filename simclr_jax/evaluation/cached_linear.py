"""A linear classifier on features extracted once: the evaluator and its core.

Features h of eval views (no augmentation) are computed once; each dimension
is standardised with the train features' statistics (one learning rate then
suits any encoder: random-init features are orders of magnitude smaller than
trained ones), and a linear classifier trains on them with the paper's
linear-evaluation optimiser (softmax cross-entropy, Nesterov SGD at
learning_rate x B/256 decayed by a cosine to 0). The whole run is one
compiled program, so this takes seconds where the paper's protocol
(classifier.py) sends augmented images through the encoder at every step.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from simclr_jax.data import sources
from simclr_jax.evaluation.features import FeatureExtractor, SplitFeatures
from simclr_jax.evaluation.metrics import check_labels, topk_accuracy

MOMENTUM = 0.9  # Nesterov, as the paper's linear evaluation


def standardizer(features: jax.Array) -> dict:
    """{'mean', 'inv_std'} per dimension of the training features. Constant
    dimensions (dead ReLUs are exactly 0) keep scale 1: dividing by a
    rounding-error std would blow up test values."""
    mean = jnp.mean(features, axis=0)
    std = jnp.sqrt(jnp.mean(jnp.square(features - mean), axis=0))
    constant = jnp.max(features, axis=0) == jnp.min(features, axis=0)
    return {"mean": mean, "inv_std": 1.0 / jnp.where(constant, 1.0, std)}


@jax.jit
def classifier_logits(params, features) -> jax.Array:
    """Logits [n, C] of a trained classifier on raw features (it standardises them)."""
    x = (jnp.asarray(features, jnp.float32) - params["mean"]) * params["inv_std"]
    return x @ params["kernel"] + params["bias"]


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _fit(features, labels, key, learning_rate, weight_decay, *, num_classes, epochs, batch_size):
    """The whole training run as one compiled program: scan over epochs, and
    inside each a scan over the minibatches of a fresh permutation. The float
    hyperparameters are traced, so a sweep over them compiles once."""
    n, d = features.shape
    steps_per_epoch = n // batch_size
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay, mask={"kernel": True, "bias": False}),
        optax.sgd(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch), momentum=MOMENTUM,
                  nesterov=True))
    # Zero init, as SimCLR's linear eval (zero_init_logits_layer): the problem
    # is convex, so the start only has to be deterministic.
    params = {"kernel": jnp.zeros((d, num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}

    def loss_fn(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["kernel"] + p["bias"], y))

    def step(carry, idx):
        p, opt_state = carry
        grads = jax.grad(loss_fn)(p, features[idx], labels[idx])
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    def epoch(carry, epoch_index):
        order = jax.random.permutation(jax.random.fold_in(key, epoch_index), n)
        return lax.scan(step, carry, order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size))[0], None

    (params, _), _ = lax.scan(epoch, (params, optimizer.init(params)), jnp.arange(epochs))
    return params


def train_classifier(train_features, train_labels, num_classes: int, *, epochs: int, batch_size: int,
                     learning_rate: float, weight_decay: float, seed: int) -> dict:
    """Trains a linear classifier on frozen features; returns its params.

    Peak learning rate ``learning_rate * batch_size / 256`` (SimCLR's linear
    scaling), cosine to 0 over all steps. Each epoch is a fresh permutation
    (from ``seed``) cut into full batches; the remainder is dropped that epoch
    (the batch is capped at the number of examples). Weight decay applies to
    the kernel only. The params are {'kernel' [d, C], 'bias' [C]} plus the
    standardisation ('mean', 'inv_std'), so ``classifier_logits`` takes raw
    features.
    """
    features = jnp.asarray(train_features, jnp.float32)
    labels = jnp.asarray(check_labels(train_labels, num_classes))
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need [n, d] features for n > 0 labels; got {features.shape}, {labels.shape}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    batch_size = min(batch_size, features.shape[0])
    stats = standardizer(features)
    trained = _fit((features - stats["mean"]) * stats["inv_std"], labels, jax.random.key(seed),
                   learning_rate * batch_size / 256, weight_decay, num_classes=num_classes, epochs=epochs,
                   batch_size=batch_size)
    return {**trained, **stats}


class CachedLinearEvaluator:
    """``run(variables)`` -> {'top1', 'top5', 'num_examples'} of a linear
    classifier trained on the train split's cached features (``config.linear``)
    and scored on the test split's."""

    name = "cached_linear"

    def __init__(self, model, config, mesh, head_layer: int = 0):
        self.features = FeatureExtractor(model, config, mesh, head_layer)
        self.num_classes = sources.num_classes(config.dataset, config.train_split, config.data_dir,
                                               download=config.download)
        self.settings, self.seed = config.linear, config.seed

    def score(self, features: SplitFeatures) -> dict[str, float]:
        s = self.settings
        params = train_classifier(features.train_x, features.train_y, self.num_classes, epochs=s.epochs,
                                  batch_size=s.batch_size, learning_rate=s.learning_rate,
                                  weight_decay=s.weight_decay, seed=self.seed)
        logits = classifier_logits(params, features.test_x)
        result = topk_accuracy(logits, check_labels(features.test_y, self.num_classes))
        return dict(result, num_examples=len(features.test_y))

    def run(self, variables) -> dict[str, float]:
        return self.score(self.features(variables))
