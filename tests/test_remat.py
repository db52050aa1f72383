"""config.model.remat: residual blocks recomputed in the backward pass give the
same loss, gradients and BatchNorm statistics as stored activations, on one
device and under shard_map with global BatchNorm over eight."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import models, optim, sharding
from simclr_jax.pretraining import step
from simclr_jax.weights import pretrained
from tests.helpers import IMAGE_SIZE, tiny_pretrain_config


def _views(n=16, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _train_step_result(remat: bool, num_devices: int, initial=None):
    """(initial state, state after one LARS step, metrics) of the tiny
    architecture, all on the host. It starts from ``initial`` (a host state)
    when given, which must have the shapes the model initialises (only
    traced): one initialisation to compile for both models."""
    config = tiny_pretrain_config(variant="official")
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    model = models.model_from_config(config.model, axis_name=sharding.DATA_AXIS, remat=remat)
    tx = optim.lars(0.5, 1e-4)
    create = lambda: step.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh)
    if initial is None:
        state = create()
    else:
        shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
        assert shapes(jax.eval_shape(create)) == shapes(initial)  # same tree, same shapes
        state = jax.device_put(initial, sharding.replicated(mesh))
    initial = jax.device_get(state)
    train_step = step.make_train_step(model, tx, learning_rate=lambda s: 0.5, temperature=0.5, mesh=mesh)
    new_state, metrics = train_step(state, sharding.put_batch({"views": _views()}, mesh))
    return initial, jax.device_get(new_state), jax.device_get(metrics)


def test_remat_train_step_equals_the_plain_one_under_global_batchnorm():
    """Eight devices: shard_map, BatchNorm moments averaged over 'data'."""
    initial, plain, plain_metrics = _train_step_result(False, 8)
    _, remat, remat_metrics = _train_step_result(True, 8, initial=initial)
    assert float(remat_metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-6)
    # Same tree (remat renames nothing, so checkpoints are interchangeable), same values to float rounding.
    assert jax.tree.structure(remat.params) == jax.tree.structure(plain.params)
    for part in ("params", "batch_stats"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     getattr(remat, part), getattr(plain, part))


def test_remat_gradients_equal_stored_activations():
    """One device, the gradient itself (not through LARS's per-layer
    normalisation), and the recomputation is really there: the compiled
    backward pass computes the blocks' convolutions again."""
    config = tiny_pretrain_config()
    plain, remat = (models.model_from_config(config.model, remat=r) for r in (False, True))
    x = jnp.asarray(_views(8)[:, 0])
    variables = pretrained.random_variables(plain, IMAGE_SIZE, seed=0, mesh=sharding.make_mesh(jax.devices()[:1]))
    weights = jax.random.normal(jax.random.key(1), (8, config.model.proj_dim))

    def loss_and_stats(model):
        def loss(params):
            (_, z), updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                          train=True, mutable=["batch_stats"])
            return jnp.sum(jnp.tanh(z) * weights), updates["batch_stats"]
        compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables["params"]).compile()
        return compiled(variables["params"]), compiled.as_text()

    ((plain_loss, plain_stats), plain_grads), plain_hlo = loss_and_stats(plain)
    ((remat_loss, remat_stats), remat_grads), remat_hlo = loss_and_stats(remat)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    for got, want in ((remat_grads, plain_grads), (remat_stats, plain_stats)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads)) > 0
    # Forward convolutions are computed again in the backward pass: more convolutions in the program.
    assert remat_hlo.count(" convolution(") > plain_hlo.count(" convolution(")
