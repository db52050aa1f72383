"""LARS and the learning-rate schedule of SimCLR.

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

import jax
import jax.numpy as jnp
import optax


def adapt_mask(params):
    """True for the leaves LARS decays and trust-scales: those with ndim > 1.

    The rule reads the tree itself, so it needs no layer names: conv and dense
    kernels have ndim >= 2, while BatchNorm scale/bias and dense biases are
    vectors (ndim <= 1). SimCLR excludes exactly the BN and bias parameters
    from both weight decay and layer adaptation.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def lars(learning_rate, weight_decay: float, momentum: float = 0.9,
         trust_coefficient: float = 1e-3,
         eps: float = 0.0) -> optax.GradientTransformation:
    """SimCLR's LARS; leaves with ndim <= 1 get plain momentum SGD (v <- m*v + lr*g).

    ``learning_rate`` is a float or an optax schedule (called with the step count,
    0 on the first update).
    """
    return optax.lars(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=adapt_mask,
        trust_coefficient=trust_coefficient,
        eps=eps,
        trust_ratio_mask=adapt_mask,
        momentum=momentum,
        nesterov=False,
    )


def learning_rate_schedule(base_learning_rate: float, batch_size: int,
                           scaling: str, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the scaled peak, then cosine decay to 0.

    peak = base * B / 256 ('linear') or base * sqrt(B) ('sqrt'); the cosine
    spans total_steps - warmup_steps and stays at 0 after total_steps.
    """
    if scaling == "linear":
        peak = base_learning_rate * batch_size / 256.0
    elif scaling == "sqrt":
        peak = base_learning_rate * math.sqrt(batch_size)
    else:
        raise ValueError(f"Unknown lr scaling {scaling!r}; use 'linear' or 'sqrt'")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")

    decay_steps = total_steps - warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup_lr = peak * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(decay_steps, 1), 0.0, 1.0)
        cosine_lr = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warmup_lr, cosine_lr)

    return schedule


def total_train_steps(config, steps_per_epoch: int) -> int:
    """num_train_steps when set (> 0), else num_epochs * steps_per_epoch."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(round(config.num_epochs * steps_per_epoch))


def create_optimizer(config, steps_per_epoch: int):
    """LARS with SimCLR's schedule from a training config.

    Reads batch_size, num_epochs (or num_train_steps when set and > 0) and
    optimizer.{base_learning_rate, lr_scaling, warmup_epochs, weight_decay,
    momentum, trust_coefficient}. Returns (optimizer, schedule); the schedule
    is for logging the learning rate.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    total_steps = total_train_steps(config, steps_per_epoch)
    opt = config.optimizer
    warmup_steps = min(int(round(opt.warmup_epochs * steps_per_epoch)), total_steps)
    schedule = learning_rate_schedule(
        base_learning_rate=opt.base_learning_rate,
        batch_size=config.batch_size,
        scaling=opt.lr_scaling,
        warmup_steps=warmup_steps,
        total_steps=total_steps)
    tx = lars(
        learning_rate=schedule,
        weight_decay=opt.weight_decay,
        momentum=opt.momentum,
        trust_coefficient=opt.trust_coefficient)
    return tx, schedule
