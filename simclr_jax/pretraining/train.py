"""SimCLR pretraining as an experiment of the one loop (simclr_jax/loop.py).

``Pretraining`` supplies the state (from init_from, with the memory queue),
the stream of views from any step, the jit(shard_map) step and the progress
line; the loop resumes, saves, stops on request and guards non-finite steps.
The experiment knows no evaluation protocol. Monitors come from the caller as
``make_evaluators(config, model, mesh) -> [evaluator, ...]``, each an object
with a ``name`` and ``run(variables) -> {'top1', 'top5', ...}``
(simclr_jax/protocols.py passes the kNN monitor, evaluation.knn.monitors).
They run every ``config.eval_every_epochs`` and at the end, always after the
step's checkpoint is on disk: an evaluation that fails never costs training.
At the end they also score the same network at random initialisation
(``baseline``), which the summary sets beside the trained numbers.
"""
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import parameter_overview
from jax.sharding import Mesh

from simclr_jax import config_validation, loop, models, optim, pictures, sharding, storage, writers
from simclr_jax.data import device_augment, input_pipeline, sources
from simclr_jax.pretraining import baseline, memory, progress
from simclr_jax.pretraining.step import TrainState, create_train_state, make_train_step, model_params
from simclr_jax.weights import checkpoint, pretrained
from simclr_jax.weights.checkpoint import PROBE

PARAMETERS_MESSAGE = "Network parameters (encoder and head):"
EvaluatorFactory = Callable[[ml_collections.ConfigDict, models.SimCLR, Mesh], list]


def _device_batches(dataset, mesh: Mesh, prefetch: int = 2) -> Iterator[dict]:
    """Yields global device batches, keeping ``prefetch`` transfers in flight."""
    queue = []
    for batch in dataset.as_numpy_iterator():
        queue.append(sharding.put_batch(batch, mesh))
        if len(queue) > prefetch:
            yield queue.pop(0)
    yield from queue


class Pretraining:
    """SimCLR pretraining for ``loop.run``. Built before anything is written:
    everything that can fail on bad data, a bad workdir or init_from fails here."""

    name = "pretrain"

    def __init__(self, config, workdir: str, mesh: Mesh, make_evaluators: Optional[EvaluatorFactory]):
        self.config, self.mesh, self.batch_size, self.workdir = config, mesh, config.batch_size, workdir
        self.resume = loop.check_resume(workdir, config)
        if config.init_from:  # it must hold the architecture the config trains
            pretrained.resolve(config.init_from, config.model, field="init_from")
        _, num_examples, info = sources.load_split(config.dataset, config.train_split, config.data_dir,
                                                   download=config.download)
        self.steps_per_epoch = num_examples // config.batch_size
        if self.steps_per_epoch == 0:
            raise config_validation.ConfigError(
                f"batch_size={config.batch_size} is larger than the {num_examples} examples of "
                f"{config.dataset}:{config.train_split}; lower --config.batch_size.")
        self.total_steps = total_steps(config, self.steps_per_epoch)
        tx, learning_rate = create_optimizer(config, self.steps_per_epoch)
        model = models.model_from_config(config.model, axis_name=sharding.DATA_AXIS, dtype=jnp.dtype(config.dtype),
                                         remat=config.model.remat)
        # Labels, when the dataset has them, feed the online probe.
        probe_classes = sources.label_classes(info) if config.online_probe else 0
        if probe_classes:
            tx = optim.with_adam_for(PROBE, tx, config.probe_learning_rate)
        self._evaluation_model = models.model_from_config(config.model)
        self.evaluators = make_evaluators(config, self._evaluation_model, mesh) if make_evaluators else []
        self._state = self._fresh_state(model, tx, probe_classes)
        # Shapes only (no statistics: nothing is computed or synced): the first 20 arrays and the total.
        parameter_overview.log_parameter_overview(model_params(self._state.params), include_stats=False,
                                                  max_lines=20, msg=PARAMETERS_MESSAGE, jax_logging_process=0)
        self._train_step = make_train_step(
            model, tx, learning_rate=learning_rate, temperature=config.temperature, mesh=mesh,
            num_classes=probe_classes, loss_impl=config.loss_impl, microbatches=config.microbatches,
            memory_momentum=config.memory.momentum, augment_views=device_augment.from_config(config))
        self.eval_every = optim.steps(config.eval_every_epochs, self.steps_per_epoch)
        self.evaluations, self.random_init = {}, {}  # the latest monitor results; the baseline's at the end

    def _fresh_state(self, model, tx, probe_classes: int) -> TrainState:
        config, mesh = self.config, self.mesh
        state = create_train_state(model, tx, image_size=config.image_size, seed=config.seed, mesh=mesh,
                                   num_classes=probe_classes)
        # The network at random initialisation, as --config.random_init=True draws it (the same rbg key
        # and init), kept on the host for the baseline at the end: no second compilation of the init.
        self._random_init = sharding.gather({"params": model_params(state.params),
                                             "batch_stats": state.batch_stats}) if self.evaluators else None
        if config.init_from and self.resume.step is None:  # read before anything is written
            state = _start_from(state, config, mesh)
        if config.memory.size:  # after init_from: the moving average starts at the weights trained from
            state = state.replace(memory=memory.create(model_params(state.params), config.memory.size,
                                                       config.batch_size, config.model.proj_dim, mesh))
        return state

    def initial_state(self) -> TrainState:
        return self._state

    def batches(self, start_step: int) -> Iterator[dict]:
        """The stream from ``start_step`` on: the same batches an uninterrupted run sees there."""
        config = self.config
        per_process_batch = sharding.per_process_batch_size(config.batch_size)
        self._steps_done, self._cpu_estimate = start_step, progress.CpuEstimate(start_step, self.total_steps,
                                                                                config.batch_size)
        logging.info("Pretraining %s on %d devices: %d steps of %d images (%d per epoch) from step %d",
                     config.dataset, self.mesh.devices.size, self.total_steps, config.batch_size,
                     self.steps_per_epoch, start_step)
        return _device_batches(input_pipeline.pretrain_dataset(
            config, per_process_batch_size=per_process_batch, seed=config.seed,
            skip_examples=start_step * per_process_batch), self.mesh)

    def step(self, state: TrainState, batch: dict):
        state, metrics = self._train_step(state, batch)
        self._steps_done += 1
        self._cpu_estimate.after_step(self._steps_done, metrics)
        return state, metrics

    def scalars(self, step: int) -> dict:
        return {"epoch": step / self.steps_per_epoch}

    def describe(self, step: int, scalars: dict) -> str:
        return progress.progress_line(step, self.total_steps, self.batch_size, scalars)

    def monitor(self, state: TrainState, step: int, manager, writer) -> bool:
        due = (self.eval_every and step % self.eval_every == 0) or step == self.total_steps
        if not (self.evaluators and due):
            return False
        self.evaluations = _run_evaluators(self.evaluators, state, step, writer, manager)
        if step == self.total_steps:
            start = time.perf_counter()
            self.random_init = baseline.scores(
                self.evaluators, lambda: sharding.put_replicated(self._random_init, self.mesh), self.config,
                self.workdir)
            logging.info("The same network at random initialisation: %s (%.1f s)", self.random_init,
                         time.perf_counter() - start)
        return True


def total_steps(config, steps_per_epoch: int) -> int:
    """num_train_steps when set (> 0), else num_epochs whole epochs of steps_per_epoch."""
    return int(config.num_train_steps) if config.num_train_steps > 0 else optim.steps(config.num_epochs,
                                                                                       steps_per_epoch)


def create_optimizer(config, steps_per_epoch: int):
    """(LARS, its schedule) from ``config.optimizer``: a linear warm-up to
    the scaled peak, then a cosine to 0 at the last step. The schedule is
    also logged as the learning rate."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    settings, last = config.optimizer, total_steps(config, steps_per_epoch)
    learning_rate = optim.schedule(
        optim.peak_learning_rate(settings.base_learning_rate, config.batch_size, settings.lr_scaling),
        total_steps=last, warmup_steps=min(optim.steps(settings.warmup_epochs, steps_per_epoch), last))
    tx = optim.create("lars", learning_rate, weight_decay=settings.weight_decay, momentum=settings.momentum,
                      trust_coefficient=settings.trust_coefficient)
    return tx, learning_rate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       make_evaluators: Optional[EvaluatorFactory] = None,
                       evaluation_command: Optional[Callable[[ml_collections.ConfigDict, str], str]] = None
                       ) -> TrainState:
    """Pretrains SimCLR as ``config`` says, resuming from ``workdir`` if possible.
    ``evaluation_command(config, workdir)``: the command the summary suggests next."""
    mesh = sharding.make_mesh()
    config_validation.validate(config, mesh.devices.size)
    storage.check_writable_dir(workdir)
    experiment = Pretraining(config, workdir, mesh, make_evaluators)
    start_step = experiment.resume.step or 0
    loop.record_start(workdir, config, experiment.resume)
    writer = writers.create_writer(workdir)
    if jax.process_index() == 0:
        writer.write_hparams(writers.flat_hparams(config))
        if config.write_pictures:  # its own small pipeline: the training stream is untouched
            pictures.write_augmentation_grid(config, workdir, writer, step=start_step)
    run_start = time.perf_counter()
    state = loop.run(experiment, workdir, loop.Cadence.from_config(config), writer)
    # Every process opens the manager (Orbax syncs them in its constructor); process 0 reports.
    saved = checkpoint.create_manager(workdir, save_every_steps=1, max_to_keep=1, read_only=True)
    if jax.process_index() == 0:
        logging.info(progress.summary(workdir, saved, step=int(state.step), total_steps=experiment.total_steps,
                                      seconds=time.perf_counter() - run_start, evaluations=experiment.evaluations,
                                      random_init=experiment.random_init,
                                      next_command=evaluation_command(config, workdir) if evaluation_command else None))
    saved.close()
    writer.flush()
    return state


def _start_from(state: TrainState, config, mesh: Mesh) -> TrainState:
    """``state`` with the encoder, head and BatchNorm statistics of
    ``config.init_from``; the optimiser, step and online probe start afresh."""
    variables, _, step = pretrained.restore(config.init_from, models.model_from_config(config.model),
                                            config.image_size, mesh)
    logging.info("Starting from the weights of %s (its step %d)", config.init_from, step)
    return state.replace(params={**state.params, **variables["params"]}, batch_stats=variables["batch_stats"])


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
