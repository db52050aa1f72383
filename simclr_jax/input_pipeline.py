"""TFDS -> tf.data pipelines that yield per-process batches of numpy-ready dicts.

Each process reads its own slice of a split (``tfds.split_for_jax_process``);
the caller turns a per-process batch into a global jax.Array. All randomness
is keyed by the ``seed`` argument, so with ``config.deterministic_input``
(default True) the same seed yields the same stream of batches.
"""
import os

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import augment

AUTOTUNE = tf.data.AUTOTUNE
FOLDER_PREFIX = "folder:"  # config.dataset = 'folder:ROOT' reads an image folder


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _not_prepared_message(dataset, builder, data_dir):
    where = data_dir if data_dir is not None else (
        f"{builder.data_dir_root} (TFDS default; data_dir was None)")
    return (
        f"TFDS dataset {dataset!r} is not prepared under data_dir {where} "
        f"(looked for {builder.data_dir}). TFDS cannot download here. Run "
        f"`tfds build {dataset}` (or tfds.load({dataset!r}, download=True)) on a "
        "machine with internet access and copy the result, then set "
        "config.data_dir or the TFDS_DATA_DIR environment variable to the "
        "folder holding the prepared dataset.")


def load_split(dataset, split, data_dir, *, shuffle_files=False, seed=None,
               autocache=True, decoders=None, process_slice=True):
    """Opens this process's slice of a TFDS split.

    Returns (dataset of decoded examples, examples in the whole split, DatasetInfo).
    Bad names, unprepared data and unknown splits each raise one ValueError
    before any data is read. ``data_dir=None`` lets TFDS resolve the folder
    (it honours TFDS_DATA_DIR). ``autocache=False`` is for callers that cache
    themselves, so the data is not held twice. ``decoders`` go to TFDS (e.g.
    SkipDecoding to read labels only); ``process_slice=False`` opens the whole
    split on every process. ``dataset='folder:ROOT'`` reads an image folder
    (see ``load_folder_split``).
    """
    if dataset.startswith(FOLDER_PREFIX):
        return load_folder_split(dataset[len(FOLDER_PREFIX):], split, decoders=decoders,
                                 process_slice=process_slice)
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown TFDS dataset {dataset!r}") from None
    except (AssertionError, ValueError) as e:  # e.g. a bad version or config
        raise ValueError(f"cannot open TFDS dataset {dataset!r}: {e}") from None
    if not builder.is_prepared():
        raise ValueError(_not_prepared_message(dataset, builder, data_dir))
    splits = builder.info.splits
    try:
        splits[split]
    except (KeyError, ValueError):
        raise ValueError(
            f"unknown or malformed split {split!r} for TFDS dataset {dataset!r}; available "
            f"splits: {sorted(splits.keys())} (slices like 'train[:10%]' work)"
        ) from None
    num_examples = splits[split].num_examples
    process_split = tfds.split_for_jax_process(split) if process_slice else split
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=autocache)
    ds = builder.as_dataset(split=process_split, shuffle_files=shuffle_files,
                            read_config=read_config, decoders=decoders)
    return ds, num_examples, builder.info


# ------------------------------------------------------------ image folders


def load_folder_split(root, split, *, decoders=None, process_slice=True):
    """``load_split`` for ``root/<split>/<class_name>/*.jpg|jpeg|png``.

    TFDS's ImageFolder lists the files (labels are the sorted class folder
    names over all splits, so train and test agree) and decodes every image
    to 3 channels: grayscale is replicated, an alpha channel dropped. It
    knows whole splits only, so a process takes every process_count-th file.
    Its file order is a fixed shuffle; ``shuffle_files`` is not needed since
    the training pipelines shuffle themselves.
    """
    root = os.path.expanduser(root)
    if not tf.io.gfile.isdir(root):  # gfile: gs:// roots work too
        raise ValueError(
            f"image folder {root!r} (config.dataset='folder:{root}') does not exist; expected "
            "ROOT/<split>/<class_name>/*.jpg|png, e.g. ROOT/train/cat/001.jpg")
    builder = tfds.ImageFolder(root)
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise ValueError(
            f"unknown split {split!r} for image folder {root!r}: its splits (sub-folders holding "
            f"class folders of .jpg/.png files) are {splits}; slices like 'train[:10%]' are not "
            "supported for folders")
    ds = builder.as_dataset(split=split, decoders=decoders)
    num_examples = builder.info.splits[split].num_examples
    if process_slice and jax.process_count() > 1:
        ds = ds.shard(jax.process_count(), jax.process_index())
    return ds, num_examples, builder.info


def image_and_label(example):
    # Drop everything else (e.g. the 'id' string) before caching.
    return {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}


def _options(deterministic):
    """tf.data options for every pipeline here.

    One thread per op: parallelism comes from mapping many examples at once,
    and splitting small image ops across threads costs more than it saves
    (benchmarks/input_pipeline.py, all cores, 32 px: ~13% more views/s).
    """
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    options.threading.max_intra_op_parallelism = 1
    return options


def pretrain_dataset(config, *, per_process_batch_size, seed, skip_examples=0):
    """Endless batches {'views': f32 [B, 2, S, S, 3], 'label': i32 [B]}.

    Pipeline: decode -> (cache uint8) -> repeat -> shuffle -> two views per
    image -> batch -> prefetch. View seeds are folded from (seed, process
    index, position in the shuffled stream), so the augmentations follow the
    seed and differ between processes.

    Without ``config.cache_dataset`` (ImageNet) images stay encoded until the
    views are made: the shuffle buffer holds compressed bytes rather than
    decoded images (10,000 ImageNet images: ~1 GB instead of ~5 GB), and a
    JPEG is decoded once per example, only within its two crop boxes
    (``augment.train_views_from_encoded``; same boxes and augmentations).
    """
    size = config.image_size
    _check_positive_int("config.image_size", size)
    _check_positive_int("per_process_batch_size", per_process_batch_size)
    _check_positive_int("config.shuffle_buffer_size", config.shuffle_buffer_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    strength = config.color_jitter_strength
    blur = config.blur
    if strength < 0:
        raise ValueError(f"config.color_jitter_strength must be >= 0, got {strength!r}")

    # Decode before caching; otherwise leave images encoded (see above).
    decoders = None if config.cache_dataset else {"image": tfds.decode.SkipDecoding()}
    ds, _, _ = load_split(config.dataset, config.train_split, config.data_dir,
                          shuffle_files=True, seed=seed,
                          autocache=not config.cache_dataset, decoders=decoders)
    ds = ds.map(image_and_label, num_parallel_calls=AUTOTUNE)
    if config.cache_dataset:
        ds = ds.cache()
    ds = ds.repeat()
    ds = ds.shuffle(config.shuffle_buffer_size, seed=seed)
    base_seed = tf.constant([seed, jax.process_index()], tf.int64)

    def two_views(index, example):
        example_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        seeds = tf.random.experimental.stateless_split(example_seed, num=2)
        image = example["image"]
        if image.dtype == tf.string:  # encoded (SkipDecoding)
            views = augment.train_views_from_encoded(
                image, size, size, seeds=[seeds[0], seeds[1]],
                color_jitter_strength=strength, blur=blur)
        else:
            views = [
                augment.train_view(image, size, size, seed=seeds[i],
                                   color_jitter_strength=strength, blur=blur)
                for i in range(2)
            ]
        return {"views": tf.stack(views), "label": example["label"]}

    # Resuming at step s skips this process's first s*b examples of the same
    # stream (before augmenting them), so a resumed run sees exactly the
    # batches and views an uninterrupted one would.
    ds = ds.enumerate().skip(skip_examples).map(two_views, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    ds = ds.with_options(_options(config.get("deterministic_input", True)))
    return ds.prefetch(AUTOTUNE)


def eval_dataset(config, split, *, batch_size, data_dir=None):
    """One ordered pass {'image': f32 [B, S, S, 3], 'label': i32 [B]}.

    The final partial batch is kept. ``data_dir`` overrides config.data_dir
    (None: use config.data_dir). With config.cache_dataset the decoded uint8
    images are cached, so iterating the same dataset again skips decoding.
    """
    size = config.image_size
    _check_positive_int("config.image_size", size)
    _check_positive_int("batch_size", batch_size)
    data_dir = config.data_dir if data_dir is None else data_dir
    ds, _, _ = load_split(config.dataset, split, data_dir,
                          autocache=not config.cache_dataset)
    ds = ds.map(image_and_label, num_parallel_calls=AUTOTUNE)
    if config.cache_dataset:
        ds = ds.cache()

    def view(example):
        return {"image": augment.eval_view(example["image"], size, size),
                "label": example["label"]}

    ds = ds.map(view, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.with_options(_options(True))
    return ds.prefetch(AUTOTUNE)
