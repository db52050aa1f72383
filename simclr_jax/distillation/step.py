"""The distillation train step: a fixed teacher teaches a student, jit(shard_map) over 'data'.

The teacher runs in inference mode on the student's own augmented images,
inside the step (its logits are never stored, and each device computes
those of its rows), and takes no gradient: its variables and classifier are
arguments of the step, not part of the state it returns, so no step can
change them. The student (encoder, head up to its head layer and a linear
classifier) trains as fine-tuning does, with global BatchNorm.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from simclr_jax import sharding, updates
from simclr_jax.distillation.losses import distillation_loss, supervised_sum
from simclr_jax.models.classifier import features_at, head_logits, keep_unused_head_stats, linear_classifier

DATA = sharding.DATA_AXIS


@flax.struct.dataclass
class StudentState:
    step: jax.Array
    params: Any  # {'model': the student SimCLR's params, 'classifier': {'kernel', 'bias'}}
    batch_stats: Any  # the student's BatchNorm statistics
    opt_state: Any


def make_distill_step(student, teacher, tx: optax.GradientTransformation, mesh, *, num_classes: int,
                      student_head_layer: int, teacher_head_layer: int, temperature: float, alpha: float):
    """jit(shard_map) ``step(state, teacher_variables, teacher_head, images, labels) -> (state, metrics)``.

    ``labels`` [N]: -1 for unlabelled images; the labelled ones add ``alpha``
    times the student's cross-entropy, averaged over every labelled image of
    the global batch. The distillation term is averaged over all images.
    ``student`` has axis_name='data' (global BatchNorm); the teacher needs none.
    """
    classifier = linear_classifier(num_classes)

    def on_device(state, teacher_variables, teacher_head, images, labels):
        targets = lax.stop_gradient(head_logits(teacher, teacher_variables, teacher_head, images,
                                                teacher_head_layer))

        def loss_fn(params):
            variables = {"params": params["model"], "batch_stats": state.batch_stats}
            features, stats = features_at(student, variables, images, student_head_layer, train=True)
            stats = keep_unused_head_stats(stats, state.batch_stats, student_head_layer)
            logits = classifier.apply({"params": params["classifier"]}, features)
            loss = lax.pmean(distillation_loss(targets, logits, temperature), DATA)
            total, count = lax.psum(supervised_sum(logits, labels), DATA)
            objective = loss + alpha * total / jnp.maximum(count, 1)
            agreement = lax.pmean(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)), DATA)
            return objective, (loss, agreement, stats)

        (objective, (loss, agreement, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, nonfinite = updates.apply_if_finite(state, tx, grads, objective, stats)
        return new_state, {"objective": objective, "distillation_loss": loss, "teacher_agreement": agreement,
                           "nonfinite": nonfinite}

    sharded = jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P(), P(), P(DATA), P(DATA)),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)
