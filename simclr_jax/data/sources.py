"""Where examples come from: TFDS splits (downloaded on request), labelled
image folders, unlabelled image files, and their label metadata.

Everything here opens a source and returns (tf.data of decoded examples,
examples in the whole split, info); the pipelines in ``input_pipeline``
batch and augment them. Each process reads its own slice of a split unless
told otherwise.
"""
import dataclasses
import os
from concurrent import futures

import jax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from simclr_jax.data import preparation
from simclr_jax.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE
FOLDER_PREFIX = "folder:"  # config.dataset = 'folder:ROOT' reads a labelled image folder
IMAGES_PREFIX = "images:"  # config.dataset = 'images:ROOT' reads every image under ROOT, unlabelled


def load_split(dataset, split, data_dir, *, download=False, shuffle_files=False, seed=None,
               autocache=True, decoders=None, process_slice=True):
    """Opens this process's slice of a TFDS split.

    Returns (dataset of decoded examples, examples in the whole split, DatasetInfo).
    Bad names, unprepared data and unknown splits each raise one ValueError
    before any data is read. ``data_dir=None`` lets TFDS resolve the folder
    (it honours TFDS_DATA_DIR). An unprepared dataset is downloaded and
    prepared there if ``download`` (``config.download``), else the error says
    how to prepare it elsewhere (see ``preparation.prepare``). ``autocache=False``
    is for callers that cache themselves, so the data is not held twice.
    ``decoders`` go to TFDS (e.g. SkipDecoding to read labels only);
    ``process_slice=False`` opens the whole split on every process.
    ``dataset='folder:ROOT'`` reads a labelled image folder (see
    ``load_folder_split``), ``dataset='images:ROOT'`` every image under ROOT
    without labels (see ``load_image_files``; ``split`` is ignored).
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
        raise DataError(f"unknown TFDS dataset {dataset!r}") from None
    except (AssertionError, ValueError) as e:  # e.g. a bad version or config
        raise DataError(f"cannot open TFDS dataset {dataset!r}: {e}") from None
    if not builder.is_prepared():
        preparation.prepare(builder, dataset, data_dir, download=download)
    splits = builder.info.splits
    try:
        splits[split]
    except (KeyError, ValueError):
        raise DataError(
            f"unknown or malformed split {split!r} for TFDS dataset {dataset!r}; available "
            f"splits: {sorted(splits.keys())} (slices like 'train[:10%]' work)"
        ) from None
    num_examples = splits[split].num_examples
    process_split = tfds.split_for_jax_process(split) if process_slice else split
    # A shuffled file order is one fixed order per seed, the same on every
    # pass: pretraining shuffles each epoch itself, keyed by the epoch, so a
    # resume can open any epoch directly (input_pipeline._stream).
    read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
                                  try_autocache=autocache)
    ds = builder.as_dataset(split=process_split, shuffle_files=shuffle_files,
                            read_config=read_config, decoders=decoders)
    return ds, num_examples, builder.info


def prepared_split_size(dataset, split, data_dir) -> int | None:
    """Examples in a TFDS split already prepared on disk, else None; reads
    metadata only and never downloads (for estimates made before a run)."""
    if dataset.startswith((IMAGES_PREFIX, FOLDER_PREFIX)):
        return None
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
        return builder.info.splits[split].num_examples if builder.is_prepared() else None
    except Exception:  # an unknown name or split: the run itself says so, in its own words
        return None


# ------------------------------------------------------------ label metadata


def label_classes(info) -> int:
    """Number of classes of a dataset's 'label' feature; 0 if it has none."""
    label = info.features["label"] if "label" in info.features else None
    return int(getattr(label, "num_classes", 0) or 0)


def num_classes(dataset, split, data_dir, *, download=False) -> int:
    """Classes of ``dataset``'s labels; a ValueError naming it if it has none
    (an unlabelled 'images:ROOT' folder), so a supervised protocol stops
    before loading a model."""
    _, _, info = load_split(dataset, split, data_dir, download=download)
    classes = label_classes(info)
    if not classes:
        raise DataError(
            f"dataset {dataset!r} has no 'label' class feature, which evaluation and supervised "
            "training need; choose a labelled dataset (a TFDS dataset or folder:ROOT with "
            "ROOT/<split>/<class_name>/ images).")
    return classes


def class_names(dataset, split, data_dir, *, download=False) -> list:
    """The dataset's class names (TFDS ``info.features['label'].names``), or []."""
    _, _, info = load_split(dataset, split, data_dir, download=download)
    label = info.features["label"] if "label" in info.features else None
    return list(getattr(label, "names", None) or [])


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
        raise DataError(
            f"image folder {root!r} (config.dataset='folder:{root}') does not exist; expected "
            "ROOT/<split>/<class_name>/*.jpg|png, e.g. ROOT/train/cat/001.jpg")
    builder = tfds.ImageFolder(root)
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise DataError(
            f"unknown split {split!r} for image folder {root!r}: its splits (sub-folders holding "
            f"class folders of .jpg/.png files) are {splits}; slices like 'train[:10%]' are not "
            "supported for folders")
    _check_classes(root, builder.info.features["label"].names, splits)
    num_examples = builder.info.splits[split].num_examples
    candidates = sorted(path for path in tf.io.gfile.glob(os.path.join(root, split, "*", "*"))
                        if path.lower().endswith(IMAGE_EXTENSIONS))
    skipped = _unreadable(os.path.join(root, split), candidates)
    if not skipped:
        ds = builder.as_dataset(split=split, decoders=decoders)
    else:  # read them encoded, drop the unreadable files by name, then decode as asked
        ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        skipped_names = tf.constant(skipped)
        ds = ds.filter(lambda example: tf.reduce_all(example["image/filename"] != skipped_names))
        if not isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding):
            decode = builder.info.features["image"].decode_example
            ds = ds.map(lambda example: {**example, "image": decode(example["image"])}, num_parallel_calls=AUTOTUNE)
        num_examples -= len(skipped)
    if process_slice and jax.process_count() > 1:
        ds = ds.shard(jax.process_count(), jax.process_index())
    return ds, num_examples, builder.info


def _check_classes(root, names, splits) -> None:
    """A labelled folder needs two classes or more, each with training images:
    with one class every prediction is right, and a class the train split
    lacks can never be predicted."""
    if len(names) < 2:
        raise DataError(
            f"image folder {root!r} has {len(names)} class ({', '.join(names)}): a labelled folder needs two or "
            f"more class folders; to pretrain on its images without labels use config.dataset='{IMAGES_PREFIX}{root}'")
    if "train" in splits:
        train = os.path.join(root, "train")
        holding = set()
        for name in (entry.rstrip("/") for entry in tf.io.gfile.listdir(train)):
            folder = os.path.join(train, name)
            if tf.io.gfile.isdir(folder) and any(f.lower().endswith(IMAGE_EXTENSIONS)
                                                 for f in tf.io.gfile.listdir(folder)):
                holding.add(name)
        if missing := sorted(set(names) - holding):
            raise DataError(f"image folder {root!r}: class(es) {missing} have no images under {train}; every class "
                            "needs training images (add some, or remove the class folder from every split)")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # any case
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG")  # JPEG, PNG
_CHECKED = {}  # (root, listing) -> unreadable paths, for the last few listings checked


@dataclasses.dataclass(frozen=True)
class UnlabelledInfo:
    """What ``load_image_files`` returns in place of a TFDS DatasetInfo.

    ``features`` has no 'label', so ``label_classes`` is 0 and the online
    probe and kNN monitor stay off. ``skipped`` lists the files with an
    image extension that were not a readable JPEG or PNG.
    """
    root: str
    num_examples: int
    skipped: tuple = ()
    features: dict = dataclasses.field(default_factory=dict)


def _readable(path) -> bool:
    """Whether ``path`` looks like a whole JPEG or PNG: its signature first,
    and its end marker (JPEG's EOI, PNG's IEND) in its last KB, so an empty,
    truncated or mis-named file is caught before a pipeline trips on it."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(len(_SIGNATURES[0]) + 1)
            f.seek(max(0, f.size() - 1024))
            tail = f.read()
    except (OSError, tf.errors.OpError):
        return False
    if head.startswith(_SIGNATURES[0]):
        return b"\xff\xd9" in tail
    return head.startswith(_SIGNATURES[1]) and b"IEND" in tail


def _unreadable(root, candidates) -> list:
    """The paths of ``candidates`` that are not whole JPEG/PNG files, warned
    about once per unchanged listing (training lists a folder more than once)."""
    key = (root, len(candidates), hash(tuple(candidates)))
    if key not in _CHECKED:
        with futures.ThreadPoolExecutor(32) as pool:  # many small reads: threads help on remote storage
            readable = list(pool.map(_readable, candidates))
        bad = [p for p, ok in zip(candidates, readable) if not ok]
        if bad:
            logging.warning("Skipping %d of %d image files under %s that are not whole JPEG or PNG files (empty, "
                            "truncated or mis-named): %s%s", len(bad), len(candidates), root, ", ".join(bad[:20]),
                            f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        if len(_CHECKED) >= 8:
            _CHECKED.clear()
        _CHECKED[key] = bad
    return _CHECKED[key]


def list_image_files(root):
    """(sorted image paths under ``root`` at any depth, sorted skipped paths).

    A path is kept when its extension is in IMAGE_EXTENSIONS and it is a
    whole JPEG or PNG (``_readable``); those that are not (empty, truncated,
    unreadable, mis-named) are skipped with one warning naming them, as
    ``folder:`` datasets skip theirs; the check is remembered for an
    unchanged listing. Raises ValueError for a missing
    folder or one holding no images.
    """
    root = os.path.expanduser(root)
    if not tf.io.gfile.isdir(root):  # gfile: gs:// roots work too
        raise DataError(f"image folder {root!r} (config.dataset='{IMAGES_PREFIX}{root}') does not exist")
    candidates = sorted(
        os.path.join(folder, name)
        for folder, _, names in tf.io.gfile.walk(root)
        for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    skipped = _unreadable(root, candidates)
    paths = sorted(set(candidates) - set(skipped))
    if not paths:
        raise DataError(
            f"no images in {root!r} (config.dataset='{IMAGES_PREFIX}{root}'): looked for "
            f"{'/'.join(IMAGE_EXTENSIONS)} files (any case) at any depth and found "
            f"{len(candidates)} with those extensions, {len(skipped)} of them not JPEG or PNG")
    return paths, skipped


def load_image_files(root, *, shuffle_files=False, seed=None, decoders=None, process_slice=True):
    """``load_split`` for every JPEG/PNG under ``root``, at any depth, without labels.

    Yields {'image': uint8 [H, W, 3], 'label': int32 -1}: grayscale is
    replicated to 3 channels, an alpha channel dropped, any size. The files
    are sorted and a process takes every process_count-th one; with
    ``shuffle_files`` their order is one shuffle following ``seed``, the
    same every pass (as ``load_split``'s). Files that fail the signature check are skipped up front (see
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
        ds = ds.shuffle(max(len(mine), 1), seed=seed, reshuffle_each_iteration=False)
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
