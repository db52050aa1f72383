"""The paper's supervised protocols on a pretrained encoder: one experiment, two modes.

``ClassifierExperiment(model, config, mesh, freeze_encoder=...)`` trains a
linear classifier on the features of ``config.head_layer`` (0 = h) with
softmax cross-entropy and SGD with Nesterov momentum 0.9 at
``learning_rate * B / 256``, on training views made by random resized crop
+ flip only (no colour, no blur), then reports top-1/top-5 on eval views of
the test split:

- ``freeze_encoder=True``: the paper's linear evaluation (``config.linear``).
  BatchNorm runs in inference mode and the features are under
  stop_gradient; with ``linear.standardize`` they are first standardised by
  fixed statistics of augmented training views.
- ``freeze_encoder=False``: semi-supervised fine-tuning (``config.finetune``).
  The encoder, the head layers up to ``head_layer`` and the classifier all
  learn, with global BatchNorm in train mode, from a class-balanced
  fraction of the labels.

The step is jit(shard_map) over the 'data' mesh, built once per experiment.
"""
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from simclr_jax import loop, numerics, optim, sharding, storage, updates, writers
from simclr_jax.data import input_pipeline, sources
from simclr_jax.errors import UserError
from simclr_jax.evaluation import passes
from simclr_jax.models import SimCLR
from simclr_jax.models.classifier import features_at, keep_unused_head_stats, linear_classifier

DATA = sharding.DATA_AXIS
STANDARDIZE_EXAMPLES = 10_000  # augmented training views that set linear.standardize's statistics


@flax.struct.dataclass
class ClassifierState:
    step: jax.Array
    params: Any  # {'classifier'}, plus 'model' (the SimCLR params) when the encoder trains
    batch_stats: Any  # the SimCLR BatchNorm statistics when the encoder trains, else {}
    opt_state: Any
    # Fixed per-dimension {'mean', 'inv_std'} of the frozen features, applied
    # before the classifier ({} = raw features): see feature_standardizer.
    feature_norm: Any


def make_train_step(model, tx, num_classes: int, head_layer: int, mesh, *, train_encoder: bool):
    """jit(shard_map) ``step(state, frozen, images, labels) -> (state, metrics)``.

    ``model`` has axis_name='data', so in train mode BatchNorm averages its
    moments over all devices. ``frozen`` is the encoder's variables when it
    does not train ({} otherwise). The loss is pmean-ed over 'data', so with
    replicated parameters the gradient is the global-batch one.
    """
    classifier = linear_classifier(num_classes)

    def on_device(state, frozen, images, labels):
        def loss_fn(params):
            if train_encoder:
                variables = {"params": params["model"], "batch_stats": state.batch_stats}
                features, stats = features_at(model, variables, images, head_layer, train=True)
                stats = keep_unused_head_stats(stats, state.batch_stats, head_layer)
            else:
                features, _ = features_at(model, frozen, images, head_layer, train=False)
                features, stats = lax.stop_gradient(features), state.batch_stats
            features = numerics.standardize(features, state.feature_norm)
            logits = classifier.apply({"params": params["classifier"]}, features)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
            return lax.pmean(loss, DATA), (lax.pmean(accuracy, DATA), stats)

        (loss, (accuracy, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, nonfinite = updates.apply_if_finite(state, tx, grads, loss, stats)
        return new_state, {"loss": loss, "accuracy": accuracy, "nonfinite": nonfinite}

    sharded = jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA)), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)


def feature_standardizer(model, variables, batches, mesh, head_layer: int) -> dict:
    """{'mean', 'inv_std'} per dimension of the frozen features of ``batches``
    (augmented training batches), in one streaming pass (numerics.standardization)."""
    @jax.jit
    def moments(images):
        features = features_at(model, variables, images, head_layer, train=False)[0].astype(jnp.float32)
        return features.shape[0], features.sum(0), jnp.square(features).sum(0), features.max(0), features.min(0)

    count, total, squares, high, low = 0, 0.0, 0.0, -np.inf, np.inf
    for batch in batches:
        n, s, q, hi, lo = jax.device_get(moments(sharding.put_batch(batch["image"], mesh)))
        count, total, squares = count + n, total + s.astype(np.float64), squares + q.astype(np.float64)
        high, low = np.maximum(high, hi), np.minimum(low, lo)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    stats = numerics.standardization(mean.astype(np.float32), std.astype(np.float32), high == low)
    return jax.tree.map(np.asarray, stats)


class ClassifierExperiment:
    """``run(variables, workdir)`` trains as the module docstring says, in the
    one loop (loop.run: checkpoints, resume, stop requests, the non-finite
    guard), and returns {'top1', 'top5', 'num_examples', 'num_train_examples',
    'train_steps'}; ``trained_variables`` then holds the encoder's variables
    after training."""

    def __init__(self, model: SimCLR, config, mesh, *, freeze_encoder: bool):
        self.name = "linear_eval" if freeze_encoder else "finetune"
        self.section = "linear" if freeze_encoder else "finetune"  # the config section it trains with
        self.config, self.mesh, self.model, self.freeze_encoder = config, mesh, model, freeze_encoder
        self.settings = config[self.section]
        self.batch_size, self.head_layer = self.settings.batch_size, config.head_layer
        self.num_classes = sources.num_classes(config.dataset, config.test_split, config.data_dir,
                                               download=config.download)
        self.dataset, self.split, indices = self._training_examples()
        self.examples, self.num_train, info = input_pipeline.labelled_examples(config, self.dataset, self.split,
                                                                               indices)
        if sources.label_classes(info) != self.num_classes:
            raise UserError(f"{self.dataset} has {sources.label_classes(info)} classes but {config.dataset} has "
                             f"{self.num_classes}; they must share one label set")
        if self.settings.batch_size > self.num_train:
            raise UserError(f"config.{self.section}.batch_size={self.settings.batch_size} exceeds the "
                             f"{self.num_train} labelled training examples of {self.dataset}:{self.split}; lower it")
        self.total_steps = max(1, optim.steps(self.settings.epochs, self.num_train, self.settings.batch_size))
        self.tx = self._optimizer()
        self._step = make_train_step(model.clone(axis_name=DATA), self.tx, self.num_classes, self.head_layer,
                                     mesh, train_encoder=not freeze_encoder)
        classifier = linear_classifier(self.num_classes)
        features = lambda variables, images: features_at(model, variables, images, self.head_layer, False)[0]
        self._logits = jax.jit(lambda variables, params, norm, images: classifier.apply(
            {"params": params}, numerics.standardize(features(variables, images), norm)))
        self.trained_variables = None

    def _optimizer(self):
        """Nesterov SGD at learning_rate * B/256, cosine to 0 (or constant for
        finetune.schedule='constant'), no warm-up; weight decay on the
        classifier's kernel only."""
        settings = self.settings
        learning_rate = optim.schedule(optim.peak_learning_rate(settings.learning_rate, settings.batch_size),
                                       total_steps=self.total_steps,
                                       decay="cosine" if self.freeze_encoder else settings.schedule)
        decay_mask = lambda params: {name: {"kernel": True, "bias": False} if name == "classifier" else False
                                     for name in params}
        return optim.create("momentum", learning_rate, weight_decay=settings.weight_decay, decay_mask=decay_mask)

    def _training_examples(self):
        """(dataset, split, indices or None for all) the classifier trains on.

        Fine-tuning reads ``finetune.subset_split`` (a dataset whose train split
        is the subset: ImageNet's fixed 1%/10% lists) or else a class-balanced
        ``label_fraction`` of the train split drawn with ``subset_seed``. Either
        way the examples come from a train split, disjoint from the test split.
        """
        config = self.config
        if self.freeze_encoder or self.settings.label_fraction == 1 and not self.settings.subset_split:
            return config.dataset, config.train_split, None
        if self.settings.subset_split:
            return self.settings.subset_split, "train", None
        labels = input_pipeline.split_labels(config, config.dataset, config.train_split)
        return config.dataset, config.train_split, input_pipeline.balanced_subset(
            labels, self.settings.label_fraction, self.settings.subset_seed)

    def _batches(self, seed: int, skip_examples: int = 0):
        return input_pipeline.supervised_dataset(
            self.config, self.examples, per_process_batch_size=sharding.per_process_batch_size(
                self.settings.batch_size), seed=seed, skip_examples=skip_examples)

    def _initial_state(self, variables) -> ClassifierState:
        dummy = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
        dim = jax.eval_shape(lambda v: features_at(self.model, v, dummy, self.head_layer, False)[0],
                             variables).shape[-1]
        init = lambda: linear_classifier(self.num_classes).init(jax.random.key(0), jnp.zeros((1, dim)))["params"]
        params = {"classifier": jax.jit(init, out_shardings=sharding.replicated(self.mesh))()}
        batch_stats, feature_norm = {}, {}
        if not self.freeze_encoder:
            # Copies: the step donates its state, which must not free the caller's variables.
            params["model"] = jax.tree.map(lambda x: x.copy(), variables["params"])
            batch_stats = jax.tree.map(lambda x: x.copy(), variables["batch_stats"])
        elif self.settings.standardize:
            # Its own stream (seed + 1), so the classifier's batches are the same with or without it.
            num_batches = max(1, min(self.num_train, STANDARDIZE_EXAMPLES) // self.settings.batch_size)
            views = self._batches(self.config.seed + 1).take(num_batches).as_numpy_iterator()
            feature_norm = feature_standardizer(self.model, variables, views, self.mesh, self.head_layer)
        # Every leaf replicated, as the step returns it, so the second step reuses the first's compilation.
        opt_state = jax.jit(self.tx.init, out_shardings=sharding.replicated(self.mesh))(params)
        return ClassifierState(step=sharding.put_replicated(np.zeros((), np.int32), self.mesh), params=params,
                               batch_stats=batch_stats, opt_state=opt_state,
                               feature_norm=sharding.put_replicated(feature_norm, self.mesh))

    # ------------------------------------------------------------ loop.Experiment

    def initial_state(self) -> ClassifierState:
        return self._initial_state(self._variables)

    def batches(self, start_step: int):
        logging.info("%s: %s the encoder on %d examples of %s:%s, %d steps of %d (head_layer %d), from step %d",
                     self.name, "freezing" if self.freeze_encoder else "training", self.num_train, self.dataset,
                     self.split, self.total_steps, self.settings.batch_size, self.head_layer, start_step)
        skip = start_step * sharding.per_process_batch_size(self.settings.batch_size)
        return (sharding.put_batch(batch, self.mesh) for batch in
                self._batches(self.config.seed, skip_examples=skip).as_numpy_iterator())

    def step(self, state: ClassifierState, batch: dict):
        return self._step(state, self._frozen, batch["image"], batch["label"])

    def scalars(self, step: int) -> dict:
        return {"epoch": step * self.settings.batch_size / self.num_train}

    def describe(self, step: int, scalars: dict) -> str:
        return (f"{self.name} epoch {scalars['epoch']:.2f}/{self.settings.epochs:g} (step {step}/{self.total_steps})"
                f" | loss {scalars['loss']:.4f} | train accuracy {scalars['accuracy']:.3f} | "
                f"{scalars['images_per_sec']:.1f} images/s | ETA "
                f"{loop.eta(step, self.total_steps, self.settings.batch_size, scalars)}")

    def monitor(self, state, step: int, manager, writer) -> bool:
        return False

    # ------------------------------------------------------------------------

    def score(self, variables, classifier_params, feature_norm) -> dict:
        """{'top1', 'top5', 'num_examples'} on eval views of the test split."""
        return passes.split_accuracy(self.config, self.config.test_split, self.mesh,
                                     lambda images: self._logits(variables, classifier_params, feature_norm, images),
                                     label=self.name)

    def run(self, variables, workdir: str) -> Optional[dict]:
        """Trains from ``variables`` in the loop, then scores; None when a stop
        request ended the training early (run it again to resume). Its
        checkpoints, config.json and training metrics go to ``workdir/<name>``
        (linear_eval or finetune), resumed from there."""
        self._variables, self._frozen = variables, variables if self.freeze_encoder else {}
        run_dir = storage.join(workdir, self.name)  # its own: an evaluation workdir may hold several protocols
        resume = loop.check_resume(run_dir, self.config)
        loop.record_start(run_dir, self.config, resume)
        writer = writers.create_writer(run_dir)
        state = loop.run(self, run_dir, loop.Cadence.from_config(self.config), writer)
        writer.close()
        if int(state.step) < self.total_steps:
            return None
        self.trained_variables = (variables if self.freeze_encoder else
                                  {"params": state.params["model"], "batch_stats": state.batch_stats})
        self.trained_classifier = state.params["classifier"]
        result = self.score(self.trained_variables, state.params["classifier"], state.feature_norm)
        result = dict(result, num_train_examples=self.num_train, train_steps=self.total_steps)
        if not self.freeze_encoder:
            subset = self.settings.subset_split
            result.update(dict(subset_split=subset) if subset else dict(label_fraction=self.settings.label_fraction))
        logging.info("%s result: %s", self.name, result)
        return result
