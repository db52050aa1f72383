"""Joining the processes of a multi-host run (JAX's multi-controller runtime).

Every host runs the same ``main.py``; ``initialize`` connects them before JAX
touches a device, after which ``jax.devices()`` lists the devices of all
processes and one Mesh spans them. Three ways in, tried in this order:

1. Explicit, from the environment: ``JAX_COORDINATOR_ADDRESS`` (host:port of
   process 0, which JAX itself also reads), ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID``. This is how GPU clusters without SLURM/MPI, and the
   tests on one machine, start several processes.
2. Automatic, where JAX detects the cluster: SLURM (``srun``), Open MPI
   (``mpirun``) and Cloud TPU VMs (``libtpu`` installed; JAX reads the
   worker list from the TPU metadata).
3. Otherwise nothing: one process, all local devices.

A run that loses a peer must not hang: JAX's coordination service declares a
process dead after ``heartbeat_timeout_s`` without a heartbeat and stops the
others, and a process that never joins makes ``initialize`` fail after
``init_timeout_s``.
"""
import importlib.util
import os

import jax
from absl import logging

from simclr_jax.errors import UserError

COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} must be an integer") from None


def explicit_settings() -> tuple[str, int, int] | None:
    """(coordinator address, process count, process id) from the environment.

    None when neither count nor id is set; a clear error when the set is
    incomplete or inconsistent, since half a configuration would silently
    start independent single-process runs writing to the same workdir.
    """
    if NUM_PROCESSES not in os.environ and PROCESS_ID not in os.environ:
        return None
    missing = [name for name in (COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID) if not os.environ.get(name)]
    if missing:
        raise UserError(
            f"multi-process run: set all of {COORDINATOR_ADDRESS} (host:port of process 0), "
            f"{NUM_PROCESSES} and {PROCESS_ID}; missing {', '.join(missing)}."
        )
    address, count, index = os.environ[COORDINATOR_ADDRESS], _int_env(NUM_PROCESSES), _int_env(PROCESS_ID)
    if ":" not in address:
        raise UserError(f"{COORDINATOR_ADDRESS}={address!r} must be host:port, e.g. 10.0.0.1:1234")
    if count < 1 or not 0 <= index < count:
        raise UserError(f"need {NUM_PROCESSES} >= 1 and 0 <= {PROCESS_ID} < {NUM_PROCESSES}; got {count} and {index}")
    return address, count, index


def _cluster_detected() -> bool:
    """Whether JAX's automatic cluster detection has something to find."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ
    open_mpi = "OMPI_MCA_orte_hnp_uri" in os.environ
    return slurm or open_mpi or importlib.util.find_spec("libtpu") is not None


def initialize(*, init_timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
    """Joins this process to the others of the run; a no-op for a single process.

    Must run before any JAX computation or device query.
    """
    timeouts = dict(
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        # A finishing process waits this long for its peers at exit; a dead
        # peer must not keep the survivors alive for JAX's default 5 minutes.
        shutdown_timeout_seconds=max(heartbeat_timeout_s, 10),
    )
    settings = explicit_settings()
    if settings is not None:
        address, count, index = settings
        if count == 1:
            return
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index,
                                   **timeouts)
    elif _cluster_detected():
        try:
            jax.distributed.initialize(**timeouts)
        except ValueError as e:  # e.g. libtpu installed on a machine that is not a TPU VM
            logging.warning("No multi-host cluster found (%s); running as one process.", e)
            return
    else:
        return
    logging.info("Joined process %d of %d; %d local and %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
