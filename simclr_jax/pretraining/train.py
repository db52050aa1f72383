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

from simclr_jax import checkpoint, config_validation, models, pictures, preemption, sharding, writers
from simclr_jax.data import input_pipeline
from simclr_jax.evaluation import run as evaluate
from simclr_jax.pretraining import optim
from simclr_jax.pretraining.step import (TrainState, create_train_state, make_train_step, model_params,
                             with_probe_optimizer)


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
    per_process_batch = sharding.per_process_batch_size(config.batch_size)
    dataset = input_pipeline.pretrain_dataset(
        config, per_process_batch_size=per_process_batch, seed=config.seed,
        # Resume where the interrupted run was in the same stream: exact resume.
        skip_examples=start_step * per_process_batch,
    )
    batches = _device_batches(dataset, mesh)
    if jax.process_index() == 0 and config.get("write_pictures", False):
        # Its own small pipeline: the training stream above is untouched.
        pictures.write_augmentation_grid(config, workdir, writer, step=start_step)
    report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    nonfinite = _NonfiniteGuard(config.get("nonfinite_policy", "stop"), manager)

    logging.info(
        "Pretraining %s on %d devices: %d steps of %d images (%d per epoch) from step %d",
        config.dataset, mesh.devices.size, total_steps, config.batch_size, steps_per_epoch, start_step,
    )
    run_start = interval_start = time.perf_counter()
    history, knn = [], {}  # metrics since the last log; the latest kNN monitor result
    with preemption.StopRequest() as stop_request:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, next(batches))
            history.append(metrics)
            report_progress(step)
            stopping = stop_request.stop_now(step)
            save_due = step % config.checkpoint_every_steps == 0 or step == total_steps or stopping
            # Metrics reach the host every log_every_steps, and before every save, so
            # a non-finite step is caught before a checkpoint could follow it.
            if step % config.log_every_steps == 0 or save_due:
                scalars = nonfinite.check(_fetch(history), step)
                elapsed = time.perf_counter() - interval_start
                scalars["images_per_sec"] = len(history) * config.batch_size / elapsed
                scalars["epoch"] = step / steps_per_epoch
                writer.write_scalars(step, scalars)
                logging.info(_progress_line(step, total_steps, config.batch_size, scalars))
                history, interval_start = [], time.perf_counter()
            knn_due = (knn_every and step % knn_every == 0) or step == total_steps
            if knn_due and num_classes and config.knn_monitor and not stopping:
                knn = _knn_monitor(config, state, mesh)
                writer.write_scalars(step, knn)
                interval_start = time.perf_counter()  # keep evaluation out of images/s
            if save_due:
                checkpoint.save(manager, step, state, force=True)
            if stopping:
                logging.warning("Stopped at step %d of %d on request; checkpoint saved in %s. Run the same "
                                "command to resume.", step, total_steps, manager.directory)
                break

    manager.wait_until_finished()
    if jax.process_index() == 0:
        logging.info(_summary(config, workdir, manager, int(state.step), total_steps,
                              time.perf_counter() - run_start, knn))
    manager.close()
    writer.flush()
    return state


def _duration(seconds: float) -> str:
    """'1d 02:03:04', '00:05:00', or '?' when the rate is not known yet."""
    if not np.isfinite(seconds) or seconds < 0:
        return "?"
    days, rest = divmod(int(round(seconds)), 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def _progress_line(step: int, total_steps: int, batch_size: int, scalars: dict) -> str:
    """One readable line: where the run is, how fast, how long to go, how well."""
    rate = scalars["images_per_sec"]
    eta = (total_steps - step) * batch_size / rate if rate > 0 else float("nan")
    return (f"step {step}/{total_steps} (epoch {scalars['epoch']:.2f}) | loss {scalars['loss']:.4f} | "
            f"contrastive acc {scalars['contrastive_acc']:.3f} | {rate:.1f} images/s | ETA {_duration(eta)}")


def _evaluate_command(config, workdir: str) -> str:
    """The linear-evaluation command for this run, with the overrides it needs
    (architecture, data) where they differ from configs/linear_eval.py."""
    command = f"python main.py --config=configs/linear_eval.py --config.pretrained={workdir}"
    try:
        from configs import linear_eval  # the recipe the command runs; absent outside the repository
    except ImportError:
        return command + f" --workdir={workdir}/eval"
    defaults = linear_eval.get_config()
    overrides = [f"--config.model.{key}={config.model[key]}" for key in sorted(config.model)
                 if key in defaults.model and config.model[key] != defaults.model[key]]
    for key in ("dataset", "data_dir", "image_size"):
        if config.get(key) is not None and config[key] != defaults[key]:
            overrides.append(f"--config.{key}={config[key]}")
    if config.dataset.startswith(input_pipeline.IMAGES_PREFIX):  # unlabelled: evaluate on labelled images
        overrides = [o for o in overrides if not o.startswith("--config.dataset=")]
        overrides.append("--config.dataset=folder:LABELLED_ROOT")
    return " ".join([command, *overrides, f"--workdir={workdir}/eval"])


def _summary(config, workdir, manager, step, total_steps, seconds, knn) -> str:
    """The one-screen account of where everything went."""
    workdir = os.path.abspath(workdir)
    lines = [
        f"Pretraining {'finished' if step >= total_steps else 'stopped'} at step {step}/{total_steps} "
        f"after {_duration(seconds)}.",
        f"  checkpoints   {manager.directory} (steps {list(manager.all_steps())})",
        f"  metrics       {os.path.join(workdir, 'metrics.jsonl')}",
        f"  TensorBoard   tensorboard --logdir={workdir}",
    ]
    pngs = [os.path.join(workdir, name) for name in sorted(os.listdir(workdir)) if name.endswith(".png")]
    if pngs:
        lines.append(f"  pictures      {', '.join(pngs)}")
    if knn:
        lines.append(f"  kNN top-1     {knn['knn_top1']:.4f} (top-5 {knn['knn_top5']:.4f})")
    lines.append(f"  evaluate      {_evaluate_command(config, workdir)}")
    if step < total_steps:
        lines.append("  resume        run the same command again")
    return "\n".join(lines)


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
