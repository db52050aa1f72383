"""Evaluation cores (top-k, kNN, linear probe, label subsets) against references."""
import numpy as np
import pytest

from simclr_jax.data import input_pipeline
from simclr_jax.evaluation import cached_linear, knn, metrics


# --------------------------------------------------------------------------- top-k

def test_topk_on_hand_made_scores():
    scores = np.array([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # label 1 first
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 4 is 5th
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 5 is 6th
        [0.2, 0.2, 0.1, 0.0, 0.0, 0.0],   # tie: class 0 ranks before class 1
        [0.2, 0.2, 0.1, 0.0, 0.0, 0.0],
    ], np.float32)
    labels = np.array([1, 4, 5, 0, 1])
    correct = metrics.topk_correct(scores, labels, ks=(1, 2, 5))
    np.testing.assert_array_equal(correct[1], [True, False, False, True, False])
    np.testing.assert_array_equal(correct[2], [True, False, False, True, True])
    np.testing.assert_array_equal(correct[5], [True, True, False, True, True])
    assert metrics.topk_accuracy(scores, labels) == {"top1": 0.4, "top5": 0.8}


def test_topk_with_fewer_classes_than_k_is_trivially_correct():
    scores = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    labels = np.array([0, 0, 1])
    assert metrics.topk_accuracy(scores, labels) == pytest.approx({"top1": 1 / 3, "top5": 1.0})


# --------------------------------------------------------------------------- kNN

def reference_knn_scores(bank, bank_labels, queries, num_classes, k, temperature):
    """Weighted kNN one query at a time in float64 numpy."""
    bank = np.asarray(bank, np.float64)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = np.zeros((len(queries), num_classes))
    for i, q in enumerate(np.asarray(queries, np.float64)):
        sims = bank @ (q / np.linalg.norm(q))
        nearest = np.argsort(-sims)[:k]
        out[i] = np.bincount(bank_labels[nearest], np.exp(sims[nearest] / temperature),
                             minlength=num_classes)
    return out


def test_knn_separable_classes_are_all_correct():
    # Class c lives near the c-th axis of an 8-D space; so do its queries.
    rng = np.random.default_rng(0)
    num_classes, per_class = 6, 10
    train_y = np.repeat(np.arange(num_classes), per_class)
    train_x = np.eye(8)[train_y] + 0.05 * rng.normal(size=(len(train_y), 8))
    query_y = rng.integers(0, num_classes, size=40)
    query_x = 3.0 * np.eye(8)[query_y] + 0.1 * rng.normal(size=(40, 8))
    acc = knn.knn_accuracy(train_x, train_y, query_x, query_y, num_classes, k=20)
    assert acc == {"top1": 1.0, "top5": 1.0}


def test_knn_temperature_decides_a_known_case():
    # Three class-0 points at similarity 0.6 and one class-1 point at 0.8:
    # with k = 4 and T = 1 the majority wins (3e^0.6 = 5.47 > e^0.8 = 2.23),
    # with T = 0.1 the nearer point wins (3e^6 = 1210 < e^8 = 2981).
    bank = np.array([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [0.0, 1.0]], np.float32)
    labels = np.array([0, 0, 0, 1])
    query = np.array([[0.6, 0.8]], np.float32)
    warm = knn.knn_scores(bank, labels, query, 2, k=4, temperature=1.0)
    np.testing.assert_allclose(warm, [[3 * np.exp(0.6), np.exp(0.8)]], rtol=1e-5)
    cold = knn.knn_scores(bank, labels, query, 2, k=4, temperature=0.1)
    np.testing.assert_allclose(cold, [[3 * np.exp(6.0), np.exp(8.0)]], rtol=1e-5)
    assert knn.knn_accuracy(bank, labels, query, [1], 2, k=4, temperature=1.0)["top1"] == 0.0
    assert knn.knn_accuracy(bank, labels, query, [1], 2, k=4, temperature=0.1)["top1"] == 1.0


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (7, 0.1), (25, 0.5)])
def test_knn_scores_match_numpy_reference(k, temperature):
    rng = np.random.default_rng(k)
    bank = rng.normal(size=(60, 16)).astype(np.float32)
    bank_labels = rng.integers(0, 5, size=60)
    queries = rng.normal(size=(13, 16)).astype(np.float32)
    got = knn.knn_scores(bank, bank_labels, queries, 5, k=k, temperature=temperature)
    want = reference_knn_scores(bank, bank_labels, queries, 5, k, temperature)
    assert got.shape == (13, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_knn_k_larger_than_bank_uses_every_example():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(9, 4)).astype(np.float32)
    bank_labels = rng.integers(0, 3, size=9)
    queries = rng.normal(size=(5, 4)).astype(np.float32)
    got = knn.knn_scores(bank, bank_labels, queries, 3, k=200, temperature=0.2)
    np.testing.assert_allclose(got, reference_knn_scores(bank, bank_labels, queries, 3, 9, 0.2),
                               rtol=1e-5, atol=1e-6)


def test_knn_query_batching_does_not_change_scores():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(50, 8)).astype(np.float32)
    bank_labels = rng.integers(0, 4, size=50)
    queries = rng.normal(size=(23, 8)).astype(np.float32)
    whole = knn.knn_scores(bank, bank_labels, queries, 4, k=10)
    for batch in (1, 7, 23, 100):
        np.testing.assert_allclose(
            knn.knn_scores(bank, bank_labels, queries, 4, k=10, query_batch_size=batch),
            whole, rtol=1e-5)  # float32 sums of exp(sim / 0.1) in another order: 1.4e-6 seen in CI


def test_knn_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must be in"):
        knn.knn_scores(np.ones((3, 2)), np.array([0, 1, 3]), np.ones((1, 2)), 3)


# --------------------------------------------------------------------------- linear probe

def _blobs(rng, num_classes, per_class, dim, spread):
    centres = spread * rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


# The three tests below share one training shape (400 x 16, 4 classes, batch
# 32, 10 epochs), so the training program compiles once for all of them.
PROBE = {"epochs": 10, "batch_size": 32, "learning_rate": 0.1, "weight_decay": 0.0, "seed": 0}


def _accuracy(train_x, train_y, test_x, test_y, num_classes, **settings):
    params = cached_linear.train_classifier(train_x, train_y, num_classes, **settings)
    return metrics.topk_accuracy(cached_linear.classifier_logits(params, test_x), test_y)


def test_cached_linear_separates_far_apart_blobs():
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 4, 160, 16, spread=5.0)
    order = rng.permutation(len(y))
    train, test = order[:400], order[400:]
    acc = _accuracy(x[train], y[train], x[test], y[test], 4, **PROBE)
    assert acc == {"top1": 1.0, "top5": 1.0}


def test_cached_linear_on_random_labels_is_near_chance():
    # 400 test points: chance is 25% with a standard error of ~2 points.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(800, 16)).astype(np.float32)
    y = rng.integers(0, 4, size=800)
    acc = _accuracy(x[:400], y[:400], x[400:], y[400:], 4, **PROBE)
    assert 0.15 <= acc["top1"] <= 0.35


def test_cached_linear_is_deterministic_for_a_seed():
    rng = np.random.default_rng(2)
    x, y = _blobs(rng, 4, 100, 16, spread=1.0)
    a = cached_linear.train_classifier(x, y, 4, **dict(PROBE, seed=5))
    b = cached_linear.train_classifier(x, y, 4, **dict(PROBE, seed=5))
    c = cached_linear.train_classifier(x, y, 4, **dict(PROBE, seed=6))
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["kernel"], c["kernel"])


def test_one_full_batch_step_is_nesterov_sgd_from_zero():
    # From zero params the softmax is uniform, so the gradient is
    # dW = X^T (1/C - onehot(y)) / n on the standardised features X; Nesterov's
    # first update is (1 + m) * grad, at the peak learning rate lr * n / 256.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    params = cached_linear.train_classifier(x, y, 3, epochs=1, batch_size=8, learning_rate=0.5,
                                            weight_decay=0.0, seed=0)
    standardised = (x - x.mean(0)) / x.std(0)
    residual = 1 / 3 - np.eye(3)[y]
    lr = 0.5 * 8 / 256
    np.testing.assert_allclose(params["kernel"], -lr * 1.9 * standardised.T @ residual / 8, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["bias"], -lr * 1.9 * residual.mean(0), rtol=1e-5, atol=1e-7)


def test_cached_linear_standardizes_with_training_statistics():
    rng = np.random.default_rng(4)
    x, y = _blobs(rng, 3, 20, 6, spread=2.0)
    x[:, 2] = 0.0   # a dead ReLU: constant, must not divide by zero
    x_test = rng.normal(size=(10, 6)).astype(np.float32)
    params = cached_linear.train_classifier(x, y, 3, **dict(PROBE, epochs=2, batch_size=16))
    std = x.std(0)
    std[2] = 1.0
    want = (x_test - x.mean(0)) / std @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    got = cached_linear.classifier_logits(params, x_test)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(got))

    # Standardising makes the probe blind to the features' overall scale.
    tiny = cached_linear.train_classifier(1e-4 * x, y, 3, **dict(PROBE, epochs=2, batch_size=16))
    np.testing.assert_allclose(cached_linear.classifier_logits(tiny, 1e-4 * x_test), got,
                               rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- subsets

LABELS = np.tile(np.arange(10), 500)[np.random.default_rng(0).permutation(5000)]


@pytest.mark.parametrize("fraction,per_class", [(0.01, 5), (0.1, 50)])
def test_balanced_subset_takes_the_fraction_of_each_class(fraction, per_class):
    subset = input_pipeline.balanced_subset(LABELS, fraction, seed=0)
    np.testing.assert_array_equal(np.bincount(LABELS[subset], minlength=10), [per_class] * 10)
    np.testing.assert_array_equal(subset, np.unique(subset))   # sorted, no repeats
    np.testing.assert_array_equal(subset, input_pipeline.balanced_subset(LABELS, fraction, seed=0))
    assert not np.array_equal(subset, input_pipeline.balanced_subset(LABELS, fraction, seed=1))


def test_balanced_subset_edges():
    np.testing.assert_array_equal(input_pipeline.balanced_subset(LABELS, 1.0, seed=3), np.arange(5000))
    # A class too small for the fraction still gets one example.
    rare = np.array([0] * 200 + [1] * 3)
    assert np.bincount(rare[input_pipeline.balanced_subset(rare, 0.01, seed=0)]).tolist() == [2, 1]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"label fraction must be in \(0, 1\], got"):
            input_pipeline.balanced_subset(LABELS, bad, seed=0)
