"""SimCLR v2's third step: distilling a fine-tuned teacher into a student.

Chen et al. 2020b (arXiv:2006.10029), section 2: the student learns from the
teacher's softened class distribution on unlabelled images,

    L = - sum_x sum_y P_T(y | x; tau) log P_S(y | x; tau),

with P(y | x; tau) = softmax(logits / tau) and tau = 1 in the paper; the
teacher is fixed (its logits carry no gradient). Optionally a supervised
cross-entropy on the labelled examples joins it with weight alpha.

step.py trains a student on these; experiment.py runs configs/distill.py.
"""
import jax
import jax.numpy as jnp


def _check_temperature(temperature) -> None:
    if not temperature > 0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")


def distillation_loss(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
    """Mean over the batch of the cross-entropy from the teacher's softened
    distribution to the student's, [B, C] logits each; no gradient reaches
    the teacher's logits."""
    _check_temperature(temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {teacher_logits.shape} and student logits {student_logits.shape} "
                         "differ: teacher and student must share one label set")
    teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.mean(jnp.sum(teacher * student, axis=-1))


def supervised_sum(student_logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the student's cross-entropy over the labelled rows, their count);
    ``labels`` [B] int, -1 = unlabelled. Sums, so devices can add them up."""
    labelled = labels >= 0
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    return -jnp.sum(jnp.where(labelled, picked, 0.0)), jnp.sum(labelled)
