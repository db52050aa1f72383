"""The guarded optimiser update every train step shares: nothing is applied
when the loss or gradient is not finite, and the step says so (the loop's
non-finite guard then stops or skips, see loop.py)."""
from typing import Any

import jax
import jax.numpy as jnp
import optax


def apply_if_finite(state: Any, tx: optax.GradientTransformation, grads: Any, loss: jax.Array,
                    batch_stats: Any) -> tuple[Any, jax.Array]:
    """(``state`` after the optimiser step, 1.0 if it was skipped else 0.0).

    ``state`` has ``step``, ``params``, ``batch_stats`` and ``opt_state``. A
    non-finite loss or gradient leaves parameters, optimiser state and
    BatchNorm statistics as they were, but the step (and the optimiser's
    schedule counts, which follow it) advances: the loop decides to stop or
    go on.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    new_step = state.step + 1
    new_state = state.replace(
        step=new_step,
        params=where(finite, optax.apply_updates(state.params, updates), state.params),
        batch_stats=where(finite, batch_stats, state.batch_stats),
        opt_state=_counts_follow_step(where(finite, opt_state, state.opt_state), new_step),
    )
    return new_state, 1.0 - finite.astype(jnp.float32)


def where(condition: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` holds, else ``old``, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def _counts_follow_step(opt_state: Any, step: jax.Array) -> Any:
    """``opt_state`` with every optax ``count`` set to ``step``.

    The schedules inside the optimiser (LARS's learning rate, Adam's bias
    correction) read their own counts, which a skipped non-finite step would
    leave behind ``state.step``: the logged ``learning_rate(step)`` would no
    longer be the applied one, and the schedule would never reach its end.
    """
    if not optax.tree_utils.tree_get_all_with_path(opt_state, "count"):
        return opt_state  # no schedule, e.g. LARS with a constant learning rate
    return optax.tree_utils.tree_set(opt_state, count=step)
