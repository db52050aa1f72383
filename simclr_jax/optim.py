"""Every optimiser, learning-rate schedule and step count of the protocols.

Pretraining, linear evaluation, fine-tuning and distillation all build their
optimiser with ``create`` and their schedule with ``schedule``; ``steps``
turns epochs into steps for all of them.

LARS is optax's own chain (add_decayed_weights -> masked scale_by_trust_ratio ->
scale_by_learning_rate -> trace), which for each adapted tensor computes

    g <- g + wd * w
    trust = eta * ||w|| / ||g||      (1 when either norm is 0)
    v <- m * v + lr_t * trust * g
    w <- w - v

exactly as SimCLR's reference LARS does: the learning rate is applied BEFORE
the momentum trace, so a schedule changes only the newest term of v.
"""
import math
from typing import Callable, Union

import jax
import jax.numpy as jnp
import optax

MOMENTUM = 0.9  # every SimCLR optimiser's: LARS in pretraining, Nesterov SGD in the supervised protocols
OPTIMIZERS = ("lars", "momentum")
DECAYS = ("cosine", "constant")
SCALINGS = ("linear", "sqrt")


def steps(epochs: float, num_examples: float, batch_size: int = 1) -> int:
    """round(epochs x num_examples / batch_size): ``steps(epochs, steps_per_epoch)``
    when an epoch is a whole number of steps, ``steps(epochs, n, batch)`` when not."""
    return int(round(epochs * num_examples / batch_size))


def peak_learning_rate(base: float, batch_size: int, scaling: str = "linear") -> float:
    """base x B/256 ('linear', the paper's rule) or base x sqrt(B) ('sqrt', SimCLR v2's)."""
    if scaling not in SCALINGS:
        raise ValueError(f"Unknown lr scaling {scaling!r}; use 'linear' or 'sqrt'")
    return base * batch_size / 256.0 if scaling == "linear" else base * math.sqrt(batch_size)


def schedule(peak, *, total_steps: int, warmup_steps: int = 0,
             decay: str = "cosine") -> Union[float, optax.Schedule]:
    """Linear warm-up from 0 to ``peak`` over warmup_steps, then a cosine to 0
    at total_steps (and 0 after), or constant.

    A constant rate without warm-up is returned as the number itself, so the
    optimiser keeps no schedule count (its state is what it always was).
    ``peak`` may be traced (a swept hyperparameter inside jit).
    """
    if decay not in DECAYS:
        raise ValueError(f"Unknown decay {decay!r}; use one of {DECAYS}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if decay == "constant" and not warmup_steps:
        return peak
    decay_steps = total_steps - warmup_steps

    def rate(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * step / max(warmup_steps, 1)
        if decay == "constant":
            return jnp.where(step < warmup_steps, warmup, peak)
        progress = jnp.clip((step - warmup_steps) / max(decay_steps, 1), 0.0, 1.0)
        return jnp.where(step < warmup_steps, warmup, 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress)))

    return rate


def adapt_mask(params):
    """True for the leaves LARS decays and trust-scales: those with ndim > 1.

    The rule reads the tree itself, so it needs no layer names: conv and dense
    kernels have ndim >= 2, while BatchNorm scale/bias and dense biases are
    vectors (ndim <= 1). SimCLR excludes exactly the BN and bias parameters
    from both weight decay and layer adaptation.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def lars(learning_rate, weight_decay: float, momentum: float = MOMENTUM, trust_coefficient: float = 1e-3,
         eps: float = 0.0) -> optax.GradientTransformation:
    """SimCLR's LARS; leaves with ndim <= 1 get plain momentum SGD (v <- m*v + lr*g).

    ``learning_rate`` is a float or an optax schedule (called with the step count,
    0 on the first update).
    """
    return optax.lars(learning_rate=learning_rate, weight_decay=weight_decay, weight_decay_mask=adapt_mask,
                      trust_coefficient=trust_coefficient, eps=eps, trust_ratio_mask=adapt_mask,
                      momentum=momentum, nesterov=False)


def create(name: str, learning_rate, *, weight_decay: float, decay_mask: Callable = adapt_mask,
           momentum: float = MOMENTUM, trust_coefficient: float = 1e-3) -> optax.GradientTransformation:
    """'lars' (pretraining's; decays and adapts the ndim > 1 leaves) or
    'momentum' (SGD with Nesterov momentum, the supervised protocols'; weight
    decay on the leaves ``decay_mask`` marks)."""
    if name == "lars":
        return lars(learning_rate, weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
    if name == "momentum":
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                           optax.sgd(learning_rate, momentum=momentum, nesterov=True))
    raise ValueError(f"Unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def with_adam_for(key: str, tx: optax.GradientTransformation, learning_rate: float) -> optax.GradientTransformation:
    """``tx`` for every top-level parameter but ``key``, which Adam trains.

    Pretraining's online probe: LARS would scale its steps by ||w||/||g||,
    which leaves a zero-initialised classifier all but frozen; Adam's steps
    do not depend on the scale of h, so one learning rate suits every encoder.
    """
    # The label "model" names the rest in the optimiser state: checkpoints hold it.
    labels = lambda params: {name: key if name == key else "model" for name in params}
    return optax.multi_transform({"model": tx, key: optax.adam(learning_rate)}, labels)
