"""The optimiser's schedule counts follow state.step, skipped steps included.

A step with a non-finite loss is skipped (parameters and momentum kept) but
still counts: the learning rate it logs, and the one the next update applies,
are the schedule at that step's index. Run on 8 devices with the online probe,
so Adam's count under multi_transform is covered alongside LARS's.
"""
import jax
import numpy as np
import optax
import pytest

from simclr_jax import optim, sharding
from simclr_jax.pretraining import step as train
from simclr_jax.weights.checkpoint import PROBE
from tests.helpers import tiny_simclr

IMAGE_SIZE = 16
GLOBAL_BATCH = 16
NUM_CLASSES = 10
NAN_STEP = 2
NUM_STEPS = 6
# Warm-up over steps 0-1, cosine over 2-5: lr = 0, peak/2, peak, 3/4 peak, peak/4, 0.
SCHEDULE = optim.schedule(optim.peak_learning_rate(1.0, GLOBAL_BATCH, "linear"), warmup_steps=2, total_steps=5)
WEIGHT_DECAY = 1e-4
PROBE_LR = 1e-3


def _model():
    return tiny_simclr(sharding.DATA_AXIS)


def _tx(learning_rate):
    return optim.with_adam_for(PROBE, optim.lars(learning_rate, weight_decay=WEIGHT_DECAY), PROBE_LR)


def _batch(i):
    rng = np.random.default_rng(i)
    views = rng.uniform(size=(GLOBAL_BATCH, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    if i == NAN_STEP:
        views[0, 0, 0, 0, 0] = np.nan
    return {"views": views, "label": np.arange(GLOBAL_BATCH, dtype=np.int32) % NUM_CLASSES}


def _counts(opt_state):
    return [int(count) for _, count in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]


@pytest.fixture(scope="module")
def run():
    """Host copies of the state before every step and after the last, and each step's metrics."""
    mesh = sharding.make_mesh(jax.devices()[:8])
    tx = _tx(SCHEDULE)
    state = train.create_train_state(_model(), tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh, num_classes=NUM_CLASSES)
    step = train.make_train_step(_model(), tx, learning_rate=SCHEDULE, temperature=0.5, mesh=mesh,
                                 num_classes=NUM_CLASSES)
    states, metrics = [jax.device_get(state)], []
    for i in range(NUM_STEPS):
        state, m = step(state, sharding.put_batch(_batch(i), mesh))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return mesh, states, metrics


def test_every_count_is_the_step(run):
    _, states, metrics = run
    assert [float(m["nonfinite"]) for m in metrics] == [float(i == NAN_STEP) for i in range(NUM_STEPS)]
    for state in states:
        # LARS's ScaleByScheduleState and the probe's ScaleByAdamState.
        assert _counts(state.opt_state) == [int(state.step)] * 2


def test_logged_learning_rate_is_the_schedule_at_the_step(run):
    _, _, metrics = run
    got = [float(m["learning_rate"]) for m in metrics]
    np.testing.assert_allclose(got, [float(SCHEDULE(i)) for i in range(NUM_STEPS)], rtol=1e-6, atol=1e-7)
    assert got[-1] == 0.0  # the schedule reaches its end despite the skipped step


def test_step_after_the_skip_applies_the_schedule_at_its_own_index(run):
    """The update at step NAN_STEP + 1 is LARS with the constant learning rate that
    step logged, SCHEDULE(NAN_STEP + 1), applied to the state from before the
    skipped step (which must have changed nothing)."""
    mesh, states, metrics = run
    before_skip, after_skip, after_next = states[NAN_STEP], states[NAN_STEP + 1], states[NAN_STEP + 2]
    jax.tree.map(np.testing.assert_array_equal,
                 (before_skip.params, before_skip.batch_stats), (after_skip.params, after_skip.batch_stats))

    lr = float(metrics[NAN_STEP + 1]["learning_rate"])
    np.testing.assert_allclose(lr, float(SCHEDULE(NAN_STEP + 1)), rtol=1e-6)
    assert abs(lr - float(SCHEDULE(NAN_STEP))) > 0.1 * lr  # the off-by-one would show
    reference_tx = _tx(lambda count: lr)  # same state structure, count-free learning rate
    reference_step = train.make_train_step(_model(), reference_tx, learning_rate=lambda s: lr, temperature=0.5,
                                           mesh=mesh,
                                           num_classes=NUM_CLASSES)
    state = jax.device_put(before_skip, sharding.replicated(mesh))
    reference, _ = jax.device_get(reference_step(state, sharding.put_batch(_batch(NAN_STEP + 1), mesh)))

    # LARS updates each tensor from its own gradient, which the probe cannot change.
    def assert_same_update(path, start, got, want):
        scale = np.abs(want - start).max()
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(got - start, want - start, rtol=0, atol=1e-4 * scale,
                                   err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(
        assert_same_update, *(train.model_params(s.params) for s in (before_skip, after_next, reference)))
