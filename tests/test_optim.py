"""Tests for simclr_jax.optim: LARS against a numpy hand computation
(on toy trees and on the real SimCLR parameter tree), schedules."""
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest

from simclr_jax import models, optim, sharding
from simclr_jax.pretraining import step as train
from simclr_jax.weights.checkpoint import PROBE

SHAPES = {
    "conv": {"kernel": (3, 3, 2, 4)},
    "bn": {"scale": (4,), "bias": (4,)},
    "dense": {"kernel": (4, 3), "bias": (3,)},
}


def _random_tree(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES,
                        is_leaf=lambda s: isinstance(s, tuple))


def _reference_lars(params, grads_per_step, lrs, wd, momentum, eta):
    """SimCLR's LARS, written out per leaf in float64 numpy."""
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    velocity = jax.tree.map(np.zeros_like, params)
    for grads, lr in zip(grads_per_step, lrs):
        def step(w, g, v):
            g = np.asarray(g, np.float64)
            if w.ndim > 1:
                g = g + wd * w
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
            else:
                trust = 1.0
            return momentum * v + lr * trust * g

        velocity = jax.tree.map(step, params, grads, velocity)
        params = jax.tree.map(lambda w, v: w - v, params, velocity)
    return params


def test_lars_two_steps_match_hand_computation():
    wd, momentum, eta = 0.1, 0.9, 1e-3
    lrs = [0.5, 2.0]
    schedule = lambda count: 0.5 + 1.5 * count  # 0.5 then 2.0: momentum sees both
    tx = optim.lars(schedule, weight_decay=wd, momentum=momentum, trust_coefficient=eta)

    params = _random_tree(0)
    grads = [_random_tree(1), _random_tree(2)]
    state = tx.init(params)
    new_params = params
    for g in grads:
        updates, state = tx.update(g, state, new_params)
        new_params = optax.apply_updates(new_params, updates)

    expected = _reference_lars(params, grads, lrs, wd, momentum, eta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new_params, expected)


def test_lars_first_step_on_bn_and_bias_is_plain_sgd():
    tx = optim.lars(0.3, weight_decay=0.5)
    params, grads = _random_tree(0), _random_tree(1)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path in (("bn", "scale"), ("bn", "bias"), ("dense", "bias")):
        u, g = updates[path[0]][path[1]], grads[path[0]][path[1]]
        np.testing.assert_allclose(u, -0.3 * g, rtol=1e-6)
    # Kernels are trust-scaled: far smaller than -lr * g with eta = 1e-3.
    conv = updates["conv"]["kernel"]
    assert np.linalg.norm(conv) < 0.01 * np.linalg.norm(0.3 * grads["conv"]["kernel"])


def test_lars_zero_param_norm_uses_trust_one():
    tx = optim.lars(1.0, weight_decay=0.0)
    params = {"kernel": np.zeros((2, 2), np.float32)}
    grads = {"kernel": np.ones((2, 2), np.float32)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -1.0)


def test_adapt_mask_rule():
    mask = optim.adapt_mask(_random_tree(0))
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                    "dense": {"kernel": True, "bias": False}}


@pytest.fixture(scope="module")
def real_state():
    """The real train state of a ResNet-18 x1/16 (CIFAR stem, 2-layer head) with
    the online probe, under LARS for the model and Adam for the probe."""
    config = ml_collections.ConfigDict(dict(depth=18, width_multiplier=1 / 16, cifar_stem=True,
                                            head_layers=2, proj_dim=16, variant="torchvision", sk_ratio=0.0,
                                            se_ratio=0.0, stem_pool_padding="same"))
    tx = optim.with_adam_for(PROBE, optim.lars(0.3, weight_decay=0.1), 1e-3)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state = train.create_train_state(models.model_from_config(config), tx, image_size=16, seed=0,
                                     mesh=mesh, num_classes=10)
    return tx, jax.device_get(state)


def _leaves_by_path(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_adapt_mask_on_the_real_tree_selects_the_kernels(real_state):
    params = train.model_params(real_state[1].params)
    leaves = _leaves_by_path(params)
    adapted = {path for path, on in _leaves_by_path(optim.adapt_mask(params)).items() if on}
    kernels = {path for path, leaf in leaves.items() if path.endswith("['kernel']") and leaf.ndim > 1}
    assert adapted == kernels
    # From the architecture: a stem conv, 8 blocks of 2 convs, 3 projection
    # shortcuts (stages 2-4) = 20 conv kernels, and the head's 2 dense kernels.
    assert sum(leaves[p].ndim == 4 for p in adapted) == 20
    assert sum(leaves[p].ndim == 2 for p in adapted) == 2
    # Every other leaf is a BatchNorm scale or bias: one BN per conv or dense
    # layer (22), each with a scale, and all but the head's last with a bias.
    excluded = set(leaves) - adapted
    assert all("bn" in p and p.endswith(("['scale']", "['bias']")) for p in excluded)
    assert len(excluded) == 22 + 21


def test_one_lars_step_on_the_real_tree(real_state):
    """Kernels get lr * trust * (g + wd w); BN scales and biases plain -lr * g;
    the probe Adam's first step, -lr * g / |g|. Random parameters (same tree):
    at init every BN bias is 0, which would hide weight decay and trust ratio."""
    tx, state = real_state
    lr, wd, eta = 0.3, 0.1, 1e-3
    params = _random_like(state.params, seed=0)
    grads = _random_like(state.params, seed=1)
    updates, _ = tx.update(grads, state.opt_state, params)

    flat_w, flat_g, flat_u = (_leaves_by_path(t) for t in (params, grads, updates))
    for path, u in flat_u.items():
        w, g = np.asarray(flat_w[path], np.float64), np.asarray(flat_g[path], np.float64)
        if path.startswith(f"['{train.PROBE}']"):
            want = -1e-3 * g / (np.abs(g) + 1e-8)
        elif path.endswith("['kernel']"):
            decayed = g + wd * w
            want = -lr * eta * np.linalg.norm(w) / np.linalg.norm(decayed) * decayed
        else:
            want = -lr * g
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-8, err_msg=path)


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), tree)


@pytest.mark.parametrize("scaling,peak", [
    ("linear", 0.3 * 512 / 256), ("sqrt", 0.3 * math.sqrt(512))])
def test_schedule_shape(scaling, peak):
    s = optim.schedule(optim.peak_learning_rate(0.3, 512, scaling), warmup_steps=10, total_steps=110)
    np.testing.assert_allclose(s(0), 0.0, atol=1e-7)
    np.testing.assert_allclose(s(5), peak / 2, rtol=1e-5)
    np.testing.assert_allclose(s(10), peak, rtol=1e-5)
    np.testing.assert_allclose(s(60), peak / 2, rtol=1e-5)
    np.testing.assert_allclose(s(110), 0.0, atol=1e-6)
    np.testing.assert_allclose(s(200), 0.0, atol=1e-6)


def test_schedule_edge_cases_and_validation():
    s = optim.schedule(optim.peak_learning_rate(1.0, 256, "linear"), warmup_steps=0, total_steps=10)
    np.testing.assert_allclose(s(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(s(10), 0.0, atol=1e-6)
    s = optim.schedule(optim.peak_learning_rate(1.0, 256, "linear"), warmup_steps=10, total_steps=10)
    np.testing.assert_allclose(s(5), 0.5, rtol=1e-6)
    np.testing.assert_allclose(s(10), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="scaling"):
        optim.peak_learning_rate(1.0, 256, "square")
    with pytest.raises(ValueError, match="decay"):
        optim.schedule(1.0, total_steps=10, decay="step")
    with pytest.raises(ValueError):
        optim.schedule(1.0, warmup_steps=0, total_steps=0)
    with pytest.raises(ValueError):
        optim.schedule(1.0, warmup_steps=11, total_steps=10)


def test_cosine_without_warmup_is_optax_cosine_decay():
    """The supervised protocols' schedule, against optax's own (which they used)."""
    ours, theirs = optim.schedule(0.4, total_steps=37), optax.cosine_decay_schedule(0.4, 37)
    np.testing.assert_allclose([ours(t) for t in range(45)], [theirs(t) for t in range(45)], rtol=1e-6, atol=1e-8)


def test_constant_schedule():
    """Constant without warm-up is the number itself (no schedule count in the
    optimiser state); with warm-up, linear to the peak, then flat."""
    assert optim.schedule(0.3, total_steps=10, decay="constant") == 0.3
    s = optim.schedule(0.3, total_steps=10, warmup_steps=4, decay="constant")
    np.testing.assert_allclose([s(t) for t in (0, 2, 4, 9, 50)], [0.0, 0.15, 0.3, 0.3, 0.3], rtol=1e-6)


def test_steps_rounds_epochs_times_examples_over_batch():
    assert optim.steps(2.5, 1000, 256) == 10  # 9.77
    assert optim.steps(0.5, 195) == 98  # 97.5: Python rounds halves to even
    assert optim.steps(0.1, 50_000, 512) == 10


def test_momentum_is_nesterov_sgd_with_masked_decay():
    """'momentum': g + wd * w on the masked leaves, then Nesterov SGD, as a
    hand computation over two steps."""
    params = {"kernel": np.array([[1.0, -2.0]], np.float32), "bias": np.array([0.5], np.float32)}
    grads = [jax.tree.map(lambda p, k=k: np.full_like(p, 0.1 * (k + 1)), params) for k in range(2)]
    tx = optim.create("momentum", 0.2, weight_decay=0.01, decay_mask={"kernel": True, "bias": False})
    state, current = tx.init(params), params
    want = {name: np.asarray(value, np.float64) for name, value in params.items()}
    velocity = {name: 0.0 for name in params}
    for g in grads:
        updates, state = tx.update(g, state, current)
        current = optax.apply_updates(current, updates)
        for name in want:
            step = g[name] + (0.01 * want[name] if name == "kernel" else 0.0)
            velocity[name] = 0.9 * velocity[name] + step
            want[name] = want[name] - 0.2 * (step + 0.9 * velocity[name])
    for name in want:
        np.testing.assert_allclose(current[name], want[name], rtol=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        optim.create("adam", 0.1, weight_decay=0.0)


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(
        batch_size=512, num_epochs=10, num_train_steps=-1,
        optimizer=dict(base_learning_rate=1.0, lr_scaling="linear", warmup_epochs=0.5,
                       weight_decay=1e-6, momentum=0.9, trust_coefficient=1e-3)))
    config.update(overrides)
    return config


def test_create_optimizer_steps():
    from simclr_jax.pretraining.train import create_optimizer

    tx, schedule = create_optimizer(_config(), steps_per_epoch=20)
    np.testing.assert_allclose(schedule(10), 2.0, rtol=1e-6)  # warm-up ends at 10
    np.testing.assert_allclose(schedule(200), 0.0, atol=1e-6)
    np.testing.assert_allclose(schedule(105), 1.0, rtol=1e-5)  # cosine midpoint

    _, schedule = create_optimizer(_config(num_train_steps=50), steps_per_epoch=20)
    np.testing.assert_allclose(schedule(50), 0.0, atol=1e-6)
    np.testing.assert_allclose(schedule(30), 1.0, rtol=1e-5)

    params = _random_tree(0)
    updates, _ = tx.update(_random_tree(1), tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
