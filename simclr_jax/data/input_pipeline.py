"""TFDS -> tf.data pipelines that yield per-process batches of numpy-ready dicts.

Each process reads its own slice of a split (``tfds.split_for_jax_process``);
the caller turns a per-process batch into a global jax.Array. All randomness
is keyed by the ``seed`` argument, so with ``config.deterministic_input``
(default True) the same seed yields the same stream of batches.
"""
import dataclasses
import os
from concurrent import futures

import jax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from simclr_jax.data import augment

AUTOTUNE = tf.data.AUTOTUNE
FOLDER_PREFIX = "folder:"  # config.dataset = 'folder:ROOT' reads a labelled image folder
IMAGES_PREFIX = "images:"  # config.dataset = 'images:ROOT' reads every image under ROOT, unlabelled


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
    split on every process. ``dataset='folder:ROOT'`` reads a labelled image
    folder (see ``load_folder_split``), ``dataset='images:ROOT'`` every image
    under ROOT without labels (see ``load_image_files``; ``split`` is ignored).
    """
    if dataset.startswith(IMAGES_PREFIX):
        return load_image_files(dataset[len(IMAGES_PREFIX):], shuffle_files=shuffle_files, seed=seed,
                                decoders=decoders, process_slice=process_slice)
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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # any case
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG")  # JPEG, PNG
_CHECKED = {}  # (root, listing) -> (paths, skipped) of the last few folders checked


@dataclasses.dataclass(frozen=True)
class UnlabelledInfo:
    """What ``load_image_files`` returns in place of a TFDS DatasetInfo.

    ``features`` has no 'label', so ``evaluate.label_classes`` is 0 and the
    online probe and kNN monitor stay off. ``skipped`` lists the files with
    an image extension that were not a readable JPEG or PNG.
    """
    root: str
    num_examples: int
    skipped: tuple = ()
    features: dict = dataclasses.field(default_factory=dict)


def _file_head(path):
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read(len(_SIGNATURES[0]) + 1)
    except (OSError, tf.errors.OpError):
        return b""  # unreadable: skipped like a corrupt file


def list_image_files(root):
    """(sorted image paths under ``root`` at any depth, sorted skipped paths).

    A path is kept when its extension is in IMAGE_EXTENSIONS and its first
    bytes are a JPEG or PNG signature; those that are not (corrupt,
    unreadable, mis-named) are skipped with one warning; the check is
    remembered for an unchanged listing. Raises ValueError for a missing
    folder or one holding no images.
    """
    root = os.path.expanduser(root)
    if not tf.io.gfile.isdir(root):  # gfile: gs:// roots work too
        raise ValueError(f"image folder {root!r} (config.dataset='{IMAGES_PREFIX}{root}') does not exist")
    candidates = sorted(
        os.path.join(folder, name)
        for folder, _, names in tf.io.gfile.walk(root)
        for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    key = (root, len(candidates), hash(tuple(candidates)))
    if key not in _CHECKED:  # training lists the folder twice: check and warn once
        with futures.ThreadPoolExecutor(32) as pool:  # many small reads: threads help on remote storage
            heads = list(pool.map(_file_head, candidates))
        paths = [p for p, head in zip(candidates, heads) if head.startswith(_SIGNATURES)]
        skipped = [p for p, head in zip(candidates, heads) if not head.startswith(_SIGNATURES)]
        if skipped:
            logging.warning("Skipping %d of %d image files under %s that are not readable JPEG or PNG "
                            "files, e.g. %s", len(skipped), len(candidates), root, skipped[:3])
        if len(_CHECKED) >= 4:
            _CHECKED.clear()
        _CHECKED[key] = (paths, skipped)
    paths, skipped = _CHECKED[key]
    if not paths:
        raise ValueError(
            f"no images in {root!r} (config.dataset='{IMAGES_PREFIX}{root}'): looked for "
            f"{'/'.join(IMAGE_EXTENSIONS)} files (any case) at any depth and found "
            f"{len(candidates)} with those extensions, {len(skipped)} of them not JPEG or PNG")
    return paths, skipped


def load_image_files(root, *, shuffle_files=False, seed=None, decoders=None, process_slice=True):
    """``load_split`` for every JPEG/PNG under ``root``, at any depth, without labels.

    Yields {'image': uint8 [H, W, 3], 'label': int32 -1}: grayscale is
    replicated to 3 channels, an alpha channel dropped, any size. The files
    are sorted and a process takes every process_count-th one; with
    ``shuffle_files`` their order is reshuffled each pass, following
    ``seed``. Files that fail the signature check are skipped up front (see
    ``list_image_files``); files that pass it but still fail to decode
    (truncated) are dropped by ``ignore_errors`` and TF logs each. With
    ``decoders={'image': tfds.decode.SkipDecoding()}`` images stay encoded,
    and the caller decodes them and should ``ignore_errors`` after that.
    Returns (dataset, number of listed images, UnlabelledInfo).
    """
    root = os.path.expanduser(root)
    paths, skipped = list_image_files(root)
    info = UnlabelledInfo(root=root, num_examples=len(paths), skipped=tuple(skipped))
    mine = paths[jax.process_index()::jax.process_count()] if process_slice else paths
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(mine, tf.string))
    if shuffle_files:
        ds = ds.shuffle(max(len(mine), 1), seed=seed, reshuffle_each_iteration=True)
    skip_decoding = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)

    def example(path):
        image = tf.io.read_file(path)
        if not skip_decoding:
            image = tf.io.decode_image(image, channels=3, expand_animations=False)
            image = tf.ensure_shape(image, [None, None, 3])
        return {"image": image, "label": tf.constant(-1, tf.int32)}

    ds = ds.map(example, num_parallel_calls=AUTOTUNE)
    if not skip_decoding:
        ds = ds.ignore_errors(log_warning=True)
    return ds, len(paths), info


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
    if config.dataset.startswith(IMAGES_PREFIX) and not config.cache_dataset:
        # A file of an image folder can pass the signature check and still fail
        # to decode (truncated): drop it, as load_image_files does when decoding.
        # (Resume then repeats as many examples as were dropped before it.)
        ds = ds.ignore_errors(log_warning=True)
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
