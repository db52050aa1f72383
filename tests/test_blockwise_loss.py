"""The blockwise NT-Xent against the naive one: same loss, metrics and gradients,
alone and inside the real train step."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from simclr_jax import optim, sharding
from simclr_jax.pretraining import losses
from simclr_jax.pretraining import step as train
from simclr_jax.pretraining.losses import nt_xent, nt_xent_blockwise
from tests.helpers import tiny_simclr


def _views(n, d, seed):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d))
    z2 = z1 + 0.7 * rng.normal(size=(n, d))
    return jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)


def _loss_metrics_grads(fn, z1, z2):
    (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(z1, z2)
    return loss, metrics, grads


def _assert_same(got, want):
    (loss, metrics, grads), (want_loss, want_metrics, want_grads) = got, want
    # atol: at small tau the loss is a difference of O(1/tau) logits and can
    # be ~1e-3, where float32 rounding of the two forms differs by ~1e-7.
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["contrastive_acc"], want_metrics["contrastive_acc"], atol=1e-6)
    np.testing.assert_allclose(
        metrics["contrastive_entropy"], want_metrics["contrastive_entropy"], rtol=1e-5, atol=1e-6
    )
    for grad, want_grad in zip(grads, want_grads):
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


# 2N = 2n candidate columns; block sizes that divide 2N, do not, are 1, or exceed 2N.
@pytest.mark.parametrize(
    "n,d,tau,block_size",
    [(1, 4, 0.5, 1), (5, 8, 0.1, 3), (16, 16, 0.2, 8), (24, 32, 0.05, 7), (12, 8, 1.0, 1024)],
)
def test_matches_naive(n, d, tau, block_size):
    z1, z2 = _views(n, d, seed=n)
    want = _loss_metrics_grads(lambda a, b: nt_xent(a, b, tau, impl="naive"), z1, z2)
    got = _loss_metrics_grads(lambda a, b: nt_xent_blockwise(a, b, tau, block_size=block_size), z1, z2)
    _assert_same(got, want)


def test_gradients_of_temperature_and_entropy_match_naive():
    # The custom backward pass also carries the entropy's cotangent, and tau
    # is differentiated by autodiff outside it: both must agree with naive.
    z1, z2 = _views(9, 6, seed=1)

    def objective(impl):
        def fn(a, b, tau):
            loss, metrics = nt_xent(a, b, tau, impl=impl, block_size=4)
            return loss + 0.5 * metrics["contrastive_entropy"]

        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(z1, z2, jnp.float32(0.3))

    value, grads = objective("blockwise")
    want_value, want_grads = objective("naive")
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for grad, want_grad in zip(grads, want_grads):
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_ties_break_to_the_first_column_as_naive():
    # Duplicated images: each positive ties with the duplicate's views, so the
    # accuracy depends on which tied column argmax picks; blocks of 3 split
    # the tied columns over different blocks.
    base = jnp.eye(4, 8)
    z1 = jnp.concatenate([base, base], axis=0)
    _, want = nt_xent(z1, z1, 0.5, impl="naive")
    _, got = nt_xent_blockwise(z1, z1, 0.5, block_size=3)
    assert 0.0 < want["contrastive_acc"] < 1.0
    np.testing.assert_allclose(got["contrastive_acc"], want["contrastive_acc"])
    np.testing.assert_allclose(got["contrastive_entropy"], want["contrastive_entropy"], rtol=1e-6)


def _sharded(fn, z1, z2, num_devices):
    """Loss, metrics and gradients with the batch split over ``num_devices``."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    spec = P(sharding.DATA_AXIS)

    def body(a, b):
        return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(a, b)

    out_specs = ((P(), P()), (spec, spec))
    (loss, metrics), grads = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=out_specs)
    )(z1, z2)
    return loss, metrics, grads


@pytest.mark.parametrize("num_devices,block_size,tau", [(2, 5, 0.2), (4, 16, 0.1), (8, 3, 0.5)])
def test_sharded_matches_single_device_naive(num_devices, block_size, tau):
    z1, z2 = _views(16, 8, seed=num_devices)
    want = _loss_metrics_grads(lambda a, b: nt_xent(a, b, tau, impl="naive"), z1, z2)
    fn = lambda a, b: nt_xent_blockwise(a, b, tau, axis_name=sharding.DATA_AXIS, block_size=block_size)
    _assert_same(_sharded(fn, z1, z2, num_devices), want)


def _uses_blockwise(fn, *args):
    return "custom_vjp" in str(jax.make_jaxpr(fn)(*args))


def test_auto_picks_blockwise_above_the_global_threshold(monkeypatch):
    z1, z2 = _views(4, 8, seed=0)  # 2N = 8 on one device
    assert not _uses_blockwise(lambda a, b: nt_xent(a, b, 0.5), z1, z2)
    monkeypatch.setattr(losses, "BLOCKWISE_MIN_COLUMNS", 7)
    assert _uses_blockwise(lambda a, b: nt_xent(a, b, 0.5), z1, z2)
    assert not _uses_blockwise(lambda a, b: nt_xent(a, b, 0.5, impl="naive"), z1, z2)

    # Under shard_map the threshold counts the global 2N = 16, not the local 2n = 4.
    monkeypatch.setattr(losses, "BLOCKWISE_MIN_COLUMNS", 15)
    mesh = sharding.make_mesh(jax.devices()[:4])
    spec = P(sharding.DATA_AXIS)
    sharded = jax.shard_map(
        lambda a, b: nt_xent(a, b, 0.5, axis_name=sharding.DATA_AXIS)[0],
        mesh=mesh, in_specs=(spec, spec), out_specs=P(),
    )
    z1, z2 = _views(8, 8, seed=0)
    assert _uses_blockwise(sharded, z1, z2)


def test_rejects_unknown_impl_and_bad_block_size():
    z = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="impl"):
        nt_xent(z, z, 0.5, impl="fast")
    with pytest.raises(ValueError, match="block_size"):
        nt_xent_blockwise(z, z, 0.5, block_size=0)


def _train_step_history(impl, state, batches, mesh):
    """(metrics, state) on the host after each step of the real 8-device train step."""
    model = tiny_simclr(sharding.DATA_AXIS)
    tx = optim.lars(0.5, weight_decay=1e-4)
    step = train.make_train_step(model, tx, learning_rate=lambda s: 0.5, temperature=0.5, mesh=mesh, loss_impl=impl)
    state = jax.device_put(state, sharding.replicated(mesh))
    # Differentiated, the blockwise form shows as its scans over column blocks
    # (ResNet and the naive form have none): the step really runs ``impl``.
    uses_scan = re.search(r"\bscan\b", str(jax.make_jaxpr(step)(state, batches[0]))) is not None
    assert uses_scan == (impl == "blockwise")
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(jax.device_get((metrics, state)))
    return history


def test_train_step_blockwise_matches_naive(monkeypatch):
    """Two steps of make_train_step(loss_impl='blockwise') and 'naive' from the
    same state on the same batches: same metrics, parameters, BN statistics
    and momentum. The step's NT-Xent gets blocks of 12 columns, so its 2N = 32
    candidates span three blocks, the last one padded (the default 1024 would
    hold them all in one)."""
    monkeypatch.setattr(train, "nt_xent", functools.partial(nt_xent, block_size=12))
    mesh = sharding.make_mesh(jax.devices()[:8])
    model = tiny_simclr(sharding.DATA_AXIS)
    init = jax.device_get(train.create_train_state(model, optim.lars(0.5, weight_decay=1e-4), image_size=16,
                                                   seed=0, mesh=mesh))
    rng = np.random.default_rng(0)
    batches = [sharding.put_batch({"views": rng.uniform(size=(16, 2, 16, 16, 3)).astype(np.float32)}, mesh)
               for _ in range(2)]

    want = _train_step_history("naive", init, batches, mesh)
    got = _train_step_history("blockwise", init, batches, mesh)
    for (metrics, state), (want_metrics, want_state) in zip(got, want):
        assert set(metrics) == set(want_metrics)
        for key in want_metrics:
            np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
        # The step minimises 2L: BN updates of lr * 2 * g, so summation-order
        # differences reach ~1.5e-6 on them after two steps.
        jax.tree_util.tree_map_with_path(
            lambda path, a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-6,
                                                          err_msg=jax.tree_util.keystr(path)),
            state, want_state)
    # The steps moved the parameters, so matching them is not vacuous.
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), want[-1][1].params, init.params)
    assert max(jax.tree.leaves(moved)) > 1e-3
