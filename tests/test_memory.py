"""config.memory: SimCLR v2's queue of negatives from a moving-average network,
against numpy (the loss with a queue, the moving average) and against the
model applied directly (which keys the queue holds, in which slot), on one
device and under shard_map over eight."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from simclr_jax import config_validation, models, sharding
from simclr_jax.pretraining import memory, step
from simclr_jax.pretraining.losses import nt_xent
from tests.helpers import IMAGE_SIZE, direct_chunks, numpy_nt_xent, tiny_pretrain_config

TEMPERATURE = 0.5


def _unit_rows(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("impl", ["naive", "blockwise"])
@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("filled", [0, 24, 40])
def test_loss_with_queue_equals_numpy(impl, num_devices, filled):
    rng = np.random.default_rng(filled)
    z1, z2, queue = (rng.standard_normal(shape).astype(np.float32) for shape in ((16, 8), (16, 8), (40, 8)))
    mesh = sharding.make_mesh(jax.devices()[:num_devices])

    def loss(z1, z2, queue):
        return nt_xent(z1, z2, TEMPERATURE, axis_name=sharding.DATA_AXIS, impl=impl, block_size=12,
                       negatives=queue, num_negatives=jnp.int32(filled))[0]

    sharded = jax.jit(jax.shard_map(loss, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=P()))
    expected = numpy_nt_xent(z1, z2, TEMPERATURE, queue[:filled])[0]
    np.testing.assert_allclose(float(sharded(z1, z2, queue)), expected, rtol=2e-6)


def test_blockwise_gradient_with_queue_equals_naive():
    rng = np.random.default_rng(0)
    z1, z2, queue = (rng.standard_normal(shape).astype(np.float32) for shape in ((8, 8), (8, 8), (40, 8)))

    def grads(impl):
        loss = lambda z1, z2: nt_xent(z1, z2, TEMPERATURE, impl=impl, block_size=12, negatives=queue,
                                      num_negatives=jnp.int32(28))[0]
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(z1, z2)  # one program, not op by op

    for naive, blockwise in zip(grads("naive"), grads("blockwise")):
        np.testing.assert_allclose(blockwise, naive, atol=1e-6 * np.abs(naive).max())


def test_queue_is_a_global_fifo_on_any_device_count():
    """Three slots written five times: each slot holds the keys of the latest
    step written to it, in global [view, image] order, whatever the devices."""
    slots, batch, dim, steps = 3, 16, 4, 5
    rng = np.random.default_rng(0)
    keys = _unit_rows(rng, steps, 2, batch, dim)  # [step, view, image, dim]

    def queue_after_each_step(num_devices):
        mesh = sharding.make_mesh(jax.devices()[:num_devices])
        state = memory.create({"w": jnp.zeros(3)}, slots * 2 * batch, batch, dim, mesh)

        def step_on_device(state, step_keys):  # step_keys: [2, n, dim], this device's images
            state = memory.update(state, {"w": jnp.zeros(3)}, step_keys.reshape(-1, dim), 0.5)
            rows, filled = memory.negatives(state, sharding.DATA_AXIS)
            return state, rows[None], filled  # rows: what each device contrasts with

        fn = jax.jit(jax.shard_map(step_on_device, mesh=mesh, in_specs=(memory.PARTITION_SPECS, P(None, "data")),
                                   out_specs=(memory.PARTITION_SPECS, P("data"), P())))
        seen = []
        for t in range(steps):
            state, rows, filled = fn(state, keys[t])
            seen.extend((np.asarray(device_rows), int(filled), t) for device_rows in rows)
        return seen

    for num_devices in (1, 8):
        for rows, filled, t in queue_after_each_step(num_devices):
            written = t + 1
            latest = [max(s for s in range(written) if s % slots == slot) if slot < written else None
                      for slot in range(slots)]
            assert filled == min(written, slots) * 2 * batch
            for slot, source in enumerate(latest):
                block = rows[slot * 2 * batch:(slot + 1) * 2 * batch]
                expected = np.zeros((2 * batch, dim)) if source is None else keys[source].reshape(-1, dim)
                np.testing.assert_allclose(block, expected, atol=1e-6, err_msg=f"{num_devices} devices, "
                                           f"after step {t}, slot {slot}")


def test_moving_average_formula():
    rng = np.random.default_rng(0)
    ema = {"a": rng.standard_normal((3, 2)), "b": {"c": rng.standard_normal(4)}}
    params = jax.tree.map(lambda x: x + 1.0, ema)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state = memory.create(jax.tree.map(jnp.float32, ema), 4, 2, 3, mesh)
    moved = memory.update(state, jax.tree.map(jnp.float32, params), jnp.ones((4, 3)), 0.9)
    for got, e, p in zip(jax.tree.leaves(moved.ema_params), jax.tree.leaves(ema), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, 0.9 * e + 0.1 * p, rtol=1e-6)
    assert int(moved.count) == 1


# --------------------------------------------------------------------------- the train step with a memory

BATCH, SLOTS, MOMENTUM, STEPS = 16, 2, 0.9, 3


@functools.cache
def _run_with_memory(num_devices, microbatches=1, unroll_chunks=None):
    """Per step: (state before, batch views, metrics), host copies; and the final state.
    ``unroll_chunks=False``: the chunk loop rolled, as accelerators run it, which
    compiles faster than the CPU's unrolled one (test_chunked checks both forms)."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    model = models.model_from_config(tiny_pretrain_config().model, axis_name=sharding.DATA_AXIS)
    tx = optax.sgd(0.5)
    state = step.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh)
    state = state.replace(memory=memory.create(step.model_params(state.params), SLOTS * 2 * BATCH, BATCH, 128,
                                               mesh))
    train_step = step.make_train_step(model, tx, learning_rate=lambda s: 0.5, temperature=TEMPERATURE, mesh=mesh,
                                      microbatches=microbatches, unroll_chunks=unroll_chunks,
                                      memory_momentum=MOMENTUM)
    rng, history = np.random.default_rng(0), []
    for _ in range(STEPS):
        views = rng.uniform(size=(BATCH, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        before = jax.device_get(state)
        state, metrics = train_step(state, sharding.put_batch({"views": views}, mesh))
        history.append((before, views, jax.device_get(metrics)))
    return history, jax.device_get(state)


@jax.jit
def _train_mode_z(variables, images):
    """z of ``images`` in train mode (BatchNorm over these rows), one device, no shard_map."""
    model = models.model_from_config(tiny_pretrain_config().model)
    return model.apply(variables, images, train=True, mutable=["batch_stats"])[0][1]


def _projections(variables, views):
    """z of [view 1 of every image; view 2]."""
    return np.asarray(_train_mode_z(variables, np.concatenate([views[:, 0], views[:, 1]])))


def test_train_step_contrasts_with_the_queue_and_fills_it():
    """Eight devices (shard_map, global BatchNorm) against one device without
    shard_map; three steps, so the two slots wrap around."""
    history, final = _run_with_memory(8)
    states = [before for before, _, _ in history] + [final]
    for t, (before, views, metrics) in enumerate(history):
        after = states[t + 1]
        # The loss: this step's projections against each other and the filled queue.
        z = _projections({"params": before.params, "batch_stats": before.batch_stats}, views)
        queue = before.memory.queue.reshape(-1, z.shape[1])
        filled = min(t, SLOTS) * 2 * BATCH
        np.testing.assert_allclose(metrics["loss"], numpy_nt_xent(z[:BATCH], z[BATCH:], TEMPERATURE,
                                                                   queue[:filled])[0], rtol=1e-5)
        # The keys: the average network's projections of this step's views, in slot t % SLOTS.
        keys = _projections({"params": before.memory.ema_params, "batch_stats": before.batch_stats}, views)
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        np.testing.assert_allclose(after.memory.queue[t % SLOTS].reshape(-1, keys.shape[1]), keys, atol=2e-6)
        # The moving average, towards the parameters after the step.
        for e, e0, p in zip(*(jax.tree.leaves(x) for x in (after.memory.ema_params, before.memory.ema_params,
                                                           step.model_params(after.params)))):
            np.testing.assert_allclose(e, MOMENTUM * e0 + (1 - MOMENTUM) * p, rtol=1e-6, atol=1e-7)
    assert int(final.memory.count) == STEPS
    first_params = jax.tree.leaves(history[0][0].params)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(final.params), first_params))


def test_chunked_step_keys_are_the_chunks_projections():
    """With microbatches the average network runs chunk by chunk too (BatchNorm
    per chunk, global over devices); the keys are still every view's, in
    [view, image] order: checked against the chunks written out in test_chunked."""
    history, final = _run_with_memory(8, microbatches=2, unroll_chunks=False)
    for t, (before, views, metrics) in enumerate(history):
        chunks, first, second = direct_chunks(views, 8, 2)
        keys = np.zeros((2, BATCH, 128), np.float32)
        for chunk, view1_images, view2_images in zip(chunks, first, second):
            z = np.asarray(_train_mode_z({"params": before.memory.ema_params, "batch_stats": before.batch_stats},
                                         chunk))
            z = z / np.linalg.norm(z, axis=1, keepdims=True)
            keys[0, view1_images], keys[1, view2_images] = z[:len(view1_images)], z[len(view1_images):]
        after = final if t + 1 == STEPS else history[t + 1][0]
        np.testing.assert_allclose(after.memory.queue[t % SLOTS], keys, atol=2e-6)
        assert np.isfinite(metrics["loss"])


def test_config_checks_the_queue_size_and_momentum():
    config = tiny_pretrain_config()
    config.batch_size = 64
    config.memory.size = 4096
    config_validation.validate(config, 8, 1)
    config.memory.size = 4000
    with pytest.raises(config_validation.ConfigError, match=r"memory.size=4000 .* multiple of 128, e.g. 3968"):
        config_validation.validate(config, 8, 1)
    config.memory.size, config.memory.momentum = 4096, 1.0
    with pytest.raises(config_validation.ConfigError, match=r"memory.momentum=1.0 is invalid"):
        config_validation.validate(config, 8, 1)
