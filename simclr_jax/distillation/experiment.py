"""SimCLR v2's distillation run: a fine-tuned teacher teaches a student on every train image.

``distill(config, workdir)`` (configs/distill.py) checks the teacher from
its metadata, resolves the student's architecture, restores both, and trains
the student with ``make_distill_step`` on crop + flip views of the train
split (fine-tuning's augmentation), with momentum SGD or LARS on a warm-up +
cosine (or constant) schedule. It checkpoints ``workdir/checkpoints`` and
resumes from them exactly (the view stream is skipped to the step), then
scores student and teacher on the test split, writes the student to
``workdir/student`` (readable by ``load_encoder`` and usable as the next
teacher) and appends a 'distill' record to ``workdir/eval_results.json``.
"""
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from simclr_jax import config_validation, loop, optim, sharding, storage, writers
from simclr_jax import encoder as encoder_lib
from simclr_jax.data import input_pipeline, sources
from simclr_jax.distillation.step import StudentState, make_distill_step
from simclr_jax.evaluation import passes
from simclr_jax.models import model_from_config
from simclr_jax.models.classifier import features_at, head_logits, linear_classifier
from simclr_jax.weights import checkpoint, pretrained
from simclr_jax.weights.checkpoint import PROBE

STUDENT = "student"  # where the trained student goes, inside the workdir


def check_teacher(config) -> int:
    """The class count of the teacher's classifier; a teacher must be a fine-tuned
    network (read from config.json and metadata, before anything is restored)."""
    official = pretrained.official_prefix(config.teacher) is not None
    if not official and pretrained.architecture(config.teacher).protocol not in ("finetune", "distill"):
        raise config_validation.ConfigError(
            f"config.teacher={config.teacher!r} is a pretraining workdir, not a fine-tuned network (an online "
            "probe is a linear probe on h, not a teacher): fine-tune it first (configs/finetune.py) and pass "
            "that run's WORKDIR/finetuned")
    classes = pretrained.supervised_head_classes(config.teacher, config.teacher_step)
    if not classes:
        raise config_validation.ConfigError(
            f"config.teacher={config.teacher!r} has no classifier to teach with: pass a fine-tuned SimCLR "
            "checkpoint (official fine-tuned models carry one)")
    return classes


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with the student's architecture, image size and head layers
    filled in (module docstring of configs/distill.py), checked."""
    teacher = pretrained.architecture(config.teacher)
    if config.init_from:  # the student is init_from's network
        trained = pretrained.resolve(config.init_from, config.model, field="init_from", unset_ok=True).model
        model = {name: trained[name] for name in config_validation.MODEL_FIELDS}
    else:  # the teacher's, but for the fields set (a smaller student)
        model = {name: teacher.model[name] if config.model[name] is None else config.model[name]
                 for name in config_validation.MODEL_FIELDS}
    if config.image_size not in (None, teacher.image_size):
        raise config_validation.ConfigError(
            f"config.image_size={config.image_size} differs from the teacher's {teacher.image_size}: teacher and "
            "student see the same views; leave image_size unset")
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.model = ml_collections.ConfigDict(model)
    resolved.image_size = int(teacher.image_size)
    resolved.teacher_head_layer = teacher.head_layer if config.teacher_head_layer is None else config.teacher_head_layer
    resolved.head_layer = resolved.teacher_head_layer if config.head_layer is None else config.head_layer
    config_validation.check_image_size(resolved.image_size, resolved.model.cifar_stem)
    for field, layers, whose in (("head_layer", model["head_layers"], "student"),
                                 ("teacher_head_layer", teacher.model.head_layers, "teacher")):
        if resolved[field] > layers:
            raise config_validation.ConfigError(f"config.{field}={resolved[field]} is invalid: the {whose}'s head "
                                                f"has {layers} layers (0 = h)")
    return resolved


def make_optimizer(settings, steps_per_epoch: int, total_steps: int):
    """(optimizer, schedule) of ``config.distill``: 'momentum' (Nesterov SGD,
    weight decay on kernels) or 'lars' (pretraining's), peak learning_rate *
    B/256 after a linear warm-up, then cosine to 0 or constant."""
    learning_rate = optim.schedule(optim.peak_learning_rate(settings.learning_rate, settings.batch_size),
                                   total_steps=total_steps, decay=settings.schedule,
                                   warmup_steps=min(optim.steps(settings.warmup_epochs, steps_per_epoch), total_steps))
    return optim.create(settings.optimizer, learning_rate, weight_decay=settings.weight_decay), learning_rate


class Distillation:
    """One distillation run, built once from a resolved config: ``train(workdir)``
    then ``score(state)``."""

    def __init__(self, config, mesh):
        self.config, self.mesh, self.settings = config, mesh, config.distill
        self.num_classes = sources.num_classes(config.dataset, config.test_split, config.data_dir,
                                               download=config.download)
        self.examples, self.num_train, self.num_labelled = self._training_examples()
        self.name, self.batch_size = "distill", self.settings.batch_size
        self.steps_per_epoch = max(1, self.num_train // self.settings.batch_size)
        self.total_steps = max(1, optim.steps(self.settings.epochs, self.num_train, self.settings.batch_size))
        self.tx, self.schedule = make_optimizer(self.settings, self.steps_per_epoch, self.total_steps)
        self.student = model_from_config(config.model)
        self.teacher = encoder_lib.load_encoder(config.teacher, step=config.teacher_step, mesh=mesh,
                                                head_layer=config.teacher_head_layer)
        self._check_teacher_head()
        self._step = make_distill_step(
            self.student.clone(axis_name=sharding.DATA_AXIS), self.teacher.model, self.tx, mesh,
            num_classes=self.num_classes, student_head_layer=config.head_layer,
            teacher_head_layer=config.teacher_head_layer, temperature=self.settings.temperature,
            alpha=self.settings.alpha)
        # Student and teacher are each a network with a linear head on one layer: scored by one function.
        self._logits = jax.jit(head_logits, static_argnums=(0, 4))

    def _training_examples(self):
        """(every train image, labels -1 but on the labelled subset when alpha > 0;
        their count; the labelled count)."""
        config, labelled = self.config, None
        if self.settings.alpha > 0:
            labels = input_pipeline.split_labels(config, config.dataset, config.train_split)
            labelled = input_pipeline.balanced_subset(labels, self.settings.label_fraction, self.settings.subset_seed)
        examples, num_train, _ = input_pipeline.partly_labelled_examples(config, config.dataset, config.train_split,
                                                                         labelled)
        if self.settings.batch_size > num_train:
            raise config_validation.ConfigError(
                f"config.distill.batch_size={self.settings.batch_size} exceeds the {num_train} images of "
                f"{config.dataset}:{config.train_split}; lower it")
        return examples, num_train, 0 if labelled is None else len(labelled)

    def _check_teacher_head(self) -> None:
        inputs = int(self.teacher.supervised_head["kernel"].shape[0])
        if inputs != self.teacher.feature_dim:
            raise config_validation.ConfigError(
                f"the teacher's classifier takes {inputs} features but its head layer "
                f"{self.config.teacher_head_layer} gives {self.teacher.feature_dim}: set "
                "--config.teacher_head_layer to the layer it was fine-tuned from (1 for SimCLR v2's)")

    def initial_state(self) -> StudentState:
        """The student at init_from's weights (or random), a zero classifier, fresh optimiser."""
        config, mesh = self.config, self.mesh
        if config.init_from:
            variables, _, _ = pretrained.restore(config.init_from, self.student, config.image_size, mesh)
        else:
            variables = pretrained.random_variables(self.student, config.image_size, config.seed, mesh)
        dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        dim = jax.eval_shape(lambda v: features_at(self.student, v, dummy, config.head_layer, False)[0],
                             variables).shape[-1]
        init = lambda: linear_classifier(self.num_classes).init(jax.random.key(0), jnp.zeros((1, dim)))["params"]
        params = {"model": variables["params"],
                  "classifier": jax.jit(init, out_shardings=sharding.replicated(mesh))()}
        opt_state = jax.jit(self.tx.init, out_shardings=sharding.replicated(mesh))(params)
        return StudentState(step=sharding.put_replicated(np.zeros((), np.int32), mesh), params=params,
                            batch_stats=variables["batch_stats"], opt_state=opt_state)

    # ------------------------------------------------------------ loop.Experiment

    def batches(self, start_step: int):
        """Device batches from ``start_step`` on (the stream skips what was consumed, before augmenting)."""
        per_process = sharding.per_process_batch_size(self.settings.batch_size)
        logging.info("distill: %d steps of %d images over %d of %s:%s (%d labelled), from step %d", self.total_steps,
                     self.batch_size, self.num_train, self.config.dataset, self.config.train_split,
                     self.num_labelled, start_step)
        dataset = input_pipeline.supervised_dataset(self.config, self.examples, per_process_batch_size=per_process,
                                                    seed=self.config.seed, skip_examples=start_step * per_process)
        return (sharding.put_batch(batch, self.mesh) for batch in dataset.as_numpy_iterator())

    def step(self, state: StudentState, batch: dict):
        return self._step(state, self.teacher.variables, self.teacher.supervised_head, batch["image"], batch["label"])

    def scalars(self, step: int) -> dict:
        return {"learning_rate": float(self.schedule(step - 1)), "epoch": step / self.steps_per_epoch}

    def describe(self, step: int, scalars: dict) -> str:
        return (f"distill epoch {scalars['epoch']:.2f}/{self.settings.epochs:g} (step {step}/{self.total_steps}) | "
                f"objective {scalars['objective']:.4f} | distillation loss {scalars['distillation_loss']:.4f} | "
                f"agreement with the teacher {scalars['teacher_agreement']:.3f} | "
                f"{scalars['images_per_sec']:.1f} images/s | ETA "
                f"{loop.eta(step, self.total_steps, self.batch_size, scalars)}")

    def monitor(self, state, step: int, manager, writer) -> bool:
        return False

    def train(self, workdir: str) -> StudentState:
        """Trains to ``total_steps`` in the one loop (loop.run), resuming from
        ``workdir``'s latest checkpoint; a stop request saves and returns early."""
        resume = loop.check_resume(workdir, self.config)
        loop.record_start(workdir, self.config, resume)
        writer = writers.create_writer(workdir)
        state = loop.run(self, workdir, loop.Cadence.from_config(self.config), writer)
        writer.close()
        return state

    def score(self, state: StudentState) -> tuple[dict, dict]:
        """(student's, teacher's) {'top1', 'top5', 'num_examples'} on eval views of the test split."""
        variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
        student = passes.split_accuracy(self.config, self.config.test_split, self.mesh, lambda images: self._logits(
            self.student, variables, state.params["classifier"], images, self.config.head_layer),
            label="distill (student)")
        teacher = passes.split_accuracy(self.config, self.config.test_split, self.mesh, lambda images: self._logits(
            self.teacher.model, self.teacher.variables, self.teacher.supervised_head, images,
            self.config.teacher_head_layer), label="distill (teacher)")
        return student, teacher


def _architecture(model: ml_collections.ConfigDict, head_layer: int) -> dict:
    return dict({name: model[name] for name in config_validation.MODEL_FIELDS}, head_layer=head_layer)


def distill(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs configs/distill.py's protocol into ``workdir`` and returns its record
    (module docstring). Refuses to start if ``workdir/student`` exists."""
    mesh = sharding.make_mesh()
    config_validation.validate(config, mesh.devices.size)
    storage.check_writable_dir(workdir)
    checkpoint.refuse_run_workdir(workdir, "distill")
    student_dir = storage.join(workdir, STUDENT)
    if storage.exists(student_dir):
        raise config_validation.ConfigError(f"{student_dir} already holds a distilled student; remove it, or give "
                                            "this run another --workdir")
    teacher_classes = check_teacher(config)
    num_classes = sources.num_classes(config.dataset, config.test_split, config.data_dir, download=config.download)
    if teacher_classes != num_classes:
        raise config_validation.ConfigError(
            f"the teacher {config.teacher!r} classifies {teacher_classes} classes but the student learns the "
            f"{num_classes} of {config.dataset}: distil on the dataset the teacher was fine-tuned for")
    config = resolve(config)
    start = time.perf_counter()
    run = Distillation(config, mesh)
    state = run.train(workdir)
    if int(state.step) < run.total_steps:  # stopped on request: resume later
        return {}
    student, teacher = run.score(state)
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
    checkpoint.save_network(student_dir, config=config, variables=variables, head=state.params["classifier"],
                            step=run.total_steps, head_key=PROBE)
    record = dict(protocol="distill", teacher=config.teacher, teacher_top1=teacher["top1"],
                  teacher_top5=teacher["top5"], teacher_architecture=_architecture(run.teacher.model_config,
                                                                                  config.teacher_head_layer),
                  init_from=config.init_from, student_architecture=_architecture(config.model, config.head_layer),
                  dataset=config.dataset, split=config.test_split, temperature=config.distill.temperature,
                  alpha=config.distill.alpha, num_labelled_examples=run.num_labelled,
                  num_train_examples=run.num_train, train_steps=run.total_steps, student=student_dir,
                  seconds=round(time.perf_counter() - start, 1), **student)
    logging.info("Distillation result: %s", record)
    if jax.process_index() == 0:
        writers.append_result(workdir, record)
    return record
