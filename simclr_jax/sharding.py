"""Device mesh, shardings and host-to-device placement: the one place for them.

SimCLR is pure data parallelism: a 1-D mesh with axis ``'data'`` over every
device of every process. Parameters, BatchNorm statistics and optimiser state
are replicated; the batch is split on its leading axis. The train step runs
as ``jax.jit(jax.shard_map(...))`` so the two collectives the method needs
(global BatchNorm moments and the all-gather of projections) are explicit.
"""
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``'data'``; the rest of each array is whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, num_devices: int, num_processes: int, field: str = "batch_size") -> None:
    """Fails early, with what to do, if a global batch cannot be split evenly."""
    if batch_size <= 0 or batch_size % num_devices or batch_size % num_processes:
        raise ValueError(  # config_validation turns it into a ConfigError
            f"config.{field}={batch_size} must be a positive multiple of the {num_devices} devices in the "
            f"mesh (and of the {num_processes} processes); set --config.{field} to a multiple of "
            f"{num_devices}.")


def per_process_batch_size(global_batch_size: int) -> int:
    return global_batch_size // jax.process_count()


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's numpy batch into global arrays sharded on 'data'.

    Each process passes only its own rows; the global batch is the
    concatenation of all processes' rows in process order.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree (identical on all processes) on every device."""
    return jax.device_put(tree, replicated(mesh))


def gather(tree: Any) -> Any:
    """Numpy copies on every process: global arrays whole, per-process arrays
    (numpy or local) concatenated in process order."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return multihost_utils.process_allgather(tree, tiled=True)


def _padded_global_batches(dataset: Any, mesh: Mesh, batch_size: int):
    """Yields (images on the mesh, valid [B], labels [B]) per global batch of B rows.

    Each process's batch is padded to ``batch_size`` so a function of it
    compiles once and splits evenly over the mesh; a process that has run out
    contributes padding until all have. ``valid`` and ``labels`` are numpy,
    the same on every process.
    """
    spec = dataset.element_spec
    empty = {key: np.zeros((0,) + tuple(spec[key].shape[1:]), spec[key].dtype.as_numpy_dtype)
             for key in ("image", "label")}
    batches = dataset.as_numpy_iterator()
    while True:
        batch = next(batches, empty)
        n = len(batch["label"])
        pad = lambda x: np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        # A small gather first: it tells every process whether any still has data.
        rows = gather({"valid": np.arange(batch_size) < n, "label": pad(batch["label"])})
        if not rows["valid"].any():
            return
        yield put_batch(pad(batch["image"]), mesh), rows["valid"], rows["label"]


def map_padded_batches(fn: Any, dataset: Any, mesh: Mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(fn outputs, labels) over one pass of {'image', 'label'} batches, all processes' rows.

    ``dataset`` yields this process's batches of at most ``batch_size`` rows
    (the per-process batch size). Each is padded to ``batch_size`` so ``fn``
    compiles once and splits evenly over the mesh. Processes may hold
    different numbers of batches (uneven slices): one that has run out
    contributes padding until all have, and the valid rows of every process
    are gathered, so every process returns the same arrays.
    """
    outputs, labels = [], []
    for images, valid, batch_labels in _padded_global_batches(dataset, mesh, batch_size):
        outputs.append(gather(fn(images))[valid])
        labels.append(batch_labels[valid])
    if not outputs:
        raise ValueError("the evaluation split is empty")
    return np.concatenate(outputs), np.concatenate(labels)


def map_sharded_batches(fn: Any, dataset: Any, mesh: Mesh, batch_size: int
                        ) -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """(outputs, rows, labels): ``map_padded_batches`` with the outputs left on the devices.

    ``outputs`` [R, ...] is one global array split on its rows over 'data':
    each device keeps its shard of every batch, stacked in place (no
    transfer), so a device's rows are its shards of batch 0, 1, ... and R
    (all batches, padding included) is a multiple of the device count.
    ``rows`` [n] is the row of ``outputs`` of each example in the order
    ``map_padded_batches`` returns, ``labels`` [n] its label (both numpy,
    small, the same on every process); the other R - n rows are padding.
    """
    target = batch_sharded(mesh)
    shards, valid, labels = {}, [], []
    for images, batch_valid, batch_labels in _padded_global_batches(dataset, mesh, batch_size):
        for shard in jax.device_put(fn(images), target).addressable_shards:
            shards.setdefault(shard.device, []).append(shard.data)
        valid.append(batch_valid)
        labels.append(batch_labels[batch_valid])
    if not valid:
        raise ValueError("the evaluation split is empty")
    num_batches, global_batch = len(valid), len(valid[0])
    per_device = global_batch // mesh.size
    # Example at position p of batch t sits on device p // per_device, after
    # that device's shards of batches 0..t-1.
    position = np.arange(global_batch)
    row = ((position // per_device) * num_batches * per_device)[None, :] + \
        (np.arange(num_batches) * per_device)[:, None] + (position % per_device)[None, :]
    blocks = [jnp.concatenate(parts) for parts in shards.values()]
    shape = (num_batches * global_batch,) + blocks[0].shape[1:]
    outputs = jax.make_array_from_single_device_arrays(shape, target, blocks)
    return outputs, row[np.stack(valid)], np.concatenate(labels)


def put_rows(host: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (identical on all processes) as a global array split on its rows over 'data'."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, batch_sharded(mesh), lambda index: host[index])


def take_rows(x: jax.Array, rows: np.ndarray) -> np.ndarray:
    """``x[rows]`` as numpy on every process, for ``x`` split over the mesh:
    only the rows asked for cross devices and hosts, never the whole of x."""
    taken = jax.jit(lambda a, i: a[i], out_shardings=replicated(x.sharding.mesh))(x, np.asarray(rows))
    return np.asarray(taken.addressable_data(0))
