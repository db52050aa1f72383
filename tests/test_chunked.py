"""config.microbatches: the chunked (GradCache) train step against jax.grad of
the same chunked-BatchNorm objective written directly, on one device and
under shard_map over eight."""
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import config_validation, models, sharding
from simclr_jax.models.classifier import linear_classifier
from simclr_jax.pretraining import chunked, step
from simclr_jax.pretraining.losses import nt_xent
from tests.helpers import IMAGE_SIZE, capture_gradient, direct_chunks, relative_error, tiny_pretrain_config

GLOBAL_BATCH = 32  # 8 devices x 4 images: one image per group at K=4
TEMPERATURE = 0.5
NUM_CLASSES = 10
RTOL = 2e-5  # float32, relative to each leaf's largest entry


def _views(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(GLOBAL_BATCH, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _labels():
    return np.arange(GLOBAL_BATCH, dtype=np.int32) % NUM_CLASSES


def _model(axis_name=None):
    return models.model_from_config(tiny_pretrain_config().model, axis_name=axis_name)


def _perturbed(params):
    """``params`` plus noise: the tiny model starts with zero-initialised last
    BatchNorm scales in its residual blocks, which would leave most of their
    gradients exactly zero and the comparison vacuous there."""
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params)


@functools.cache
def _step_result(num_devices, microbatches, num_classes=0, unroll_chunks=None):
    """(initial state, state after one step, metrics), all on the host; the
    optimiser state after the step is the gradient (see capture_gradient)."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    model = _model(sharding.DATA_AXIS)
    tx = capture_gradient()
    state = step.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh, num_classes=num_classes)
    state = state.replace(params=sharding.put_replicated(_perturbed(jax.device_get(state.params)), mesh))
    initial = jax.device_get(state)
    train_step = step.make_train_step(model, tx, learning_rate=lambda s: 0.5, temperature=TEMPERATURE, mesh=mesh,
                                      num_classes=num_classes,
                                      microbatches=microbatches, unroll_chunks=unroll_chunks)
    batch = {"views": _views(), "label": _labels()} if num_classes else {"views": _views()}
    new_state, metrics = train_step(state, sharding.put_batch(batch, mesh))
    return initial, jax.device_get(new_state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def step_result():
    """_step_result: a module-scoped fixture, so that conftest runs the tests
    that share its results in one pytest-xdist worker."""
    return _step_result


@functools.partial(jax.jit, static_argnums=6)
def _direct_value_and_grad(params, batch_stats, chunks, first, second, labels, num_classes):
    """jax.grad of 2L (+ the probe's loss) with BatchNorm per chunk, in one
    pass (vmap over chunks: each its own train-mode batch); aux is (L, the
    chunks' BN updates, stacked)."""
    model = _model()

    def objective(params):
        apply = lambda images: model.apply({"params": step.model_params(params), "batch_stats": batch_stats},
                                           images, train=True, mutable=["batch_stats"])
        (h, z), updates = jax.vmap(apply)(chunks)
        half = chunks.shape[1] // 2
        place = lambda x, rows: jnp.zeros((labels.shape[0], x.shape[-1])).at[rows.ravel()].set(
            x.reshape(-1, x.shape[-1]))
        loss, _ = nt_xent(place(z[:, :half], first), place(z[:, half:], second), TEMPERATURE)
        total = step.OBJECTIVE_SCALE * loss
        if num_classes:
            h_both = jnp.concatenate([place(h[:, :half], first), place(h[:, half:], second)])
            logits = linear_classifier(num_classes).apply({"params": params[step.PROBE]}, jax.lax.stop_gradient(h_both))
            both_labels = jnp.concatenate([labels, labels])
            total = total + optax.softmax_cross_entropy_with_integer_labels(logits, both_labels).mean()
        return total, (loss, updates["batch_stats"])

    return jax.value_and_grad(objective, has_aux=True)(params)


# One device and eight (shard_map, global BN), two and four chunks, probe off and on: two
# cases cover each (the other two combinations measured 6.2e-6 and 3.8e-6 and cost 15 s).
# The chunk loops as accelerators run them (rolled) and as a CPU mesh does (unrolled).
@pytest.mark.parametrize("num_devices,microbatches,num_classes,unroll_chunks",
                         [(1, 2, 0, False), (8, 4, NUM_CLASSES, None)])
def test_chunked_step_equals_grad_of_the_chunked_objective(step_result, num_devices, microbatches, num_classes,
                                                           unroll_chunks):
    start = time.time()
    initial, new_state, metrics = step_result(num_devices, microbatches, num_classes, unroll_chunks)
    chunks, first, second = direct_chunks(_views(), num_devices, microbatches)
    (_, (want_loss, chunk_stats)), want_grads = jax.device_get(_direct_value_and_grad(
        initial.params, initial.batch_stats, chunks, first, second, _labels(), num_classes))
    want_stats = jax.tree.map(lambda s: np.mean(s, axis=0), chunk_stats)

    loss_error = abs(float(metrics["loss"]) - float(want_loss)) / float(want_loss)
    grad_error = relative_error(new_state.opt_state, want_grads)
    stats_error = relative_error(new_state.batch_stats, want_stats)
    print(f"D={num_devices} K={microbatches} probe={num_classes} unroll={unroll_chunks}: loss {loss_error:.1e}, "
          f"grads {grad_error:.1e}, BN statistics {stats_error:.1e} ({time.time() - start:.1f} s)")
    assert loss_error < RTOL and grad_error < RTOL and stats_error < RTOL
    assert float(metrics["nonfinite"]) == 0.0
    assert min(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads)) > 0  # not vacuous
    if num_classes:
        assert np.max(np.abs(new_state.opt_state[step.PROBE]["kernel"])) > 0


def test_one_microbatch_is_the_plain_step():
    # The same program as the default, so the same bits (running both would
    # compile it twice), and the one-batch one: no chunk loop. K > 1 loops
    # over chunks, unrolled only where asked (the default on CPU).
    # Lowering needs only the state's shapes and shardings: no initialisation to compile.
    mesh = sharding.make_mesh(jax.devices()[:8])
    model, tx = _model(sharding.DATA_AXIS), capture_gradient()
    state = jax.eval_shape(lambda: step.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.replicated(mesh)),
                         state)
    batch = sharding.put_batch({"views": _views()}, mesh)
    program = lambda **chunking: step.make_train_step(model, tx, learning_rate=lambda s: 0.5, temperature=TEMPERATURE,
                                                      mesh=mesh,
                                                      **chunking).lower(state, batch).as_text()
    one = program(microbatches=1)
    assert one == program()
    assert "stablehlo.while" not in one
    assert "stablehlo.while" in program(microbatches=2, unroll_chunks=False)
    assert "stablehlo.while" not in program(microbatches=2)


def test_chunks_change_batchnorm_visibly(step_result):
    # BatchNorm per chunk gives other numbers than one batch: a comparison that
    # passed for any K would be caught here. K = 2 is the one-device step that
    # test_chunked_step_equals_grad_of_the_chunked_objective checks (computed once).
    (_, one, one_metrics), (_, two, two_metrics) = step_result(1, 1, 0), step_result(1, 2, 0, False)
    assert abs(float(two_metrics["loss"]) - float(one_metrics["loss"])) > 1e-3
    assert relative_error(two.opt_state, one.opt_state) > 1e-2


@pytest.mark.parametrize("n,microbatches", [(1, 1), (2, 2), (4, 4), (6, 3), (12, 4)])
def test_no_chunk_holds_both_views_of_an_image(n, microbatches):
    view1_rows, view2_rows = chunked.chunk_assignment(n, microbatches)
    assert view1_rows.shape == view2_rows.shape == (microbatches, n // microbatches)
    # Every image's two views are in the batch exactly once each.
    assert sorted(view1_rows.ravel()) == sorted(view2_rows.ravel()) == list(range(n))
    for first, second in zip(view1_rows, view2_rows):
        if microbatches > 1:
            assert not set(first) & set(second)
    # The chunked layout round-trips to the one-batch layout (view 1 rows, then view 2).
    x = jnp.arange(n * 2).reshape(n, 2)  # image i: view 1 = 2i, view 2 = 2i + 1
    np.testing.assert_array_equal(chunked._from_chunks(chunked._to_chunks(x, microbatches)),
                                  np.concatenate([x[:, 0], x[:, 1]]))


def test_microbatches_must_divide_the_per_device_batch():
    config = tiny_pretrain_config()
    config.batch_size = 48
    config.microbatches = 4
    config_validation.validate(config, num_devices=4, num_processes=1)  # 12 per device
    config.microbatches = 5
    with pytest.raises(config_validation.ConfigError, match=r"microbatches=5.*= 12 images"):
        config_validation.validate(config, num_devices=4, num_processes=1)
    config.microbatches = 0
    with pytest.raises(config_validation.ConfigError, match="microbatches=0"):
        config_validation.validate(config, num_devices=4, num_processes=1)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_gradients_cross_devices_in_float32_under_bfloat16_compute(microbatches):
    # The official code sums float32 gradients over replicas. shard_map's
    # implicit sum would happen after each kernel's cast to bfloat16.
    mesh = sharding.make_mesh(jax.devices()[:8])
    model = models.model_from_config(tiny_pretrain_config().model, axis_name=sharding.DATA_AXIS,
                                     dtype=jnp.bfloat16)
    tx = optax.sgd(0.1)
    state = jax.eval_shape(lambda: step.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.replicated(mesh)),
                         state)
    views = jax.ShapeDtypeStruct((GLOBAL_BATCH, 2, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32,
                                 sharding=sharding.batch_sharded(mesh))
    text = step.make_train_step(model, tx, learning_rate=lambda s: 0.1, temperature=TEMPERATURE, mesh=mesh,
                                microbatches=microbatches,
                                unroll_chunks=False).lower(state, {"views": views}).as_text()
    reduced = re.findall(r"stablehlo.all_reduce.*?\}\) : \((.*?)\) ->", text, re.S)
    dtypes = {t.split("x")[-1] for operands in reduced for t in re.findall(r"tensor<([^>]*)>", operands)}
    assert reduced and dtypes == {"f32"}
    # Every parameter's gradient is among them, whole (a kernel's shape appears as an operand).
    kernel = jax.tree.leaves(state.params)[0].shape
    assert any(f"tensor<{'x'.join(map(str, kernel))}xf32>" in operands for operands in reduced)
