"""NT-Xent against a direct numpy transcription of the paper's formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from simclr_jax import sharding
from simclr_jax.pretraining.losses import nt_xent
from tests.helpers import numpy_nt_xent


@pytest.mark.parametrize("n,d,tau", [(1, 4, 0.5), (4, 8, 0.1), (16, 3, 0.5), (24, 32, 1.0), (7, 128, 0.07)])
def test_matches_numpy_reference(n, d, tau):
    rng = np.random.default_rng(n * 1000 + d)
    z1 = rng.normal(size=(n, d)).astype(np.float32)
    z2 = (z1 + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
    loss, metrics = nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau)
    want_loss, want_acc, want_entropy = numpy_nt_xent(z1, z2, tau)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(metrics["contrastive_acc"], want_acc, atol=1e-6)
    np.testing.assert_allclose(metrics["contrastive_entropy"], want_entropy, rtol=2e-5, atol=2e-5)


def test_gradient_matches_float64_finite_differences():
    rng = np.random.default_rng(0)
    n, d, tau = 5, 6, 0.3
    z1 = rng.normal(size=(n, d))
    z2 = rng.normal(size=(n, d))
    grad1, grad2 = jax.grad(lambda a, b: nt_xent(a, b, tau)[0], argnums=(0, 1))(
        jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
    )
    eps = 1e-6
    for z, grad in ((z1, grad1), (z2, grad2)):
        numeric = np.zeros_like(z)
        for index in np.ndindex(z.shape):
            plus, minus = z.copy(), z.copy()
            plus[index] += eps
            minus[index] -= eps
            args_plus = (plus, z2) if z is z1 else (z1, plus)
            args_minus = (minus, z2) if z is z1 else (z1, minus)
            numeric[index] = (
                numpy_nt_xent(*args_plus, tau)[0] - numpy_nt_xent(*args_minus, tau)[0]
            ) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("n,tau", [(2, 0.5), (8, 0.1), (32, 1.0)])
def test_identical_well_separated_views_have_closed_form_loss(n, tau):
    # Each image is its own orthogonal direction and both views coincide: the
    # positive has similarity 1, the 2N - 2 other candidates similarity 0, so
    # l = log(1 + (2N - 2) exp(-1/tau)) for every anchor.
    z = jnp.eye(n, 2 * n)
    loss, metrics = nt_xent(z, z, tau)
    np.testing.assert_allclose(loss, np.log1p((2 * n - 2) * np.exp(-1 / tau)), rtol=1e-5, atol=1e-6)
    assert metrics["contrastive_acc"] == 1.0


def test_rejects_non_positive_temperature():
    z = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, 0.0)


def _sharded_loss_and_grads(z1, z2, tau, num_devices, gather_negatives=True):
    """Loss and gradients with the batch split over ``num_devices`` devices."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])

    def body(a, b):
        if gather_negatives:
            fn = lambda a, b: nt_xent(a, b, tau, axis_name=sharding.DATA_AXIS)[0]
        else:  # control: each device contrasts only against its own images
            fn = lambda a, b: jax.lax.pmean(nt_xent(a, b, tau)[0], sharding.DATA_AXIS)
        loss, grads = jax.value_and_grad(fn, argnums=(0, 1))(a, b)
        return loss, grads

    spec = P(sharding.DATA_AXIS)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=(P(), (spec, spec))))(z1, z2)


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_sharded_loss_and_gradients_equal_single_device(num_devices):
    rng = np.random.default_rng(num_devices)
    z1 = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    z2 = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    tau = 0.2
    want_loss, want_grads = jax.value_and_grad(lambda a, b: nt_xent(a, b, tau)[0], argnums=(0, 1))(z1, z2)
    loss, grads = _sharded_loss_and_grads(z1, z2, tau, num_devices)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    # Control: per-device negatives give a visibly different loss, so the
    # comparison above would catch a missing all-gather.
    local_loss, _ = _sharded_loss_and_grads(z1, z2, tau, num_devices, gather_negatives=False)
    assert abs(float(local_loss) - float(want_loss)) > 0.1


def test_sharded_metrics_equal_single_device():
    rng = np.random.default_rng(3)
    z1 = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    z2 = jnp.asarray(z1 + 0.5 * rng.normal(size=(16, 8)), jnp.float32)
    _, want = nt_xent(z1, z2, 0.5)
    mesh = sharding.make_mesh(jax.devices()[:4])
    spec = P(sharding.DATA_AXIS)
    got = jax.jit(
        jax.shard_map(lambda a, b: nt_xent(a, b, 0.5, sharding.DATA_AXIS)[1], mesh=mesh,
                      in_specs=(spec, spec), out_specs=P())
    )(z1, z2)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
