"""A run's persistent state: Orbax checkpoints and the run's config.json.

Checkpoints live in ``workdir/checkpoints/<step>``. Orbax writes each one
into a temporary directory and renames it when complete, so an interrupted
save never becomes the latest step. Saves are asynchronous: training goes on
while the arrays are written; ``wait_until_finished`` joins them.

Everything that reads a checkpoint is here: resuming the whole training state
(``restore``) and restoring only a model's variables for evaluation
(``restore_variables``: Orbax partial restore onto any mesh, so a checkpoint
written by 8 devices evaluates on 1 and vice versa).
"""
import contextlib
import functools
import json
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from simclr_jax import storage
from simclr_jax.errors import CheckpointError

CONFIG_FILE = "config.json"
PROBE = "online_probe"  # the online linear probe's key in a pretraining checkpoint's params
ARCHITECTURE_BEFORE_VARIANTS = {"variant": "torchvision", "sk_ratio": 0.0, "se_ratio": 0.0,
                                "stem_pool_padding": "same"}


def checkpoint_dir(workdir: str) -> str:
    return storage.join(storage.resolve(workdir), "checkpoints")


@functools.cache
def _save_whole_arrays_on_cpu() -> None:
    """On the CPU, each process saves every array whole from one device.

    Orbax's default splits a replicated array's write between its replicas,
    slicing it on the devices: one small compiled program per array shape.
    Accelerators that write in parallel gain; simulated CPU devices share one
    host memory and only pay the slicing (the first save of a small ResNet-18
    on 8 CPU devices took 7.7 s, most of it compiling slices). Once per process.
    """
    if jax.default_backend() == "cpu":
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def create_manager(workdir: str, *, save_every_steps: int, max_to_keep: int,
                   read_only: bool = False) -> ocp.CheckpointManager:
    _save_whole_arrays_on_cpu()
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, save_every_steps), max_to_keep=max_to_keep,
                                           enable_async_checkpointing=True, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def latest_step(workdir: str) -> Optional[int]:
    """The newest checkpoint's step in ``workdir``, None if there is none; creates nothing."""
    if not storage.isdir(checkpoint_dir(workdir)):
        return None
    manager = create_manager(workdir, save_every_steps=1, max_to_keep=1, read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts an async save of ``state`` at ``step`` if the interval says so."""
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, like: Any, step: Optional[int] = None) -> Any:
    """Restores the checkpoint at ``step`` (default: latest) shaped like ``like``.

    ``like`` is a pytree of arrays (or ShapeDtypeStructs) carrying the target
    shardings, so a checkpoint written on any device layout lands on this one.
    A checkpoint that cannot be read (a damaged or truncated file) is a
    CheckpointError naming it and the newest earlier step that reads; nothing
    is deleted for the user.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001 (TensorStore, JSON and OS errors share no type)
        damaged = f"checkpoint step {step} in {manager.directory} cannot be read ({_first_line(e)})"
    for earlier in sorted((s for s in manager.all_steps() if s < step), reverse=True):
        try:
            manager.restore(earlier, args=ocp.args.StandardRestore(abstract))
        except Exception:  # noqa: BLE001
            continue
        damaged_dir = storage.join(str(manager.directory), str(step))
        raise CheckpointError(f"{damaged}; step {earlier} reads: delete {damaged_dir} "
                              f"(and any later step) to resume from step {earlier}")
    raise CheckpointError(f"{damaged}, nor does any earlier step: start again in a new --workdir")


def _first_line(error: BaseException) -> str:
    """The innermost cause's type and first line: Orbax wraps TensorStore's
    precise error ("Unexpected end of data") in a generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:400] if text else ''}"


# --------------------------------------------------------------------------- a finished run

def run_workdir(path: str) -> str:
    """The pretraining workdir of ``path`` (the workdir itself or its checkpoints/ folder)."""
    if not storage.isdir(path):
        raise FileNotFoundError(
            f"no such directory: {path!r}; pass a pretraining workdir (the --workdir of main.py, holding "
            f"{CONFIG_FILE} and checkpoints/) or its checkpoints/ folder, or an official SimCLR TF2 "
            "SavedModel folder, checkpoint folder or ckpt-N prefix")
    path = storage.resolve(path)
    if storage.name(path) == "checkpoints" and not storage.exists(storage.join(path, CONFIG_FILE)):
        return storage.parent(path)
    return path


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """workdir/config.json: what evaluation reads the architecture from."""
    storage.write_text(storage.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def saved_config(workdir: str) -> Optional[dict]:
    """``workdir``'s config.json as written, None if it has none."""
    path = storage.join(workdir, CONFIG_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def refuse_run_workdir(workdir: str, protocol: str) -> None:
    """``protocol`` writes results, logs and checkpoints into a workdir of its
    own: never into another run's (one whose config.json another protocol,
    or pretraining, wrote), whose metrics and checkpoints it would mix with its own."""
    saved = saved_config(workdir)
    if saved is not None and saved.get("protocol") != protocol:
        from simclr_jax.config_validation import ConfigError

        raise ConfigError(f"--workdir={workdir} holds a {saved.get('protocol') or 'pretraining'} run ({CONFIG_FILE}, "
                          f"checkpoints/): {protocol} writes its results, logs and checkpoints into a workdir of "
                          f"its own; pass e.g. --workdir={storage.join(workdir, protocol)}")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The pretraining config saved in ``workdir`` (see ``write_run_config``)."""
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{workdir} has no {CONFIG_FILE}, which names the encoder's architecture and image size; pass "
            f"the pretraining workdir that main.py wrote (it holds {CONFIG_FILE} next to checkpoints/), or "
            "an official SimCLR TF2 SavedModel folder, checkpoint folder or ckpt-N prefix")
    config = json.loads(storage.read_text(path))
    if "model" not in config or "image_size" not in config:
        raise ValueError(f"{path} is not a pretraining config: it lacks 'model' or 'image_size'")
    # Runs from before these fields existed trained exactly this architecture.
    config["model"] = {**ARCHITECTURE_BEFORE_VARIANTS, **config["model"]}
    return ml_collections.ConfigDict(config)


def save_network(workdir: str, *, config: ml_collections.ConfigDict, variables: dict, head: dict, step: int,
                 head_key: str) -> None:
    """Writes a trained network as a run ``restore_variables`` and evaluation read:
    ``workdir/checkpoints/<step>`` holds {'params': the model's params plus
    ``head`` under ``head_key``, 'batch_stats'}, then ``workdir/config.json``
    ``config`` (its model and image_size say the architecture). A collective:
    every process calls it. The config is written last, so a directory
    without one was cut short."""
    tree = {"params": {**variables["params"], head_key: head}, "batch_stats": variables["batch_stats"]}
    manager = create_manager(workdir, save_every_steps=1, max_to_keep=1)
    try:
        save(manager, step, tree, force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    if jax.process_index() == 0:
        write_run_config(workdir, config)


@contextlib.contextmanager
def _reader(workdir: str, step: Optional[int]):
    """(a read-only manager of ``workdir``'s checkpoints, the step to read:
    ``step``, or the latest when None or < 0, which must exist)."""
    root = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_handlers=ocp.PyTreeCheckpointHandler())
    try:
        step = manager.latest_step() if step is None or step < 0 else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {root}; available steps: "
                                    f"{list(manager.all_steps())}")
        yield manager, step
    finally:
        manager.close()


def restore_variables(workdir: str, abstract_variables: Any, step: Optional[int] = None,
                      optional_params: tuple[str, ...] = ()) -> tuple[Any, int]:
    """(the model variables of ``workdir``'s checkpoint at ``step``, that step).

    ``abstract_variables`` is {'params', 'batch_stats'} of ShapeDtypeStructs
    with the target shardings; only those are read (the optimiser state is
    left on disk), plus each entry of ``params`` named in ``optional_params``
    that the checkpoint has (e.g. the online probe), placed like the others.
    ``step`` None or < 0 means the latest that reads: a damaged latest step is
    skipped with a warning naming it.
    """
    latest = step is None or step < 0
    with _reader(workdir, step) as (manager, step):
        candidates = sorted((s for s in manager.all_steps() if s <= step), reverse=True) if latest else [step]
        errors = []
        for candidate in candidates:
            try:
                restored = _read_variables(manager, candidate, abstract_variables, optional_params)
            except Exception as e:  # noqa: BLE001 (TensorStore, JSON and OS errors share no type)
                errors.append(e)
                continue
            if errors:
                logging.warning("Checkpoint step %d in %s cannot be read (%s): using step %d, the newest that "
                                "reads.", step, manager.directory, _first_line(errors[0]), candidate)
            return restored, candidate
    if isinstance(errors[0], (ValueError, KeyError)) and not isinstance(errors[0], json.JSONDecodeError):
        raise CheckpointError(f"the checkpoint in {manager.directory} (step {step}) does not fit the architecture "
                              f"in {CONFIG_FILE} ({_first_line(errors[0])})")
    raise CheckpointError(f"checkpoint step {step} in {manager.directory} cannot be read ({_first_line(errors[0])})"
                          + (", nor can any earlier step" if len(errors) > 1 else ""))


def _read_variables(manager, step: int, abstract_variables: Any, optional_params: tuple[str, ...]) -> Any:
    abstract = _with_optional_params(abstract_variables, manager.item_metadata(step), optional_params)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return manager.restore(step, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                                             partial_restore=True))


def saved_head_classes(workdir: str, head_key: str, step: Optional[int] = None) -> int:
    """The class count of the head saved under ``params[head_key]`` at ``step``
    (None or < 0: the latest), 0 if there is none; reads metadata only."""
    with _reader(workdir, step) as (manager, step):
        head = manager.item_metadata(step).tree["params"].get(head_key)
    return int(head["bias"].shape[0]) if head else 0


def _with_optional_params(abstract: dict, metadata, names: tuple[str, ...]) -> dict:
    """``abstract`` plus the ``params`` entries in ``names`` that ``metadata`` (the checkpoint's) has."""
    saved = metadata.tree["params"] if names else {}
    present = {name: saved[name] for name in names if name in saved}
    if not present:
        return abstract
    placement = jax.tree.leaves(abstract)[0].sharding
    extra = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=placement), present)
    return dict(abstract, params={**abstract["params"], **extra})
