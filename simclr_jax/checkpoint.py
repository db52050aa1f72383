"""Orbax checkpoints of the training state: save, resume, inspect.

Checkpoints live in ``workdir/checkpoints/<step>``. Orbax writes each one
into a temporary directory and renames it when complete, so an interrupted
save never becomes the latest step. Saves are asynchronous: training goes on
while the arrays are written; ``wait_until_finished`` joins them.
"""
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(
    workdir: str, *, save_every_steps: int, max_to_keep: int, read_only: bool = False
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, save_every_steps),
        max_to_keep=max_to_keep,
        enable_async_checkpointing=True,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts an async save of ``state`` at ``step`` if the interval says so."""
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, like: Any, step: Optional[int] = None) -> Any:
    """Restores the checkpoint at ``step`` (default: latest) shaped like ``like``.

    ``like`` is a pytree of arrays (or ShapeDtypeStructs) carrying the target
    shardings, so a checkpoint written on any device layout lands on this one.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
