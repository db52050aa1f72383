"""SimCLR v2 distillation: the loss against numpy (float64), with its gradients,
and the train step against jax.grad of the global-batch objective written out."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import models, sharding
from simclr_jax.distillation.losses import distillation_loss, supervised_sum
from simclr_jax.distillation.step import StudentState, make_distill_step
from simclr_jax.models.classifier import features_at
from tests.helpers import IMAGE_SIZE, WIDTH_MULTIPLIER, capture_gradient, relative_error, tiny_pretrain_config


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _logits(seed, shape=(6, 5)):
    return np.random.default_rng(seed).normal(scale=3.0, size=shape).astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_loss_and_gradient_equal_numpy(temperature):
    teacher, student = _logits(0), _logits(1)
    p_t = _softmax(teacher.astype(np.float64) / temperature)
    p_s = _softmax(student.astype(np.float64) / temperature)
    want = -np.mean(np.sum(p_t * np.log(p_s), axis=-1))
    # d/ds of -sum_y p_t log softmax(s / tau), averaged over B rows: (p_s - p_t) / (tau B).
    want_grad = (p_s - p_t) / (temperature * teacher.shape[0])

    loss, (teacher_grad, student_grad) = jax.value_and_grad(distillation_loss, argnums=(0, 1))(
        jnp.asarray(teacher), jnp.asarray(student), temperature)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(student_grad), want_grad, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(teacher_grad))  # the teacher is fixed


def test_the_student_that_matches_the_teacher_is_the_minimum():
    # Cross-entropy is smallest when the student's distribution is the teacher's:
    # there it equals the teacher's entropy and the gradient vanishes.
    teacher = _logits(0)
    loss, grad = jax.value_and_grad(distillation_loss, argnums=1)(jnp.asarray(teacher), jnp.asarray(teacher), 1.0)
    p_t = _softmax(teacher.astype(np.float64))
    np.testing.assert_allclose(float(loss), -np.mean(np.sum(p_t * np.log(p_t), -1)), rtol=1e-6)
    assert np.abs(np.asarray(grad)).max() < 1e-6
    assert float(distillation_loss(jnp.asarray(teacher), jnp.asarray(_logits(1)), 1.0)) > float(loss)


def test_supervised_term_counts_labelled_rows_only():
    """supervised_sum: the student's cross-entropy summed over the labelled rows
    (-1 = unlabelled) and their count, which the step adds up over devices."""
    student, labels = _logits(1), np.array([2, -1, 0, -1, 4, 1])
    log_p = np.log(_softmax(student.astype(np.float64)))
    labelled = labels >= 0
    total, count = supervised_sum(jnp.asarray(student), jnp.asarray(labels))
    np.testing.assert_allclose(float(total), -np.sum(log_p[labelled, labels[labelled]]), rtol=1e-6)
    assert int(count) == 4
    total, count = supervised_sum(jnp.asarray(student), jnp.full(6, -1))
    assert float(total) == 0.0 and int(count) == 0


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(_logits(0), _logits(1), temperature)


def test_class_counts_must_agree():
    with pytest.raises(ValueError, match="must share one label set"):
        distillation_loss(_logits(0, (6, 5)), _logits(1, (6, 10)), 1.0)


# ------------------------------------------------------------ the train step

GLOBAL_BATCH = 16
NUM_CLASSES = 5
TEMPERATURE, ALPHA = 2.0, 0.5


def _networks(axis_name):
    """(teacher, student): the tiny test architecture, and the student at half its width."""
    teacher = models.model_from_config(tiny_pretrain_config().model)
    student = models.model_from_config(tiny_pretrain_config(width_multiplier=WIDTH_MULTIPLIER / 2).model,
                                       axis_name=axis_name)
    return teacher, student


def _noisy(tree, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), tree)


def _setup():
    """Teacher variables and head, the student's initial params and statistics, images, labels."""
    teacher, student = _networks(None)
    images = np.random.default_rng(0).uniform(size=(GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    init = lambda model: jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images[:2])
    teacher_init = init(teacher)
    teacher_variables = {"params": _noisy(teacher_init["params"], 1), "batch_stats": teacher_init["batch_stats"]}
    dim = jax.eval_shape(lambda v: features_at(teacher, v, images[:1], 1, False)[0], teacher_variables).shape[-1]
    rng = np.random.default_rng(2)
    teacher_head = {"kernel": rng.normal(size=(dim, NUM_CLASSES)).astype(np.float32),
                    "bias": rng.normal(size=(NUM_CLASSES,)).astype(np.float32)}
    student_variables = init(student)
    student_dim = jax.eval_shape(lambda v: features_at(student, v, images[:1], 1, False)[0],
                                 student_variables).shape[-1]
    # A non-zero classifier, so the gradient reaches the encoder on the first step.
    params = {"model": _noisy(student_variables["params"], 3),
              "classifier": {"kernel": 0.1 * rng.normal(size=(student_dim, NUM_CLASSES)).astype(np.float32),
                             "bias": np.zeros(NUM_CLASSES, np.float32)}}
    labels = np.array([3, -1, -1, 0, -1, 4, -1, -1, 1, -1, -1, -1, 2, -1, 0, -1], np.int32)
    return teacher_variables, teacher_head, params, student_variables["batch_stats"], images, labels


def _direct_objective(params, batch_stats, teacher_variables, teacher_head, images, labels):
    """The global-batch objective on one device, written out: BatchNorm over all images."""
    teacher, student = _networks(None)
    targets = features_at(teacher, teacher_variables, images, 1, False)[0] @ teacher_head["kernel"] \
        + teacher_head["bias"]
    features, _ = features_at(student, {"params": params["model"], "batch_stats": batch_stats}, images, 1, True)
    logits = features @ params["classifier"]["kernel"] + params["classifier"]["bias"]
    p_t = jax.nn.softmax(jax.lax.stop_gradient(targets) / TEMPERATURE)
    loss = -jnp.mean(jnp.sum(p_t * jax.nn.log_softmax(logits / TEMPERATURE), -1))
    labelled = labels >= 0
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(labels, 0)[:, None], -1)[:, 0]
    return loss - ALPHA * jnp.sum(jnp.where(labelled, picked, 0.0)) / jnp.sum(labelled)


@pytest.fixture(scope="module")
def reference():
    """_setup(), and the direct objective's value and gradient there (compiled, once for both tests)."""
    teacher_variables, teacher_head, params, batch_stats, images, labels = setup = _setup()
    want = jax.jit(jax.value_and_grad(_direct_objective))(params, batch_stats, teacher_variables, teacher_head,
                                                          images, labels)
    return jax.device_get(setup), jax.device_get(want)  # host copies: the step donates what it is given


@pytest.mark.parametrize("num_devices", [1, 8])
def test_distill_step_gradient_is_that_of_the_global_objective_and_the_teacher_never_changes(reference, num_devices):
    (teacher_variables, teacher_head, params, batch_stats, images, labels), (want_objective, want_grads) = reference

    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    teacher, student = _networks(sharding.DATA_AXIS)
    tx = capture_gradient()
    state = StudentState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                         opt_state=tx.init(params))
    state = sharding.put_replicated(state, mesh)
    frozen = sharding.put_replicated((teacher_variables, teacher_head), mesh)
    before = jax.device_get(frozen)
    step = make_distill_step(student, teacher, tx, mesh, num_classes=NUM_CLASSES, student_head_layer=1,
                             teacher_head_layer=1, temperature=TEMPERATURE, alpha=ALPHA)
    batch = sharding.put_batch({"image": images, "label": labels}, mesh)
    new_state, metrics = step(state, *frozen, batch["image"], batch["label"])
    new_state, _ = step(new_state, *frozen, batch["image"], batch["label"])  # the teacher is used twice

    np.testing.assert_allclose(float(metrics["objective"]), float(want_objective), rtol=1e-5)
    got = jax.device_get(new_state.opt_state)
    error = relative_error(got, want_grads)
    assert error < 2e-5, error
    learning = (want_grads["classifier"], want_grads["model"]["encoder"])  # head layers past 1 feed nothing
    assert min(float(np.max(np.abs(g))) for g in jax.tree.leaves(learning)) > 0
    after = jax.device_get(frozen)  # the step's arguments, still alive (not donated) and unchanged
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert int(new_state.step) == 2 and 0 <= float(metrics["teacher_agreement"]) <= 1
