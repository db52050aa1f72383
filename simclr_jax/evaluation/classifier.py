"""Supervised protocols that train through the image pipeline.

- The paper's linear evaluation (``config.linear``, with ``linear.cached=False``):
  the encoder is frozen (BatchNorm in inference mode, features under
  stop_gradient) and only a linear classifier learns.
- Semi-supervised fine-tuning (``config.finetune``): the encoder, the
  projection-head layers up to ``head_layer`` and the classifier all learn,
  with global BatchNorm in train mode, from a class-balanced fraction of the
  labels.

Both are one loop, ``train_classifier``: a linear classifier on the features
of ``config.head_layer`` (0 = h), softmax cross-entropy, SGD with Nesterov
momentum 0.9 at ``learning_rate * B / 256``, training views made by random
resized crop + flip only (no colour, no blur), and top-1/top-5 on eval views
of the test split. The step is jit(shard_map) over the 'data' mesh.
"""
import time
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from simclr_jax import augment, input_pipeline, models, probes, sharding

AUTOTUNE = tf.data.AUTOTUNE
DATA = sharding.DATA_AXIS
MOMENTUM = 0.9  # Nesterov, as the paper's linear evaluation and fine-tuning
SCHEDULES = ("cosine", "constant")
_SKIP_IMAGES = {"image": tfds.decode.SkipDecoding()}
STANDARDIZE_EXAMPLES = 10_000  # augmented training views that set linear.standardize's statistics


# --------------------------------------------------------------------------- config

def _section(config) -> Optional[str]:
    """The config section a protocol trains with; None if it trains nothing here."""
    if config.protocol == "finetune":
        return "finetune"
    if config.protocol == "linear_eval" and not config.linear.get("cached", True):
        return "linear"
    return None


def check_config(config, mesh, section: Optional[str] = None) -> None:
    """Raises a ValueError naming the field, before anything loads or compiles.

    ``section`` defaults to the one ``config.protocol`` uses; nothing is
    checked for protocols that do not train here (kNN, cached linear probe).
    """
    section = section or _section(config)
    if section is None:
        return
    settings = config[section]
    if section == "finetune":
        fraction = settings.label_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(
                f"config.finetune.label_fraction={fraction!r} must be in (0, 1]: the fraction of the "
                "train split's labels to fine-tune on (the paper uses 0.01 and 0.1; 1.0 = all labels)")
        if settings.get("schedule", "cosine") not in SCHEDULES:
            raise ValueError(f"config.finetune.schedule={settings.schedule!r}: choose one of {SCHEDULES}")
    batch, num_devices = settings.batch_size, mesh.devices.size
    if batch <= 0 or batch % num_devices:
        raise ValueError(
            f"config.{section}.batch_size={batch} must be a positive multiple of the {num_devices} "
            f"devices in the mesh; set --config.{section}.batch_size to a multiple of {num_devices}")
    sharding.check_batch_size(batch, mesh)  # and of the process count
    if not settings.learning_rate > 0:
        raise ValueError(f"config.{section}.learning_rate={settings.learning_rate!r} must be > 0")
    if not settings.epochs > 0:
        raise ValueError(f"config.{section}.epochs={settings.epochs!r} must be > 0")
    if not isinstance(settings.get("standardize", False), bool):
        raise ValueError(f"config.{section}.standardize={settings.standardize!r} must be True or False")
    head_layers = config.model.head_layers
    if not 0 <= config.head_layer <= head_layers:
        raise ValueError(f"config.head_layer={config.head_layer!r} must be in [0, {head_layers}] (0 = h)")


# --------------------------------------------------------------------------- data

def split_labels(config, dataset: str, split: str) -> np.ndarray:
    """Labels of a whole split, in reading order, without decoding an image."""
    ds, _, _ = input_pipeline.load_split(dataset, split, config.data_dir, decoders=_SKIP_IMAGES,
                                         process_slice=False)
    ds = ds.map(lambda example: example["label"], num_parallel_calls=AUTOTUNE).batch(8192)
    batches = list(ds.as_numpy_iterator())
    return np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, np.int64)


def labelled_subset(config) -> tuple[str, str, Optional[np.ndarray]]:
    """(dataset, split, indices or None for all) that fine-tuning trains on.

    ``finetune.subset_split`` names a dataset whose train split is the subset
    (ImageNet's fixed lists: 'imagenet2012_subset/1pct'). Otherwise
    ``probes.balanced_subset`` draws a class-balanced ``label_fraction`` of the
    train split's labels with ``finetune.subset_seed``. Either way the
    examples come from a train split, so they are disjoint from the test split.
    """
    settings = config.finetune
    if settings.get("subset_split"):
        return settings.subset_split, "train", None
    if settings.label_fraction == 1:
        return config.dataset, config.train_split, None
    labels = split_labels(config, config.dataset, config.train_split)
    indices = probes.balanced_subset(labels, settings.label_fraction, settings.subset_seed)
    return config.dataset, config.train_split, indices


def labelled_examples(config, dataset: str, split: str, indices=None):
    """(this process's decoded {'image' uint8, 'label' int32}, global count, DatasetInfo).

    With ``indices`` (positions in the whole split, as ``balanced_subset``
    gives them) every process reads the split with images undecoded, keeps
    its share of the chosen positions, and decodes only those.
    """
    if indices is None:
        ds, num_examples, info = input_pipeline.load_split(dataset, split, config.data_dir,
                                                           autocache=not config.cache_dataset)
        ds = ds.map(input_pipeline.image_and_label, num_parallel_calls=AUTOTUNE)
        return ds, num_examples, info

    ds, total, info = input_pipeline.load_split(dataset, split, config.data_dir, decoders=_SKIP_IMAGES,
                                                process_slice=False)
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= total):
        raise ValueError(f"subset indices must lie in [0, {total}) for {dataset}:{split}")
    keep = np.zeros(total, bool)
    keep[indices[jax.process_index()::jax.process_count()]] = True
    keep = tf.constant(keep)
    decode = info.features["image"].decode_example

    def decoded(index, example):
        return {"image": decode(example["image"]), "label": tf.cast(example["label"], tf.int32)}

    ds = ds.enumerate().filter(lambda index, _: tf.gather(keep, index))
    return ds.map(decoded, num_parallel_calls=AUTOTUNE), len(indices), info


def train_batches(config, examples, *, per_process_batch_size: int, seed: int):
    """Endless {'image': f32 [b, S, S, 3], 'label': i32 [b]} training batches.

    Random resized crop + horizontal flip only (the paper's linear-eval and
    fine-tuning augmentation), keyed by stateless per-example seeds folded
    from (seed, process, stream position) as in ``pretrain_dataset``. Each
    epoch is reshuffled (a buffer beyond the data just holds all of it, so a
    small labelled subset is a full permutation), then the stream repeats
    before batching, so no example is dropped at epoch ends.
    """
    size = config.image_size
    if config.cache_dataset:
        examples = examples.cache()
    ds = examples.shuffle(config.shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True).repeat()
    base_seed = tf.constant([seed, jax.process_index()], tf.int64)

    def view(index, example):
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(base_seed, index), num=2))
        image = augment.random_resized_crop(augment.to_float(example["image"]), size, size, crop_seed)
        image = augment.random_flip(image, flip_seed)
        return {"image": tf.ensure_shape(image, [size, size, 3]), "label": example["label"]}

    ds = ds.enumerate().map(view, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = config.get("deterministic_input", True)
    return ds.with_options(options).prefetch(AUTOTUNE)


# --------------------------------------------------------------------------- model and step

@flax.struct.dataclass
class ClassifierState:
    step: jax.Array
    params: Any  # {'classifier'}, plus 'model' (the SimCLR params) when the encoder trains
    batch_stats: Any  # the SimCLR BatchNorm statistics when the encoder trains, else {}
    opt_state: Any
    # Fixed per-dimension {'mean', 'inv_std'} of the frozen features, applied
    # before the classifier ({} = raw features): see feature_standardizer.
    feature_norm: Any = flax.struct.field(default_factory=dict)


def _classifier(num_classes: int) -> nn.Dense:
    # Zero-initialised, as the reference code's linear-eval and fine-tuning
    # commands set (zero_init_logits_layer=True) and the cached probe does.
    # Fine-tuning's encoder therefore first moves on the second step.
    return nn.Dense(num_classes, kernel_init=nn.initializers.zeros)


def _features(model, variables, images, head_layer: int, train: bool):
    """(features at head_layer, updated BatchNorm statistics or None)."""
    if train:
        features, updates = model.apply(variables, images, train, head_layer,
                                        method=models.SimCLR.features, mutable=["batch_stats"])
        return features, updates["batch_stats"]
    return model.apply(variables, images, train, head_layer, method=models.SimCLR.features), None


def _standardize(features, feature_norm):
    """(features - mean) * inv_std: an affine map, so classifier and map
    together are still one linear classifier on the features."""
    if not feature_norm:
        return features
    return (features - feature_norm["mean"]) * feature_norm["inv_std"]


def _keep_unused_head_stats(new, old, head_layer: int):
    """The head computes all its layers, but those past head_layer feed nothing:
    keep their BatchNorm statistics (their parameters get zero gradients)."""
    head = {name: new["head"][name] if int(name[len("bn"):]) <= head_layer else old["head"][name]
            for name in old["head"]}
    return dict(new, head=head)


def make_train_step(model, tx, num_classes: int, head_layer: int, mesh, *, train_encoder: bool):
    """jit(shard_map) ``step(state, frozen, images, labels) -> (state, metrics)``.

    ``model`` has axis_name='data', so in train mode BatchNorm averages its
    moments over all devices. ``frozen`` is the encoder's variables when it
    does not train ({} otherwise). The loss is pmean-ed over 'data', so with
    replicated parameters the gradient is the global-batch one (see step.py).
    """
    classifier = _classifier(num_classes)

    def on_device(state, frozen, images, labels):
        def loss_fn(params):
            if train_encoder:
                variables = {"params": params["model"], "batch_stats": state.batch_stats}
                features, stats = _features(model, variables, images, head_layer, train=True)
                stats = _keep_unused_head_stats(stats, state.batch_stats, head_layer)
            else:
                features, _ = _features(model, frozen, images, head_layer, train=False)
                features, stats = lax.stop_gradient(features), state.batch_stats
            logits = classifier.apply({"params": params["classifier"]}, _standardize(features, state.feature_norm))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
            return lax.pmean(loss, DATA), (lax.pmean(accuracy, DATA), stats)

        (loss, (accuracy, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = ClassifierState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                    batch_stats=stats, opt_state=opt_state, feature_norm=state.feature_norm)
        return new_state, {"loss": loss, "accuracy": accuracy}

    sharded = jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA)),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)


def _optimizer(settings, batch_size: int, total_steps: int) -> optax.GradientTransformation:
    """Nesterov SGD at learning_rate * B/256, cosine to 0 (or constant), no warm-up.
    Weight decay (0 by default, as in the paper) applies to the classifier kernel only."""
    peak = settings.learning_rate * batch_size / 256
    schedule = settings.get("schedule", "cosine")
    learning_rate = optax.cosine_decay_schedule(peak, total_steps) if schedule == "cosine" else peak
    decay_mask = lambda params: {name: {"kernel": True, "bias": False} if name == "classifier" else False
                                 for name in params}
    return optax.chain(optax.add_decayed_weights(settings.get("weight_decay", 0.0), mask=decay_mask),
                       optax.sgd(learning_rate, momentum=MOMENTUM, nesterov=True))


def _create_state(tx, classifier_params, variables, train_encoder: bool, mesh,
                  feature_norm=None) -> ClassifierState:
    params, batch_stats = {"classifier": classifier_params}, {}
    if train_encoder:
        # Copies: the step donates its state, which must not free the caller's variables.
        params["model"] = jax.tree.map(lambda x: x.copy(), variables["params"])
        batch_stats = jax.tree.map(lambda x: x.copy(), variables["batch_stats"])
    # Every leaf replicated, as the step returns it, so the second step reuses the first's compilation.
    opt_state = jax.jit(tx.init, out_shardings=sharding.replicated(mesh))(params)
    return ClassifierState(step=sharding.put_replicated(np.zeros((), np.int32), mesh), params=params,
                           batch_stats=batch_stats, opt_state=opt_state,
                           feature_norm=sharding.put_replicated(feature_norm or {}, mesh))


# --------------------------------------------------------------------------- loop

def feature_standardizer(model, variables, batches, mesh, head_layer: int) -> dict:
    """{'mean', 'inv_std'} per dimension of the frozen features of ``batches``
    (augmented training batches). Raw h spans orders of magnitude between
    encoders (SGD at 0.1 x B/256 on the smoke encoder's h began at loss 70);
    standardised, one learning rate suits all. Constant dimensions keep scale 1."""
    @jax.jit
    def moments(images):
        features = _features(model, variables, images, head_layer, train=False)[0].astype(jnp.float32)
        return (features.shape[0], features.sum(0), jnp.square(features).sum(0),
                features.max(0), features.min(0))

    count, total, squares, high, low = 0, 0.0, 0.0, -np.inf, np.inf
    for batch in batches:
        n, s, q, hi, lo = jax.device_get(moments(sharding.put_batch(batch["image"], mesh)))
        count, total, squares = count + n, total + s.astype(np.float64), squares + q.astype(np.float64)
        high, low = np.maximum(high, hi), np.minimum(low, lo)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    inv_std = 1.0 / np.where((high == low) | (std == 0), 1.0, std)
    return {"mean": mean.astype(np.float32), "inv_std": inv_std.astype(np.float32)}


def score_test_split(config, model, variables, classifier_params, num_classes: int, mesh,
                     feature_norm=None) -> dict:
    """{'top1', 'top5', 'num_examples'} on eval views of the test split.

    Batches are padded to eval_batch_size (one compilation, an even split over
    the mesh) by sharding.map_padded_batches.
    """
    head_layer, batch_size = config.head_layer, sharding.per_process_batch_size(config.eval_batch_size)
    classifier = _classifier(num_classes)
    logits_fn = jax.jit(lambda v, c, n, x: classifier.apply(
        {"params": c}, _standardize(_features(model, v, x, head_layer, train=False)[0], n)))
    dataset = input_pipeline.eval_dataset(config, config.test_split, batch_size=batch_size)
    logits, labels = sharding.map_padded_batches(
        lambda images: logits_fn(variables, classifier_params, feature_norm or {}, images), dataset, mesh,
        batch_size)
    return dict(probes.topk_accuracy(logits, labels), num_examples=len(labels))


def train_classifier(config, model, variables, mesh, *, section: str, train_encoder: bool,
                     dataset: str, split: str, indices=None) -> tuple[dict, dict]:
    """Trains a linear classifier on ``model``'s features, the encoder too if
    ``train_encoder``; returns (test result, the model's variables after training).

    ``config[section]`` holds batch_size, epochs, learning_rate and optionally
    schedule and weight_decay. Training examples are ``dataset:split``
    (restricted to ``indices`` if given); the test split is config.dataset's.
    """
    check_config(config, mesh, section)
    settings, head_layer = config[section], config.head_layer
    examples, num_train, info = labelled_examples(config, dataset, split, indices)
    _, _, test_info = input_pipeline.load_split(config.dataset, config.test_split, config.data_dir)
    num_classes = int(test_info.features["label"].num_classes)
    if int(info.features["label"].num_classes) != num_classes:
        raise ValueError(f"{dataset} has {info.features['label'].num_classes} classes but "
                         f"{config.dataset} has {num_classes}; they must share one label set")
    batch_size = settings.batch_size
    if batch_size > num_train:
        raise ValueError(f"config.{section}.batch_size={batch_size} exceeds the {num_train} labelled "
                         f"training examples of {dataset}:{split}; lower it")
    total_steps = max(1, int(round(settings.epochs * num_train / batch_size)))

    train_model = model.clone(axis_name=DATA)  # global BatchNorm inside shard_map
    tx = _optimizer(settings, batch_size, total_steps)
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    dim = jax.eval_shape(lambda v: _features(model, v, dummy, head_layer, False)[0], variables).shape[-1]
    init = lambda: _classifier(num_classes).init(jax.random.key(0), jnp.zeros((1, dim)))["params"]
    classifier_params = jax.jit(init, out_shardings=sharding.replicated(mesh))()
    per_process = sharding.per_process_batch_size(batch_size)
    batches = train_batches(config, examples, per_process_batch_size=per_process, seed=config.seed)
    batches = batches.as_numpy_iterator()
    feature_norm = None
    if not train_encoder and settings.get("standardize", False):
        # Its own stream (seed + 1), so the classifier's batches are the same with or without it.
        views = train_batches(config, examples, per_process_batch_size=per_process, seed=config.seed + 1)
        num_batches = max(1, min(num_train, STANDARDIZE_EXAMPLES) // batch_size)
        # A finite stream, read to its end.
        feature_norm = feature_standardizer(model, variables, views.take(num_batches).as_numpy_iterator(),
                                            mesh, head_layer)
    state = _create_state(tx, classifier_params, variables, train_encoder, mesh, feature_norm)
    frozen = {} if train_encoder else variables
    train_step = make_train_step(train_model, tx, num_classes, head_layer, mesh, train_encoder=train_encoder)

    logging.info("%s: %s the encoder on %d examples of %s:%s, %d steps of %d (head_layer %d)", section,
                 "training" if train_encoder else "freezing", num_train, dataset, split, total_steps,
                 batch_size, head_layer)
    log_every, history, start = max(1, total_steps // 10), [], time.perf_counter()
    for step in range(1, total_steps + 1):
        batch = sharding.put_batch(next(batches), mesh)
        state, metrics = train_step(state, frozen, batch["image"], batch["label"])
        history.append(metrics)
        if step % log_every == 0 or step == total_steps:
            stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *history))
            means = {name: float(np.mean(values)) for name, values in stacked.items()}
            logging.info("%s step %d/%d: loss %.4f, train accuracy %.4f, %.1f images/s", section, step,
                         total_steps, means["loss"], means["accuracy"],
                         len(history) * batch_size / (time.perf_counter() - start))
            history, start = [], time.perf_counter()

    trained = ({"params": state.params["model"], "batch_stats": state.batch_stats} if train_encoder
               else variables)
    result = score_test_split(config, model, trained, state.params["classifier"], num_classes, mesh,
                              feature_norm)
    result = dict(result, num_train_examples=num_train, train_steps=total_steps)
    logging.info("%s result: %s", section, result)
    return result, trained


# --------------------------------------------------------------------------- protocols

def linear_eval(config, model, variables, mesh) -> dict:
    """The paper's linear evaluation: frozen encoder, classifier trained on
    augmented views of the whole train split (``config.linear``)."""
    result, _ = train_classifier(config, model, variables, mesh, section="linear", train_encoder=False,
                                 dataset=config.dataset, split=config.train_split)
    return result


def finetune(config, model, variables, mesh) -> dict:
    """Semi-supervised fine-tuning on a labelled subset (``config.finetune``)."""
    check_config(config, mesh, "finetune")
    dataset, split, indices = labelled_subset(config)
    result, _ = train_classifier(config, model, variables, mesh, section="finetune", train_encoder=True,
                                 dataset=dataset, split=split, indices=indices)
    if config.finetune.get("subset_split"):
        return dict(result, subset_split=config.finetune.subset_split)
    return dict(result, label_fraction=config.finetune.label_fraction)
