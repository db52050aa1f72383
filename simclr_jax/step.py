"""The SimCLR train state and the sharded train step (no TensorFlow here).

The step is ``jax.jit`` of a ``jax.shard_map`` body over the 1-D ``'data'``
mesh. Inside, each device sees its n images (two views each); BatchNorm
averages its moments over ``'data'`` (global BN) and NT-Xent gathers every
device's projections, so the result is the same for any device count. The
state is replicated; with shard_map's replication checking, the gradient of
the (already device-averaged) loss with respect to the replicated parameters
comes back summed over devices, i.e. it is the global-batch gradient.

Kept free of TensorFlow so benchmarks can run it on machines without TF.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from simclr_jax import sharding
from simclr_jax.losses import nt_xent


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_train_state(
    model: flax.linen.Module, tx: optax.GradientTransformation, image_size: int, seed: int, mesh: Mesh
) -> TrainState:
    """Initialises parameters once, replicated over the mesh."""

    def init():
        dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
        # rbg keys: same quality for init, and XLA:CPU compiles them ~4x faster.
        variables = model.init(jax.random.key(seed, impl="rbg"), dummy, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(params),
        )

    return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def make_train_step(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    learning_rate: Callable[[jax.Array], jax.Array],
    temperature: float,
    mesh: Mesh,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``.

    ``batch['views']`` is the global [N, 2, H, W, 3] array sharded on 'data';
    ``model`` must have been built with ``axis_name='data'``. The state
    argument is donated: its buffers are reused for the new state.
    """

    def step_on_device(state: TrainState, views: jax.Array):
        n = views.shape[0]
        # One forward pass over both views so BatchNorm statistics cover all 2N.
        images = jnp.concatenate([views[:, 0], views[:, 1]], axis=0)

        def loss_fn(params):
            (_, z), updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss, metrics = nt_xent(z[:n], z[n:], temperature, axis_name=sharding.DATA_AXIS)
            return loss, (metrics, updates["batch_stats"])

        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = dict(metrics, loss=loss, learning_rate=learning_rate(state.step))
        return new_state, metrics

    sharded = jax.shard_map(
        step_on_device,
        mesh=mesh,
        in_specs=(P(), P(sharding.DATA_AXIS)),
        out_specs=(P(), P()),
    )
    return jax.jit(lambda state, batch: sharded(state, batch["views"]), donate_argnums=0)
