"""SimCLR pretraining loop: data, step, metrics, checkpoints, resume."""
import json
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from jax.sharding import Mesh

from simclr_jax import checkpoint, config_validation, evaluate, input_pipeline, models, optim, sharding, writers
from simclr_jax.step import (TrainState, create_train_state, make_train_step, model_params,
                             with_probe_optimizer)


def _device_batches(dataset, mesh: Mesh, prefetch: int = 2) -> Iterator[dict]:
    """Yields global device batches, keeping ``prefetch`` transfers in flight."""
    queue = []
    for batch in dataset.as_numpy_iterator():
        queue.append(sharding.put_batch(batch, mesh))
        if len(queue) > prefetch:
            yield queue.pop(0)
    yield from queue


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    """Averages metrics accumulated on device; the only host sync of the loop."""
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
    return {k: float(np.mean(v)) for k, v in stacked.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Pretrains SimCLR as ``config`` says, resuming from ``workdir`` if possible."""
    config_validation.validate_pretrain_config(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh)

    # Data errors (unknown dataset or split, data not prepared) surface here,
    # before anything is compiled.
    _, num_examples, info = input_pipeline.load_split(config.dataset, config.train_split, config.data_dir)
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {num_examples} examples "
            f"of {config.dataset}:{config.train_split}; lower --config.batch_size."
        )
    tx, learning_rate = optim.create_optimizer(config, steps_per_epoch)
    total_steps = optim.total_train_steps(config, steps_per_epoch)

    model = models.model_from_config(
        config.model, axis_name=sharding.DATA_AXIS, dtype=jnp.dtype(config.dtype)
    )
    # Labels, when the dataset has them, feed the online probe and the kNN monitor.
    num_classes = evaluate.label_classes(info)
    probe_classes = num_classes if config.online_probe else 0
    if probe_classes:
        tx = with_probe_optimizer(tx, config.probe_learning_rate)
    state = create_train_state(model, tx, config.image_size, config.seed, mesh, probe_classes)
    manager = checkpoint.create_manager(
        workdir, save_every_steps=config.checkpoint_every_steps, max_to_keep=config.keep_checkpoints
    )
    if manager.latest_step() is not None:
        state = checkpoint.restore(manager, state)
        logging.info("Resumed from step %d in %s", int(state.step), manager.directory)
    start_step = int(state.step)

    writer = writers.create_writer(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
        writer.write_hparams(_flat_hparams(config))

    train_step = make_train_step(
        model, tx, learning_rate, config.temperature, mesh, probe_classes, config.loss_impl
    )
    knn_every = int(round(config.knn_every_epochs * steps_per_epoch))
    dataset = input_pipeline.pretrain_dataset(
        config,
        per_process_batch_size=sharding.per_process_batch_size(config.batch_size),
        # A resumed run draws fresh augmentations rather than replaying the first ones.
        seed=config.seed + start_step,
    )
    batches = _device_batches(dataset, mesh)
    report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)

    logging.info(
        "Pretraining %s on %d devices: %d steps of %d images (%d per epoch) from step %d",
        config.dataset, mesh.devices.size, total_steps, config.batch_size, steps_per_epoch, start_step,
    )
    history, interval_start = [], time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = train_step(state, next(batches))
        history.append(metrics)
        report_progress(step)
        if step % config.log_every_steps == 0 or step == total_steps:
            scalars = _mean_metrics(history)
            elapsed = time.perf_counter() - interval_start
            scalars["images_per_sec"] = len(history) * config.batch_size / elapsed
            scalars["epoch"] = step / steps_per_epoch
            writer.write_scalars(step, scalars)
            history, interval_start = [], time.perf_counter()
        knn_due = (knn_every and step % knn_every == 0) or step == total_steps
        if knn_due and num_classes and config.knn_monitor:
            writer.write_scalars(step, _knn_monitor(config, state, mesh))
            interval_start = time.perf_counter()  # keep evaluation out of images/s
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            checkpoint.save(manager, step, state, force=True)

    manager.wait_until_finished()
    manager.close()
    writer.flush()
    return state


def _knn_monitor(config, state: TrainState, mesh: Mesh) -> dict[str, float]:
    """Weighted kNN top-1/top-5 of the current encoder (train bank, test queries)."""
    eval_model = models.model_from_config(config.model)
    variables = {"params": model_params(state.params), "batch_stats": state.batch_stats}
    start = time.perf_counter()
    result = evaluate.knn_top1(config, eval_model, variables, mesh)
    logging.info("kNN monitor: %s (%.1f s)", result, time.perf_counter() - start)
    return {"knn_top1": result["top1"], "knn_top5": result["top5"]}


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
    flat = {}

    def visit(prefix, value):
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", json.loads(config.to_json_best_effort()))
    return flat
