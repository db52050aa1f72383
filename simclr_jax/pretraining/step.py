"""The SimCLR train state and the sharded train step (no TensorFlow here).

The step is ``jax.jit`` of a ``jax.shard_map`` body over the 1-D ``'data'``
mesh. Inside, each device sees its n images (two views each); BatchNorm
averages its moments over ``'data'`` (global BN) and NT-Xent gathers every
device's projections, so the result is the same for any device count. The
state is replicated (but for the memory queue's storage, split by image,
see memory.py); each device differentiates the (already device-averaged)
loss with respect to its copy of the parameters, and one float32 psum of
those gradients gives the global-batch gradient.

Kept free of TensorFlow so benchmarks can run it on machines without TF.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simclr_jax import sharding, updates
from simclr_jax.models.classifier import linear_classifier
from simclr_jax.pretraining import chunked
from simclr_jax.pretraining import memory as memory_lib
from simclr_jax.pretraining.losses import nt_xent
from simclr_jax.weights.checkpoint import PROBE

OBJECTIVE_SCALE = 2.0  # the step minimises 2L, as the official code (see make_train_step)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'encoder', 'head'} of the SimCLR model, plus PROBE when enabled
    batch_stats: Any
    opt_state: Any
    memory: Any = None  # memory_lib.Memory when config.memory.size > 0 (SimCLR v2's queue)


def state_partition_specs(state: TrainState) -> TrainState:
    """The state's placement over the mesh (a pytree prefix): all replicated,
    but for the memory queue."""
    return TrainState(step=P(), params=P(), batch_stats=P(), opt_state=P(),
                      memory=None if state.memory is None else memory_lib.PARTITION_SPECS)


def model_params(params: dict) -> dict:
    """The SimCLR model's parameters, without the online probe."""
    return {name: value for name, value in params.items() if name != PROBE}


def create_train_state(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    *,
    image_size: int,
    seed: int,
    mesh: Mesh,
    num_classes: int = 0,
) -> TrainState:
    """Initialises parameters once, replicated over the mesh.

    ``num_classes > 0`` adds the online linear probe's parameters.
    """

    def init(key):
        dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
        variables = model.init(key, dummy, train=False)
        params = dict(variables["params"])
        if num_classes:
            h = jax.eval_shape(lambda: model.apply(variables, dummy, train=False)[0])
            params[PROBE] = linear_classifier(num_classes).init(key, jnp.zeros(h.shape, h.dtype))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(params),
        )

    # rbg keys: same quality for init, and far cheaper for XLA:CPU to compile. The key is an
    # argument, not a constant: one compiled program (and cache entry) serves every seed.
    return jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(seed, impl="rbg"))


def make_train_step(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    *,
    learning_rate: Callable[[jax.Array], jax.Array],
    temperature: float,
    mesh: Mesh,
    num_classes: int = 0,
    loss_impl: str = "auto",
    microbatches: int = 1,
    memory_momentum: float = 0.999,
    unroll_chunks: bool | None = None,
    augment_views: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``.

    ``batch['views']`` is the global [N, 2, H, W, 3] array sharded on 'data';
    ``model`` must have been built with ``axis_name='data'``. The state
    argument is donated: its buffers are reused for the new state.
    ``loss_impl`` picks NT-Xent's form ('naive', 'blockwise', or 'auto':
    blockwise above 8192 global views, see losses.py).

    ``microbatches > 1`` runs the model on that many chunks per device, one
    at a time, and still contrasts every anchor with all 2N - 1 candidates
    (see chunked.py); only BatchNorm's grouping differs from one big batch.
    ``unroll_chunks`` unrolls its chunk loops (same numbers; no memory
    bound, see chunked.py); None: on a CPU mesh only, where it is faster.

    ``augment_views`` (``device_augment.from_config``; None: the views come
    augmented) finishes the cropped views on the devices, once per step and
    before anything reads them, from the keys of ``batch['augment_keys']``.

    A state with a ``memory`` (memory.py) also contrasts every anchor with
    the queue's keys, then moves the average network towards the new
    parameters with ``memory_momentum`` and enqueues this batch's keys.

    With ``num_classes > 0`` the batch also holds ``'label'`` [N], and an
    online linear probe on ``stop_gradient(h)`` of both views learns from it
    alongside (as the reference TF2 code does): it reports how linearly
    separable h is as training goes, and cannot change the encoder's gradient.

    A step whose loss or gradient is not finite changes nothing but the step
    counter (which the optimiser's counts follow, see ``updates.apply_if_finite``)
    and reports ``metrics['nonfinite'] = 1``.
    """
    if unroll_chunks is None:
        unroll_chunks = mesh.devices.flat[0].platform == "cpu"

    def forward(params, batch_stats, images):
        """(h, z) of ``images`` in train mode, and the updated BN statistics."""
        (h, z), mutated = model.apply(
            {"params": model_params(params), "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return (h, z), mutated["batch_stats"]

    def objective(params, h, z, labels, negatives):
        """(OBJECTIVE_SCALE * L + probe loss, (L, metrics)) of [2n] rows, view 1 then view 2;
        ``negatives``: None or (the queue's rows, how many are filled)."""
        n = z.shape[0] // 2
        queue, filled = (None, None) if negatives is None else negatives
        loss, metrics = nt_xent(z[:n], z[n:], temperature, axis_name=sharding.DATA_AXIS, impl=loss_impl,
                                negatives=queue, num_negatives=filled)
        # The official code minimises the sum of both directions' mean
        # cross-entropies, 2L. LARS does not undo the factor (it doubles the
        # steps of BN parameters and biases, and halves weight decay's share
        # in the trust ratio), so the published hyperparameters mean what
        # they meant there only for 2L. L is what is reported.
        total = OBJECTIVE_SCALE * loss
        if num_classes:
            logits = linear_classifier(num_classes).apply({"params": params[PROBE]}, jax.lax.stop_gradient(h))
            both_labels = jnp.concatenate([labels, labels])
            probe_loss = optax.softmax_cross_entropy_with_integer_labels(logits, both_labels).mean()
            probe_metrics = {
                "probe_loss": probe_loss,
                "probe_acc": jnp.mean(jnp.argmax(logits, -1) == both_labels),
            }
            probe_metrics = jax.lax.pmean(probe_metrics, sharding.DATA_AXIS)
            total = total + probe_metrics["probe_loss"]
            metrics = dict(metrics, **probe_metrics)
        return total, (loss, metrics)

    def gradients(state: TrainState, views: jax.Array, labels: jax.Array, negatives):
        """(grads, L, metrics, new BN statistics) of this device's views.

        The gradient is taken with respect to a per-device ("varying") copy
        of the float32 parameters and summed over devices by one psum of
        float32 gradients, as the official code sums them. Left to
        shard_map, the sum happens where each replicated parameter meets the
        device's data, after its cast to the compute dtype: in bfloat16.
        """
        params = jax.lax.pcast(state.params, sharding.DATA_AXIS, to="varying")
        if microbatches > 1:
            (_, (loss, metrics)), grads, batch_stats = chunked.value_and_grad(
                forward, lambda params, h, z: objective(params, h, z, labels, negatives),
                params, state.batch_stats, views, microbatches, unroll_chunks)
        else:
            images = _both_views(views)

            def loss_fn(params):
                (h, z), batch_stats = forward(params, state.batch_stats, images)
                total, (loss, metrics) = objective(params, h, z, labels, negatives)
                return total, (loss, metrics, batch_stats)

            (_, (loss, metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return jax.lax.psum(grads, sharding.DATA_AXIS), loss, metrics, batch_stats

    def key_projections(ema_params, batch_stats, views):
        """The moving-average network's z of this device's views, [2n, d], in train mode."""
        if microbatches > 1:  # chunk by chunk, so the keys cost no more memory than the step
            return chunked.projections(forward, ema_params, batch_stats, views, microbatches, unroll_chunks)
        return forward(ema_params, batch_stats, _both_views(views))[0][1]

    def step_on_device(state: TrainState, views: jax.Array, labels: jax.Array, *augment_keys: jax.Array):
        if augment_views is not None:  # this device's views, each from its own key
            views = augment_views(views, *augment_keys)
        memory = state.memory
        negatives = None if memory is None else memory_lib.negatives(memory, sharding.DATA_AXIS)
        grads, loss, metrics, batch_stats = gradients(state, views, labels, negatives)
        new_state, metrics = _apply_gradients(state, tx, learning_rate, grads, loss, metrics, batch_stats)
        if memory is not None:
            keys = key_projections(memory.ema_params, state.batch_stats, views)
            moved = memory_lib.update(memory, model_params(new_state.params), keys, memory_momentum)
            new_state = new_state.replace(memory=updates.where(metrics["nonfinite"] == 0, moved, memory))
        return new_state, metrics

    def train_step(state, batch):
        labels = batch["label"] if num_classes else jnp.zeros(batch["views"].shape[:1], jnp.int32)
        specs = state_partition_specs(state)
        keys = () if augment_views is None else (batch["augment_keys"],)
        sharded = jax.shard_map(step_on_device, mesh=mesh, in_specs=(specs, P(sharding.DATA_AXIS),
                                P(sharding.DATA_AXIS)) + (P(sharding.DATA_AXIS),) * len(keys),
                                out_specs=(specs, P()))
        return sharded(state, batch["views"], labels, *keys)

    return jax.jit(train_step, donate_argnums=0)


def _apply_gradients(state: TrainState, tx, learning_rate, grads, loss, metrics, batch_stats):
    """The guarded optimiser step (``updates.apply_if_finite``) and the step's metrics."""
    new_state, nonfinite = updates.apply_if_finite(state, tx, grads, loss, batch_stats)
    return new_state, dict(metrics, loss=loss, learning_rate=learning_rate(state.step), nonfinite=nonfinite)


def _both_views(views: jax.Array) -> jax.Array:
    """[n, 2, ...] -> [2n, ...]: view 1 of every image, then view 2, as one
    batch, so BatchNorm's statistics cover both views together."""
    return jnp.concatenate([views[:, 0], views[:, 1]], axis=0)
