"""SimCLR pretraining loop: data, step, metrics, checkpoints, resume, monitors.

The loop knows no evaluation protocol. Monitors come from the caller as
``make_evaluators(config, model, mesh) -> [evaluator, ...]``, each an object
with a ``name`` and ``run(variables) -> {'top1', 'top5', ...}`` (main.py
passes the kNN monitor, simclr_jax.evaluation.run.pretraining_evaluators).
They run every ``config.eval_every_epochs`` and at the end, always after the
step's checkpoint is on disk: an evaluation that fails never costs training.
"""
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from jax.sharding import Mesh

from simclr_jax import checkpoint, config_validation, models, pictures, preemption, pretrained, sharding, writers
from simclr_jax.data import input_pipeline, sources
from simclr_jax.pretraining import memory, optim, progress
from simclr_jax.pretraining.step import (TrainState, create_train_state, make_train_step, model_params,
                                         with_probe_optimizer)

EvaluatorFactory = Callable[[ml_collections.ConfigDict, models.SimCLR, Mesh], list]


def _device_batches(dataset, mesh: Mesh, prefetch: int = 2) -> Iterator[dict]:
    """Yields global device batches, keeping ``prefetch`` transfers in flight."""
    queue = []
    for batch in dataset.as_numpy_iterator():
        queue.append(sharding.put_batch(batch, mesh))
        if len(queue) > prefetch:
            yield queue.pop(0)
    yield from queue


def _fetch(history: list[dict]) -> dict[str, np.ndarray]:
    """Per-step metrics accumulated on device, as numpy; the loop's only host sync."""
    return jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))


def _setup(config, workdir: str, mesh: Mesh):
    """Everything the loop needs that can fail on bad data or a bad workdir,
    before anything compiles: (state, model, tx, schedule, manager, steps per epoch,
    total steps, probe classes)."""
    if config.init_from:
        _check_init_architecture(config)
    _, num_examples, info = sources.load_split(config.dataset, config.train_split, config.data_dir,
                                               download=config.download)
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {num_examples} examples of "
                         f"{config.dataset}:{config.train_split}; lower --config.batch_size.")
    tx, learning_rate = optim.create_optimizer(config, steps_per_epoch)
    model = models.model_from_config(config.model, axis_name=sharding.DATA_AXIS, dtype=jnp.dtype(config.dtype),
                                     remat=config.model.remat)
    # Labels, when the dataset has them, feed the online probe.
    probe_classes = sources.label_classes(info) if config.online_probe else 0
    if probe_classes:
        tx = with_probe_optimizer(tx, config.probe_learning_rate)
    state = create_train_state(model, tx, config.image_size, config.seed, mesh, probe_classes)
    if config.init_from and checkpoint.latest_step(workdir) is None:  # read before anything is written
        state = _start_from(state, config, mesh)
    if config.memory.size:  # after init_from: the moving average starts at the weights trained from
        state = state.replace(memory=memory.create(model_params(state.params), config.memory.size,
                                                   config.batch_size, config.model.proj_dim, mesh))
    manager = checkpoint.create_manager(workdir, save_every_steps=config.checkpoint_every_steps,
                                        max_to_keep=config.keep_checkpoints)
    if manager.latest_step() is not None:
        state = checkpoint.restore(manager, state)
        logging.info("Resumed from step %d in %s", int(state.step), manager.directory)
    total_steps = optim.total_train_steps(config, steps_per_epoch)
    return state, model, tx, learning_rate, manager, steps_per_epoch, total_steps, probe_classes


def _check_init_architecture(config) -> None:
    """``config.init_from`` must hold the architecture the config trains."""
    trained = pretrained.architecture(config.init_from).model
    conflicts = [f"--config.model.{name}={trained[name]!r} (the config has {config.model[name]!r})"
                 for name in config_validation.MODEL_FIELDS if trained[name] != config.model[name]]
    if conflicts:
        raise config_validation.ConfigError(
            f"config.init_from={config.init_from!r} holds another architecture: set " + ", ".join(conflicts))


def _start_from(state: TrainState, config, mesh: Mesh) -> TrainState:
    """``state`` with the encoder, head and BatchNorm statistics of
    ``config.init_from``; the optimiser, step and online probe start afresh."""
    variables, _, step = pretrained.restore(config.init_from, models.model_from_config(config.model),
                                            config.image_size, mesh)
    logging.info("Starting from the weights of %s (its step %d)", config.init_from, step)
    return state.replace(params={**state.params, **variables["params"]}, batch_stats=variables["batch_stats"])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       make_evaluators: Optional[EvaluatorFactory] = None) -> TrainState:
    """Pretrains SimCLR as ``config`` says, resuming from ``workdir`` if possible."""
    mesh = sharding.make_mesh()
    config_validation.validate(config, mesh.devices.size)
    state, model, tx, learning_rate, manager, steps_per_epoch, total_steps, probe_classes = _setup(
        config, workdir, mesh)
    start_step = int(state.step)
    writer = writers.create_writer(workdir)
    if jax.process_index() == 0:
        checkpoint.write_run_config(workdir, config)
        writer.write_hparams(writers.flat_hparams(config))
        if config.write_pictures:  # its own small pipeline: the training stream is untouched
            pictures.write_augmentation_grid(config, workdir, writer, step=start_step)
    train_step = make_train_step(model, tx, learning_rate, config.temperature, mesh, probe_classes,
                                 config.loss_impl, config.microbatches, config.memory.momentum)
    evaluators = make_evaluators(config, models.model_from_config(config.model), mesh) if make_evaluators else []
    eval_every = int(round(config.eval_every_epochs * steps_per_epoch))
    per_process_batch = sharding.per_process_batch_size(config.batch_size)
    # Resume where the interrupted run was in the same stream: exact resume.
    batches = _device_batches(input_pipeline.pretrain_dataset(
        config, per_process_batch_size=per_process_batch, seed=config.seed,
        skip_examples=start_step * per_process_batch), mesh)
    report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    nonfinite = _NonfiniteGuard(config.nonfinite_policy, manager)
    cpu_estimate = progress.CpuEstimate(start_step, total_steps, config.batch_size)
    logging.info("Pretraining %s on %d devices: %d steps of %d images (%d per epoch) from step %d",
                 config.dataset, mesh.devices.size, total_steps, config.batch_size, steps_per_epoch, start_step)

    run_start = interval_start = time.perf_counter()
    history, evaluations = [], {}  # metrics since the last log; the latest monitor results
    with preemption.StopRequest() as stop_request:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, next(batches))
            history.append(metrics)
            report_progress(step)
            cpu_estimate.after_step(step, metrics)
            stopping = stop_request.stop_now(step)
            save_due = step % config.checkpoint_every_steps == 0 or step == total_steps or stopping
            # Metrics reach the host every log_every_steps, and before every save, so
            # a non-finite step is caught before a checkpoint could follow it.
            if step % config.log_every_steps == 0 or save_due:
                scalars = nonfinite.check(_fetch(history), step)
                scalars["images_per_sec"] = len(history) * config.batch_size / (time.perf_counter() - interval_start)
                scalars["epoch"] = step / steps_per_epoch
                writer.write_scalars(step, scalars)
                logging.info(progress.progress_line(step, total_steps, config.batch_size, scalars))
                history, interval_start = [], time.perf_counter()
            if save_due:
                checkpoint.save(manager, step, state, force=True)
            eval_due = (eval_every and step % eval_every == 0) or step == total_steps
            if evaluators and eval_due and not stopping:
                evaluations = _run_evaluators(evaluators, state, step, writer, manager)
                interval_start = time.perf_counter()  # keep evaluation out of images/s
            if stopping:
                logging.warning("Stopped at step %d of %d on request; checkpoint saved in %s. Run the same "
                                "command to resume.", step, total_steps, manager.directory)
                break

    manager.wait_until_finished()
    if jax.process_index() == 0:
        logging.info(progress.summary(config, workdir, manager, int(state.step), total_steps,
                                      time.perf_counter() - run_start, evaluations))
    manager.close()
    writer.flush()
    return state


def _run_evaluators(evaluators, state: TrainState, step: int, writer, manager) -> dict:
    """Runs each monitor on the current encoder, once every save in flight is on
    disk, so that a crash or out-of-memory error here costs no training."""
    manager.wait_until_finished()
    variables = {"params": model_params(state.params), "batch_stats": state.batch_stats}
    results = {}
    for evaluator in evaluators:
        start = time.perf_counter()
        results[evaluator.name] = evaluator.run(variables)
        logging.info("%s monitor at step %d: %s (%.1f s)", evaluator.name, step, results[evaluator.name],
                     time.perf_counter() - start)
        writer.write_scalars(step, {f"{evaluator.name}_{k}": v for k, v in results[evaluator.name].items()
                                    if k in ("top1", "top5")})
    return results


class _NonfiniteGuard:
    """Acts on steps whose loss or gradient was not finite (the step skipped
    their update): 'stop' raises, naming the step and the last good
    checkpoint; 'skip' counts them and goes on."""

    def __init__(self, policy: str, manager):
        self.policy, self.manager, self.skipped = policy, manager, 0

    def check(self, stacked: dict, step: int) -> dict[str, float]:
        flags = stacked.pop("nonfinite")
        bad = np.flatnonzero(flags)
        if bad.size:
            first = step - len(flags) + 1 + int(bad[0])
            if self.policy == "stop":
                self.manager.wait_until_finished()
                last_good = self.manager.latest_step()
                where = (f"the last good checkpoint is step {last_good} in {self.manager.directory}"
                         if last_good is not None else "no checkpoint was saved yet")
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {first} ({bad.size} of the last {len(flags)} "
                    f"steps); the update was not applied and training stopped; {where}. Lower the "
                    "learning rate or set --config.nonfinite_policy=skip to skip such steps.")
            self.skipped += bad.size
            logging.warning("Skipped %d non-finite updates, the first at step %d (%d in all).",
                            bad.size, first, self.skipped)
        good = np.ones(len(flags), bool)
        good[bad] = False
        scalars = {k: float(np.mean(v[good])) if good.any() else float("nan") for k, v in stacked.items()}
        if self.skipped:
            scalars["skipped_updates"] = float(self.skipped)
        return scalars
