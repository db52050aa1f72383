"""kNN and the cached linear classifier on features split over 1, 2 and 8 devices.

Each is compared with an independent single-device computation on the same
features gathered to the host: today's ``knn.knn_scores`` (one device, whole
bank), and a dense copy of the linear classifier's original training loop.
The split features are laid out as extraction leaves them: rows scattered
over the devices and padding rows that would win if they were not masked.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from jax import lax

from simclr_jax import sharding
from simclr_jax.evaluation import cached_linear, knn, metrics, passes
from simclr_jax.evaluation.features import ShardedSplit

DEVICE_COUNTS = (1, 2, 8)
NUM_CLASSES = 10


def _mesh(num_devices):
    return sharding.make_mesh(jax.devices()[:num_devices])


def _scattered(x, labels, mesh, bait, seed=0):
    """A ShardedSplit of (x, labels) at random rows, among padding rows that all hold ``bait``."""
    total = -(-(len(x) + 3) // mesh.size) * mesh.size  # at least three padding rows
    rows = np.random.default_rng(seed).permutation(total)[:len(x)]
    host = np.tile(np.asarray(bait, np.float32), (total, 1))
    host[rows] = x
    return ShardedSplit(sharding.put_rows(host, mesh), rows, np.asarray(labels))


def _data(seed, n, dim=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, NUM_CLASSES, size=n)


# --------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("num_devices", (2, 8))
def test_sharded_extraction_keeps_rows_on_devices_and_matches_the_gathered_features(num_devices):
    mesh = _mesh(num_devices)
    x, y = _data(0, 37, dim=4)
    dataset = tf.data.Dataset.from_tensor_slices({"image": x, "label": y}).batch(8)  # 4 full batches + 5 rows
    fn = jax.jit(lambda images: 2.0 * images)
    out, rows, labels = passes.map_sharded_batches(fn, dataset, mesh, 8)
    assert out.shape == (40, 4) and out.sharding.spec == sharding.batch_sharded(mesh).spec
    assert all(s.data.shape == (40 // num_devices, 4) for s in out.addressable_shards)
    want_x, want_y = passes.map_padded_batches(fn, dataset, mesh, 8)
    np.testing.assert_array_equal(sharding.take_rows(out, rows), want_x)
    np.testing.assert_array_equal(labels, want_y)
    np.testing.assert_array_equal(want_x, 2.0 * x)
    assert len(np.unique(rows)) == 37


# --------------------------------------------------------------------------- kNN

@pytest.mark.parametrize("num_devices", DEVICE_COUNTS)
@pytest.mark.parametrize("k", (7, 200))
def test_sharded_knn_equals_single_device_knn(num_devices, k):
    mesh = _mesh(num_devices)
    bank_x, bank_y = _data(1, 1000)
    query_x, query_y = _data(2, 203)
    # Padding rows equal to query 0: unmasked, they would be its nearest neighbours.
    bank = _scattered(bank_x, bank_y, mesh, bait=query_x[0], seed=3)
    queries = _scattered(query_x, query_y, mesh, bait=np.zeros(16), seed=4)
    scores = knn.sharded_knn_scores(bank, queries, NUM_CLASSES, k=k, query_batch_size=64)
    assert scores.sharding.spec == sharding.batch_sharded(mesh).spec
    got = sharding.take_rows(scores, queries.rows)
    want = knn.knn_scores(bank_x, bank_y, query_x, NUM_CLASSES, k=k, query_batch_size=64)
    print(num_devices, k, {"max_abs": float(np.max(np.abs(got - want))),
                           "max_rel": float(np.max(np.abs(got - want) / np.maximum(want, 1e-30)))})
    # The neighbours are the same, but not every bit: XLA's CPU dot rounds
    # differently for banks of other widths, and the sharded form scales the
    # dot by 1 / |bank row| instead of normalising a copy of the bank. The
    # similarities agree to a few float32 ulps (5e-7), so exp(s / T) to 5e-7 / T.
    np.testing.assert_allclose(got, want, rtol=5e-6, atol=0)
    np.testing.assert_array_equal(np.argmax(got, 1), np.argmax(want, 1))
    assert knn.sharded_knn_accuracy(bank, queries, NUM_CLASSES, k=k, query_batch_size=64) == \
        knn.knn_accuracy(bank_x, bank_y, query_x, query_y, NUM_CLASSES, k=k)


def test_sharded_knn_caps_k_at_the_bank_size():
    # 150 examples on 8 devices: each holds 19 rows, fewer than k.
    mesh = _mesh(8)
    bank_x, bank_y = _data(5, 150)
    query_x, query_y = _data(6, 20)
    bank = _scattered(bank_x, bank_y, mesh, bait=query_x[0])
    got = sharding.take_rows(knn.sharded_knn_scores(bank, ShardedSplit.from_numpy(query_x, query_y, mesh),
                                                    NUM_CLASSES, k=200, temperature=0.5), np.arange(20))
    np.testing.assert_allclose(got, knn.knn_scores(bank_x, bank_y, query_x, NUM_CLASSES, k=150, temperature=0.5),
                               rtol=5e-6)


# --------------------------------------------------------------------------- linear classifier

def _dense_reference(x, y, num_classes, *, epochs, batch_size, learning_rate, weight_decay, seed):
    """The cached linear classifier as it was before the features were split:
    whole-array statistics and a dense minibatch loop on one device."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    mean = jnp.mean(x, axis=0)
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=0))
    stats = {"mean": mean, "inv_std": 1.0 / jnp.where(jnp.max(x, 0) == jnp.min(x, 0), 1.0, std)}
    features = (x - stats["mean"]) * stats["inv_std"]
    n, d = x.shape
    steps = n // batch_size
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay, mask={"kernel": True, "bias": False}),
        optax.sgd(optax.cosine_decay_schedule(learning_rate * batch_size / 256, epochs * steps), momentum=0.9,
                  nesterov=True))
    params = {"kernel": jnp.zeros((d, num_classes)), "bias": jnp.zeros((num_classes,))}

    def loss_fn(p, xb, yb):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(xb @ p["kernel"] + p["bias"], yb))

    @jax.jit
    def fit(params):
        def step(carry, idx):
            p, state = carry
            updates, state = optimizer.update(jax.grad(loss_fn)(p, features[idx], y[idx]), state, p)
            return (optax.apply_updates(p, updates), state), None

        def epoch(carry, e):
            order = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), e), n)
            return lax.scan(step, carry, order[:steps * batch_size].reshape(steps, batch_size))[0], None

        return lax.scan(epoch, (params, optimizer.init(params)), jnp.arange(epochs))[0][0]

    return {**fit(params), **stats}


LINEAR = dict(epochs=3, batch_size=32, learning_rate=0.5, weight_decay=1e-3, seed=0)


@functools.lru_cache(maxsize=None)
def _linear_problem():
    train_x, train_y = _data(7, 1000)
    train_x[:, 3] = 0.0  # a dead ReLU: constant, keeps scale 1
    train_x = train_x + np.eye(16, dtype=np.float32)[train_y % 16] * 2  # learnable
    test_x, test_y = _data(8, 203)
    return train_x, train_y, test_x, test_y, _dense_reference(train_x, train_y, NUM_CLASSES, **LINEAR)


@pytest.mark.parametrize("num_devices", DEVICE_COUNTS)
def test_sharded_linear_classifier_equals_the_dense_one(num_devices):
    mesh = _mesh(num_devices)
    train_x, train_y, test_x, test_y, want = _linear_problem()
    # Huge padding rows: counted in the statistics or trained on, they would swamp them.
    train = _scattered(train_x, train_y, mesh, bait=np.full(16, 1e4), seed=9)
    test = _scattered(test_x, test_y, mesh, bait=np.zeros(16), seed=10)
    got = cached_linear.train_sharded_classifier(train, NUM_CLASSES, **LINEAR)
    diffs = {name: float(np.max(np.abs(np.asarray(got[name]) - np.asarray(want[name])))) for name in want}
    print(num_devices, diffs)
    # Float32 rounding of sums taken in another order, over 93 steps.
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(np.max(np.abs(np.asarray(got["kernel"])))) > 0.1  # it learned something
    logits = cached_linear.classifier_logits(got, test.x)
    want_accuracy = metrics.topk_accuracy(cached_linear.classifier_logits(want, test_x), test_y)
    assert metrics.masked_topk_accuracy(logits, test.row_labels()) == want_accuracy
