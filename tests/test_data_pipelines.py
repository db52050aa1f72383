"""The pipelines' shared seed scheme across processes, the supervised
pipeline, labelled subsets and label metadata."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import augment, input_pipeline, sources

SPLIT, NUM = "train[:64]", 64  # real CIFAR-10, two simulated processes of 32


def _config(data_dir, **overrides):
    config = ml_collections.ConfigDict(dict(
        dataset="cifar10", data_dir=data_dir, download=False, train_split=SPLIT, image_size=32,
        color_jitter_strength=0.5, blur=True, augment_on="host", shuffle_buffer_size=8, cache_dataset=True))
    config.update(overrides)
    return config


def _as_process(monkeypatch, index, count=2):
    """Simulates process ``index`` of ``count``: tfds.split_for_jax_process,
    the image-folder slicing and the seeds all read these two."""
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def _batches(ds, num):
    return [batch for _, batch in zip(range(num), ds.as_numpy_iterator())]


@pytest.fixture(scope="module")
def reference(real_data_dir):
    """{'image' uint8 [64, 32, 32, 3], 'label', 'id'} of the split in file order."""
    return tfds.as_numpy(tfds.load("cifar10", split=SPLIT, data_dir=real_data_dir, batch_size=-1))


@pytest.mark.slow
def test_processes_read_disjoint_slices_that_cover_the_split(real_data_dir, reference, monkeypatch):
    # Views replaced by the raw image, so every view names its source example.
    monkeypatch.setattr(augment, "train_view", lambda image, h, w, **kwargs: augment.to_float(image))
    index_of = {image.tobytes(): i for i, image in enumerate(reference["image"])}
    seen = []
    for process in range(2):
        _as_process(monkeypatch, process)
        ds = input_pipeline.pretrain_dataset(_config(real_data_dir), per_process_batch_size=8, seed=0)
        batches = _batches(ds, 16)  # 4 epochs of this process's 32 examples
        images = np.concatenate([b["views"][:, 0] for b in batches])
        positions = [index_of[np.round(image * 255).astype(np.uint8).tobytes()] for image in images]
        labels = np.concatenate([b["label"] for b in batches])
        np.testing.assert_array_equal(labels, reference["label"][positions])
        seen.append(set(positions))
    # tfds.even_splits: the first process reads the first half, the second the rest.
    assert seen == [set(range(32)), set(range(32, 64))]
    ids = [set(reference["id"][sorted(s)]) for s in seen]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == NUM


@pytest.mark.slow
def test_processes_augment_the_same_image_differently(real_data_dir, monkeypatch):
    # Both processes read the whole split in the same order: only the seeds differ.
    monkeypatch.setattr(tfds, "split_for_jax_process", lambda split: split)
    config = _config(real_data_dir)
    streams = {}
    for process in (0, 1, 0):
        _as_process(monkeypatch, process)
        ds = input_pipeline.pretrain_dataset(config, per_process_batch_size=8, seed=0)
        streams.setdefault(process, []).append(_batches(ds, 2))
    (first, again), (other,) = streams[0], streams[1]
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a["label"], c["label"])  # the same images
        np.testing.assert_array_equal(a["views"], b["views"])  # a process repeats its views
        differ = np.abs(a["views"] - c["views"]).max(axis=(1, 2, 3, 4))
        assert (differ > 0.05).all(), differ  # every image: other views on the other process


def _labelled(n=12, size=40):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    examples = tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": np.arange(n, dtype=np.int32)})  # the label names the image
    return images, examples


def _supervised(config, examples, seed=1, batches=4):
    ds = input_pipeline.supervised_dataset(config, examples, per_process_batch_size=5, seed=seed)
    return _batches(ds, batches)


def test_supervised_views_are_crop_and_flip_keyed_by_example_seeds(monkeypatch):
    images, examples = _labelled()
    config = _config(None, image_size=24, shuffle_buffer_size=100, cache_dataset=False)
    batches = _supervised(config, examples)  # 20 examples: the 12 of epoch 1, then 8
    labels = np.concatenate([b["label"] for b in batches])
    views = np.concatenate([b["image"] for b in batches])
    assert views.shape == (20, 24, 24, 3) and views.dtype == np.float32
    assert sorted(labels[:12]) == list(range(12))  # each epoch is a permutation
    assert len(set(labels[12:])) == 8 and list(labels[12:]) != list(labels[:8])  # reshuffled
    seeds_at = input_pipeline.example_seeds(1, 2)
    for position, (label, view) in enumerate(zip(labels, views)):
        crop_seed, flip_seed = seeds_at(position)
        want = augment.random_flip(augment.random_resized_crop(images[label], 24, 24, crop_seed),
                                   flip_seed)
        np.testing.assert_array_equal(view, want.numpy())
    again = _supervised(config, examples)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in again]), views)
    _as_process(monkeypatch, 1)
    other = np.concatenate([b["image"] for b in _supervised(config, examples)])
    assert not np.array_equal(other, views)


@pytest.mark.parametrize("seed,batch_size", [(True, 0), (2.0, 2.0), (None, None)])
def test_bad_seed_or_batch_size_raises(seed, batch_size):
    _, examples = _labelled()
    with pytest.raises(ValueError, match="seed must be an int"):
        input_pipeline.supervised_dataset(_config(None), examples, per_process_batch_size=5, seed=seed)
    with pytest.raises(ValueError, match="per_process_batch_size must be a positive int"):
        input_pipeline.supervised_dataset(_config(None), examples, per_process_batch_size=batch_size,
                                          seed=0)


@pytest.mark.slow
def test_labelled_subset_is_what_each_process_reads(real_data_dir, reference, monkeypatch):
    config = _config(real_data_dir)
    labels = input_pipeline.split_labels(config, "cifar10", SPLIT)
    np.testing.assert_array_equal(labels, reference["label"])
    indices = input_pipeline.balanced_subset(labels, 0.25, seed=0)
    assert (np.bincount(labels[indices]) == np.floor(0.25 * np.bincount(labels) + 0.5)).all()
    shares = []
    for process in range(2):
        _as_process(monkeypatch, process)
        examples, count, _ = input_pipeline.labelled_examples(config, "cifar10", SPLIT, indices)
        fed = list(examples.as_numpy_iterator())
        assert count == len(indices)
        shares.append(fed)
    by_image = {image.tobytes(): i for i, image in enumerate(reference["image"])}
    read = [[by_image[e["image"].tobytes()] for e in share] for share in shares]
    assert read == [list(indices[0::2]), list(indices[1::2])]  # disjoint, together the subset
    for share, positions in zip(shares, read):
        np.testing.assert_array_equal([e["label"] for e in share], labels[positions])


def test_label_metadata_of_a_folder_and_of_unlabelled_images(tmp_path):
    for split, name in (("train", "cat"), ("train", "dog"), ("test", "cat")):
        os.makedirs(tmp_path / "labelled" / split / name)
        tf.io.write_file(str(tmp_path / "labelled" / split / name / "a.png"),
                         tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)))
    folder = f"folder:{tmp_path / 'labelled'}"
    assert sources.num_classes(folder, "train", None) == 2
    assert sources.class_names(folder, "train", None) == ["cat", "dog"]
    images = f"images:{tmp_path / 'labelled'}"
    assert sources.class_names(images, "train", None) == []
    with pytest.raises(ValueError, match=r"dataset 'images:.*' has no 'label' class feature"):
        sources.num_classes(images, "train", None)
