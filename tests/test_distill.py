"""SimCLR v2 distillation's loss against numpy (float64), with its gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.distillation.losses import distillation_loss, distillation_objective


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
    teacher, student = _logits(0), _logits(1)
    labels = np.array([2, -1, 0, -1, 4, 1])
    alpha = 0.3
    log_p = np.log(_softmax(student.astype(np.float64)))
    labelled = labels >= 0
    supervised = -np.mean(log_p[labelled, labels[labelled]])
    want = float(distillation_loss(teacher, student, 1.0)) + alpha * supervised
    got = distillation_objective(jnp.asarray(teacher), jnp.asarray(student), 1.0, jnp.asarray(labels), alpha)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    none_labelled = distillation_objective(teacher, student, 1.0, np.full(6, -1), alpha)
    np.testing.assert_allclose(float(none_labelled), float(distillation_loss(teacher, student, 1.0)), rtol=1e-7)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(_logits(0), _logits(1), temperature)


def test_class_counts_must_agree():
    with pytest.raises(ValueError, match="must share one label set"):
        distillation_loss(_logits(0, (6, 5)), _logits(1, (6, 10)), 1.0)
