"""SimCLR v2's memory: a moving-average network whose projections queue up as negatives.

Chen et al. 2020b (SimCLR v2) take MoCo's memory (He et al. 2019): a copy of
encoder and head whose weights follow the trained ones as an exponential
moving average, ema <- m * ema + (1 - m) * params, produces "key"
projections of every step's views; a FIFO queue keeps the last Q of them,
and NT-Xent contrasts each anchor with the queue as well as with the 2N - 1
in-batch candidates. The queue only ever supplies negatives, and a step's
own keys join it after its loss, so they are never contrasted with their
own images.

The queue is global and device-count independent: ``queue[s, v, i]`` is the
key of view v + 1 of image i of the global batch from the latest step
written to slot s (slots are written in turn, ``count % slots``). Its image
axis is sharded over 'data', so each device stores and writes only its own
images' keys (no communication to enqueue) and every device gathers the
whole queue to contrast with it. Q = slots * 2 * batch_size.

The key network runs in train mode: BatchNorm normalises with the batch's
own statistics (global over devices, as the online network; its moving
statistics are not kept, nothing ever evaluates it).
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from simclr_jax import sharding
from simclr_jax.numerics import l2_normalize

QUEUE_SPEC = P(None, None, sharding.DATA_AXIS)  # [slots, 2, batch, dim], images split over devices


@flax.struct.dataclass
class Memory:
    ema_params: Any  # moving average of the SimCLR model's params (encoder and head)
    queue: jax.Array  # [slots, 2, global batch, proj dim] float32, l2-normalised keys
    count: jax.Array  # int32: steps enqueued so far (slot count % slots is written next)


# Where each part lives on the mesh (a prefix of a Memory for shard_map and jit):
# the queue split by image, the rest replicated.
PARTITION_SPECS = Memory(ema_params=P(), queue=QUEUE_SPEC, count=P())


def create(model_params: Any, size: int, batch_size: int, proj_dim: int, mesh: Mesh) -> Memory:
    """An empty queue of ``size`` keys (a multiple of 2 * ``batch_size``) and a
    moving average that starts at (a copy of) ``model_params``."""
    slots = size // (2 * batch_size)

    def init(params):
        return Memory(ema_params=params, queue=jnp.zeros((slots, 2, batch_size, proj_dim), jnp.float32),
                      count=jnp.zeros((), jnp.int32))

    placement = jax.tree.map(lambda spec: NamedSharding(mesh, spec), PARTITION_SPECS,
                             is_leaf=lambda x: isinstance(x, P))
    return jax.jit(init, out_shardings=placement)(model_params)


def negatives(memory: Memory, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """(the whole queue as [Q, dim] rows, how many lead rows are filled), inside shard_map.

    Slots fill in order 0, 1, ..., so the filled ones are the first
    min(count, slots); once full, every row counts.
    """
    queue = jax.lax.all_gather(memory.queue, axis_name, axis=2, tiled=True)  # [S, 2, N, d]
    slots, rows_per_slot = queue.shape[0], queue.shape[1] * queue.shape[2]
    filled = jnp.minimum(memory.count, slots) * rows_per_slot
    return queue.reshape(slots * rows_per_slot, queue.shape[-1]), filled


def update(memory: Memory, model_params: Any, keys: jax.Array, momentum: float) -> Memory:
    """The memory after a step: the average moved towards the new ``model_params``,
    and this device's ``keys`` ([2n, dim]: view 1 of its images, then view 2)
    written into the next slot, replacing the oldest."""
    ema_params = jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, memory.ema_params, model_params)
    slot_keys = l2_normalize(keys.astype(jnp.float32)).reshape(1, 2, -1, keys.shape[-1])
    slot = memory.count % memory.queue.shape[0]
    queue = jax.lax.dynamic_update_slice_in_dim(memory.queue, slot_keys, slot, axis=0)
    return Memory(ema_params=ema_params, queue=queue, count=memory.count + 1)
