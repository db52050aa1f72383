"""tf.data pipelines that yield per-process batches of numpy-ready dicts.

- ``pretrain_dataset``: endless pairs of SimCLR views, for pretraining.
- ``eval_dataset``: one ordered pass of evaluation views.
- ``supervised_dataset``: endless crop + flip views with labels, for linear
  evaluation and fine-tuning, from ``labelled_examples``.

Each process reads its own slice of a split (``sources.load_split``); the
caller turns a per-process batch into a global jax.Array. Every pipeline
is deterministic: all randomness is keyed by per-example seeds folded from
(seed, process index, position in the stream) (``example_seeds``), so the
same seed gives the same batches, which exact resume depends on. Config
fields are validated once, by ``config_validation``, not here.
"""
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import augment, sources

AUTOTUNE = tf.data.AUTOTUNE
_SKIP_IMAGES = {"image": tfds.decode.SkipDecoding()}


def _check_batch_size(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def example_seeds(seed, num, process_index=None):
    """fn(position) -> ``num`` shape-[2] seeds for one example of a stream.

    They are folded from (seed, process index, position), so a stream's
    augmentations follow ``seed``, repeat exactly when it is read again (or
    resumed), and differ between processes, which read disjoint slices.
    ``process_index`` defaults to this process's. The position is cast to
    int64 (the seeds' dtype follows it), so a Python int gives the seeds of
    tf.data's enumerate.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    process_index = jax.process_index() if process_index is None else process_index
    base = tf.constant([seed, process_index], tf.int64)

    def seeds(position):
        example = tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))
        return tf.random.experimental.stateless_split(example, num=num)

    return seeds


def _options():
    """tf.data options for every pipeline here.

    Deterministic order always (exact resume replays the same stream). One
    thread per op: parallelism comes from mapping many examples at once, and
    splitting small image ops across threads costs more than it saves
    (measured by benchmarks/input_pipeline.py; see docs/results.md).
    """
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    options.threading.max_intra_op_parallelism = 1
    return options


def _image_and_label(example):
    # Drop everything else (e.g. the 'id' string) before caching.
    return {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}


def _finish(ds, batch_size, drop_remainder):
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.with_options(_options()).prefetch(AUTOTUNE)


# ------------------------------------------------------------ pretraining


def pretrain_dataset(config, *, per_process_batch_size, seed, skip_examples=0):
    """Endless batches {'views': f32 [B, 2, S, S, 3], 'label': i32 [B]}.

    With ``config.augment_on == 'device'`` the views are only cropped and
    flipped, and the batch also holds 'augment_keys': u32 [B, 2, 2], each
    view's key for device_augment, which adds the colour and blur in the
    train step (``augment.device_key_data``: keyed like every other choice).

    Pipeline: decode -> (cache uint8) -> epochs, each shuffled -> two views
    per image -> batch -> prefetch.

    Without ``config.cache_dataset`` (ImageNet) images stay encoded until the
    views are made: the shuffle buffer holds compressed bytes, several times
    smaller than decoded images, and a JPEG is decoded once per example, only
    within its two crop boxes (``augment.train_views_from_encoded``; same
    boxes and augmentations as the decoded path).

    ``skip_examples`` (resume: steps done x B) starts the stream there, as an
    uninterrupted run would be, reading only the part of its epoch already
    consumed (see ``_stream``).
    """
    _check_batch_size("per_process_batch_size", per_process_batch_size)
    seeds_at = example_seeds(seed, 2)
    size, strength, blur = config.image_size, config.color_jitter_strength, config.blur
    on_device = config.augment_on == "device"
    # Decode before caching; otherwise leave images encoded (see above).
    decoders = None if config.cache_dataset else _SKIP_IMAGES
    ds, num_examples, _ = sources.load_split(config.dataset, config.train_split, config.data_dir,
                                             download=config.download, shuffle_files=True, seed=seed,
                                             autocache=not config.cache_dataset, decoders=decoders)
    epoch_size = _process_examples(ds, num_examples)
    ds = ds.map(_image_and_label, num_parallel_calls=AUTOTUNE)
    if config.cache_dataset:
        ds = ds.cache()

    def two_views(position, example):
        seeds, image = seeds_at(position), example["image"]
        if image.dtype == tf.string:  # encoded (SkipDecoding)
            views = augment.train_views_from_encoded(
                image, size, size, seeds=[seeds[0], seeds[1]],
                color_jitter_strength=strength, blur=blur, colour_and_blur=not on_device)
        else:
            views = [augment.train_view(image, size, size, seed=seeds[i], color_jitter_strength=strength,
                                        blur=blur, colour_and_blur=not on_device)
                     for i in range(2)]
        pair = {"views": tf.stack(views), "label": example["label"]}
        if on_device:
            pair["augment_keys"] = tf.stack([augment.device_key_data(seeds[i]) for i in range(2)])
        return pair

    ds = _stream(ds, epoch_size, config.shuffle_buffer_size, seed, skip_examples)
    ds = ds.map(two_views, num_parallel_calls=AUTOTUNE)
    if config.dataset.startswith(sources.IMAGES_PREFIX) and not config.cache_dataset:
        # A file of an image folder can pass the signature check and still fail
        # to decode (truncated): drop it, as load_image_files does when decoding.
        # (Resume then repeats as many examples as were dropped before it.)
        ds = ds.ignore_errors(log_warning=True)
    return _finish(ds, per_process_batch_size, drop_remainder=True)


def _process_examples(ds, num_examples) -> int:
    """Examples in this process's slice: its epoch. Image files and folders
    may not know their count (ignore_errors); a process holds every
    process_count-th of them."""
    count = int(ds.cardinality())
    if count < 0:
        count = len(range(jax.process_index(), num_examples, jax.process_count()))
    if count == 0:
        raise ValueError("this process's slice of the training split is empty: more processes than examples?")
    return count


def _stream(ds, epoch_size, buffer_size, seed, skip_examples):
    """(position, example) from position ``skip_examples`` on, forever.

    The stream is a function of (seed, epoch, position in the epoch): epoch
    e is ``ds`` (files in one fixed order) shuffled with a seed folded from
    (seed, e), and position e * epoch_size + i is its i-th example. So a
    resume opens its epoch directly and reads only what that epoch already
    gave (plus the shuffle buffer), not every earlier epoch again; the
    positions key the augmentations (``example_seeds``), so a resumed run
    sees exactly the batches and views an uninterrupted one would.
    """
    first_epoch, offset = divmod(skip_examples, epoch_size)
    base = tf.constant([seed, 0], tf.int64)

    def epoch(e):
        key = tf.random.experimental.stateless_fold_in(base, e)
        epoch_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
        shuffled = ds.shuffle(buffer_size, seed=epoch_seed, reshuffle_each_iteration=False)
        positions = tf.data.Dataset.range(e * epoch_size, (e + 1) * epoch_size)
        return tf.data.Dataset.zip(positions, shuffled)

    epochs = tf.data.Dataset.range(first_epoch, tf.int64.max)
    return epochs.flat_map(epoch).skip(offset)


# ------------------------------------------------------------ evaluation


def eval_dataset(config, split, *, batch_size, data_dir=None):
    """One ordered pass {'image': f32 [B, S, S, 3], 'label': i32 [B]}.

    The final partial batch is kept. ``data_dir`` overrides config.data_dir
    (None: use config.data_dir). With config.cache_dataset the decoded uint8
    images are cached, so iterating the same dataset again skips decoding.
    """
    _check_batch_size("batch_size", batch_size)
    size = config.image_size
    data_dir = config.data_dir if data_dir is None else data_dir
    ds, _, _ = sources.load_split(config.dataset, split, data_dir, download=config.download,
                                  autocache=not config.cache_dataset)
    ds = ds.map(_image_and_label, num_parallel_calls=AUTOTUNE)
    if config.cache_dataset:
        ds = ds.cache()

    def view(example):
        return {"image": augment.eval_view(example["image"], size, size),
                "label": example["label"]}

    return _finish(ds.map(view, num_parallel_calls=AUTOTUNE), batch_size, drop_remainder=False)


# ------------------------------------------------------------ supervised training


def split_labels(config, dataset, split) -> np.ndarray:
    """Labels of a whole split, in reading order, without decoding an image."""
    ds, _, _ = sources.load_split(dataset, split, config.data_dir, download=config.download,
                                  decoders=_SKIP_IMAGES, process_slice=False)
    ds = ds.map(lambda example: example["label"], num_parallel_calls=AUTOTUNE).batch(8192)
    batches = list(ds.as_numpy_iterator())
    return np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, np.int64)


def balanced_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced fraction of the labelled examples.

    Per class present, round(fraction x class count) examples (halves round up,
    at least 1), drawn without replacement with numpy's default_rng(seed), so a
    seed fixes the subset. SimCLR's ImageNet 1% / 10% subsets are fixed lists
    shipped with the paper; this draws an analogous one for any dataset.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = max(1, int(np.floor(fraction * len(members) + 0.5)))
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def labelled_examples(config, dataset, split, indices=None):
    """(this process's decoded {'image' uint8, 'label' int32}, global count, DatasetInfo).

    With ``indices`` (positions in the whole split, as ``balanced_subset``
    gives them) every process reads the split with images undecoded, keeps
    its share of the chosen positions, and decodes only those.
    """
    if indices is None:
        ds, num_examples, info = sources.load_split(dataset, split, config.data_dir,
                                                    download=config.download,
                                                    autocache=not config.cache_dataset)
        return ds.map(_image_and_label, num_parallel_calls=AUTOTUNE), num_examples, info

    ds, total, info = sources.load_split(dataset, split, config.data_dir, download=config.download,
                                         decoders=_SKIP_IMAGES, process_slice=False)
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


def supervised_dataset(config, examples, *, per_process_batch_size, seed, skip_examples=0):
    """Endless {'image': f32 [b, S, S, 3], 'label': i32 [b]} training batches
    of ``examples`` (from ``labelled_examples`` or ``partly_labelled_examples``).

    Random resized crop + horizontal flip only (the paper's linear-eval and
    fine-tuning augmentation), keyed by ``example_seeds`` as in
    ``pretrain_dataset``. Each epoch is reshuffled (a buffer beyond the data
    just holds all of it, so a small labelled subset is a full permutation),
    then the stream repeats before batching, so no example is dropped at
    epoch ends. ``skip_examples`` (this process's) resumes the same stream:
    they are skipped before any augmentation is computed.
    """
    _check_batch_size("per_process_batch_size", per_process_batch_size)
    seeds_at, size = example_seeds(seed, 2), config.image_size
    if config.cache_dataset:
        examples = examples.cache()
    ds = examples.shuffle(config.shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)

    def view(position, example):
        crop_seed, flip_seed = tf.unstack(seeds_at(position))
        image = augment.random_resized_crop(example["image"], size, size, crop_seed)
        image = augment.random_flip(image, flip_seed)
        return {"image": tf.ensure_shape(image, [size, size, 3]), "label": example["label"]}

    ds = ds.repeat().enumerate().skip(skip_examples).map(view, num_parallel_calls=AUTOTUNE)
    return _finish(ds, per_process_batch_size, drop_remainder=True)


def partly_labelled_examples(config, dataset, split, labelled=None):
    """(this process's decoded {'image', 'label'} of every example of the split,
    global count, DatasetInfo), the label kept only at the positions
    ``labelled`` (as ``balanced_subset`` gives them) and -1 elsewhere; all
    -1 when ``labelled`` is None. Distillation learns from all the images and,
    optionally, from the labels of the subset fine-tuning saw.
    """
    if labelled is None:
        ds, num_examples, info = labelled_examples(config, dataset, split)
        return ds.map(lambda example: dict(example, label=tf.constant(-1, tf.int32))), num_examples, info
    # Every process reads the whole split to know each example's position, keeps its share, decodes it.
    ds, total, info = sources.load_split(dataset, split, config.data_dir, download=config.download,
                                         decoders=_SKIP_IMAGES, process_slice=False)
    keep = np.zeros(total, bool)
    keep[np.asarray(labelled)] = True
    keep, decode = tf.constant(keep), info.features["image"].decode_example
    count, index = jax.process_count(), jax.process_index()

    def decoded(position, example):
        label = tf.where(tf.gather(keep, position), tf.cast(example["label"], tf.int32), -1)
        return {"image": decode(example["image"]), "label": label}

    ds = ds.enumerate().filter(lambda position, _: position % count == index)
    return ds.map(decoded, num_parallel_calls=AUTOTUNE), total, info
