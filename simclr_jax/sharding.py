"""Device mesh, shardings and host-to-device placement: the one place for them.

SimCLR is pure data parallelism: a 1-D mesh with axis ``'data'`` over every
device of every process. Parameters, BatchNorm statistics and optimiser state
are replicated; the batch is split on its leading axis. The train step runs
as ``jax.jit(jax.shard_map(...))`` so the two collectives the method needs
(global BatchNorm moments and the all-gather of projections) are explicit.
"""
from typing import Any, Optional, Sequence

import jax
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


def put_rows(host: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (identical on all processes) as a global array split on its rows over 'data'."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, batch_sharded(mesh), lambda index: host[index])


def take_rows(x: jax.Array, rows: np.ndarray) -> np.ndarray:
    """``x[rows]`` as numpy on every process, for ``x`` split over the mesh:
    only the rows asked for cross devices and hosts, never the whole of x."""
    taken = jax.jit(lambda a, i: a[i], out_shardings=replicated(x.sharding.mesh))(x, np.asarray(rows))
    return np.asarray(taken.addressable_data(0))
