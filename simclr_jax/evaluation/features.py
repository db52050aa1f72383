"""Numeric cores of evaluation on features already extracted from the encoder.

Everything here takes features h as numpy or jax arrays and imports neither
TensorFlow nor the model, so it runs anywhere JAX does and can be tested on
tiny hand-made inputs:

- top-k correctness and accuracy of a score matrix;
- the weighted kNN monitor (InstDisc, solo-learn, lightly): k = 200, T = 0.1,
  cosine similarity;
- a linear probe (one dense layer, softmax cross-entropy, Nesterov SGD with
  cosine decay) trained on cached features;
- class-balanced label subsets for the 1% / 10% semi-supervised settings.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from simclr_jax.pretraining.losses import l2_normalize

NORMALIZE_MODES = ("standardize", "l2", "none")


# --------------------------------------------------------------------------- top-k

def topk_correct(scores, labels, ks=(1, 5)) -> dict[int, jax.Array]:
    """Per-example booleans: is the label among the k highest scores?

    Ties are broken as ``lax.top_k`` breaks them (the lower class index ranks
    first), so top-1 agrees with argmax. A k at or above the number of classes
    is capped to it, which makes that top-k trivially all True (e.g. top-5 with
    2 classes).
    """
    scores = jnp.asarray(scores)
    labels = jnp.asarray(labels)
    num_classes = scores.shape[-1]
    _, top = lax.top_k(scores, min(max(ks), num_classes))  # [n, kmax]
    hits = top == labels[:, None]
    return {k: jnp.any(hits[:, :min(k, num_classes)], axis=1) for k in ks}


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict[str, float]:
    """{'top1': ..., 'top5': ...}: fractions of examples correct at each k."""
    correct = topk_correct(scores, labels, ks)
    return {f"top{k}": float(np.mean(np.asarray(c))) for k, c in correct.items()}


def _check_labels(labels, num_classes: int) -> np.ndarray:
    """Labels as int32, checked: an out-of-range label would be silently dropped
    by a JAX scatter or gather instead of failing."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int32)


# --------------------------------------------------------------------------- kNN

@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_batch(bank, bank_labels, queries, temperature, *, num_classes, k):
    """Class scores [b, C] for one block of queries against the whole bank.

    ``bank`` is already l2-normalised; only a [b, N] similarity block is live.
    """
    sims = l2_normalize(queries.astype(jnp.float32)) @ bank.T  # [b, N]
    top_sims, top_idx = lax.top_k(sims, k)  # [b, k]
    weights = jnp.exp(top_sims / temperature)
    rows = jnp.arange(queries.shape[0])[:, None]
    scores = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
    return scores.at[rows, bank_labels[top_idx]].add(weights)


def knn_scores(train_features, train_labels, query_features, num_classes: int,
               k: int = 200, temperature: float = 0.1,
               query_batch_size: int = 1024) -> np.ndarray:
    """Weighted-kNN class scores [Q, C] of each query against the training bank.

    Cosine similarity (both sides l2-normalised); each of the k most similar
    training examples votes for its label with weight exp(sim / temperature).
    k is capped at the bank size. Queries run in fixed-size blocks (the last
    one zero-padded, so one compilation serves all) to bound memory by a
    [query_batch_size, N] block: 10k queries x 50k bank never forms [Q, N].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train_labels = _check_labels(train_labels, num_classes)
    query_features = np.asarray(query_features, np.float32)
    num_queries = query_features.shape[0]
    if num_queries == 0:
        return np.zeros((0, num_classes), np.float32)

    bank = l2_normalize(jnp.asarray(train_features, jnp.float32))
    bank_labels = jnp.asarray(train_labels)
    k = min(k, bank.shape[0])
    batch = min(query_batch_size, num_queries)
    num_batches = -(-num_queries // batch)
    padded = np.zeros((num_batches * batch, query_features.shape[1]), np.float32)
    padded[:num_queries] = query_features

    blocks = [
        np.asarray(_knn_batch(bank, bank_labels, padded[i * batch:(i + 1) * batch],
                              temperature, num_classes=num_classes, k=k))
        for i in range(num_batches)
    ]
    return np.concatenate(blocks)[:num_queries]


def knn_accuracy(train_features, train_labels, query_features, query_labels,
                 num_classes: int, k: int = 200, temperature: float = 0.1,
                 query_batch_size: int = 1024) -> dict[str, float]:
    """{'top1', 'top5'} of the weighted-kNN classifier (see ``knn_scores``)."""
    scores = knn_scores(train_features, train_labels, query_features, num_classes,
                        k=k, temperature=temperature, query_batch_size=query_batch_size)
    return topk_accuracy(scores, _check_labels(query_labels, num_classes))


# --------------------------------------------------------------------------- linear probe

def _preprocess(params, features):
    """The feature normalisation stored in the probe: optional l2, then affine."""
    x = jnp.asarray(features, jnp.float32)
    x = jnp.where(params["l2_normalize"], l2_normalize(x), x)
    return (x - params["mean"]) * params["inv_std"]


@jax.jit
def linear_probe_logits(params, features) -> jax.Array:
    """Logits [n, C] of a trained probe on raw features (it normalises them)."""
    x = _preprocess(params, features)
    return x @ params["kernel"] + params["bias"]


def _normalizer(features: jax.Array, normalize: str) -> dict:
    """Statistics of the chosen normalisation, from the training features only.

    'standardize' gives every dimension zero mean and unit variance, so one
    learning rate suits any encoder (random-init features are orders of
    magnitude smaller than trained ones). Constant dimensions (dead ReLUs are
    exactly 0) keep scale 1: dividing by a rounding-error std would blow up
    test values. 'l2' rescales each example to unit length; 'none' is the
    paper's raw h.
    """
    d = features.shape[1]
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    stats = {"l2_normalize": jnp.asarray(normalize == "l2"),
             "mean": jnp.zeros(d, jnp.float32), "inv_std": jnp.ones(d, jnp.float32)}
    if normalize == "standardize":
        mean = jnp.mean(features, axis=0)
        std = jnp.sqrt(jnp.mean(jnp.square(features - mean), axis=0))
        constant = jnp.max(features, axis=0) == jnp.min(features, axis=0)
        stats["mean"] = mean
        stats["inv_std"] = 1.0 / jnp.where(constant, 1.0, std)
    return stats


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size", "nesterov"))
def _fit(features, labels, key, learning_rate, momentum, weight_decay, *,
         num_classes, epochs, batch_size, nesterov):
    """The whole training run as one compiled program: scan over epochs, and
    inside each a scan over the minibatches of a fresh permutation. The float
    hyperparameters are traced, so a sweep over them compiles once."""
    n, d = features.shape
    steps_per_epoch = n // batch_size
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay, mask={"kernel": True, "bias": False}),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )
    # Zero init, as SimCLR's linear eval (zero_init_logits_layer): the problem
    # is convex, so the start only has to be deterministic.
    params = {"kernel": jnp.zeros((d, num_classes), jnp.float32),
              "bias": jnp.zeros((num_classes,), jnp.float32)}

    def loss_fn(p, x, y):
        logits = x @ p["kernel"] + p["bias"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def step(carry, idx):
        p, opt_state = carry
        grads = jax.grad(loss_fn)(p, features[idx], labels[idx])
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    def epoch(carry, epoch_index):
        order = jax.random.permutation(jax.random.fold_in(key, epoch_index), n)
        batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
        return lax.scan(step, carry, batches)[0], None

    (params, _), _ = lax.scan(epoch, (params, optimizer.init(params)), jnp.arange(epochs))
    return params


def train_linear_probe(train_features, train_labels, num_classes: int, *,
                       epochs: int = 100, batch_size: int = 256,
                       learning_rate: float = 0.1, momentum: float = 0.9,
                       nesterov: bool = True, weight_decay: float = 0.0,
                       normalize: str = "standardize", seed: int = 0) -> dict:
    """Trains a linear classifier on frozen features; returns its params.

    Softmax cross-entropy, SGD with Nesterov momentum, peak learning rate
    ``learning_rate * batch_size / 256`` (SimCLR's linear scaling) decayed by a
    cosine to 0 over all steps. Each epoch is a fresh permutation (from
    ``seed``) cut into full batches; the remainder is dropped that epoch (the
    batch is capped at the number of examples). Weight decay 0 by default, as
    in SimCLR's linear-eval command; it decays the kernel only.

    The params are {'kernel' [d, C], 'bias' [C]} plus the normalisation learnt
    from the training features ('l2_normalize', 'mean', 'inv_std'), so
    ``linear_probe_logits`` takes raw features.
    """
    features = jnp.asarray(train_features, jnp.float32)
    labels = jnp.asarray(_check_labels(train_labels, num_classes))
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need [n, d] features for n > 0 labels; got {features.shape}, {labels.shape}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    batch_size = min(batch_size, features.shape[0])
    stats = _normalizer(features, normalize)
    trained = _fit(
        _preprocess(stats, features), labels, jax.random.key(seed),
        learning_rate * batch_size / 256, momentum, weight_decay,
        num_classes=num_classes, epochs=epochs, batch_size=batch_size, nesterov=nesterov)
    return {**trained, **stats}


def evaluate_linear_probe(train_features, train_labels, test_features, test_labels,
                          num_classes: int, **kwargs) -> dict[str, float]:
    """{'top1', 'top5'} on the test features of a probe trained on the train
    features; ``kwargs`` go to ``train_linear_probe``."""
    params = train_linear_probe(train_features, train_labels, num_classes, **kwargs)
    logits = linear_probe_logits(params, test_features)
    return topk_accuracy(logits, _check_labels(test_labels, num_classes))


# --------------------------------------------------------------------------- label subsets

def balanced_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced fraction of the labelled examples.

    Per class present, round(fraction x class count) examples (halves round up,
    at least 1), drawn without replacement with numpy's default_rng(seed), so a
    seed fixes the subset. SimCLR's ImageNet 1% / 10% subsets are fixed lists
    shipped with the paper; this draws an analogous one for any dataset.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = max(1, int(np.floor(fraction * len(members) + 0.5)))
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
