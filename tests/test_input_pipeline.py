"""Tests for the TFDS input pipelines, on mocked CIFAR-10 plus one real-data run."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import augment, input_pipeline, sources

NUM_EXAMPLES = 10  # per mocked split


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(
        dataset="cifar10",
        data_dir=None,
        download=False,
        train_split="train",
        image_size=16,
        color_jitter_strength=0.5,
        blur=False,
        augment_on="host",
        shuffle_buffer_size=8,
        cache_dataset=True,
    ))
    config.update(overrides)
    return config


@pytest.fixture
def mock_cifar10(tmp_path):
    """Mocked cifar10 whose metadata says both splits hold NUM_EXAMPLES.

    mock_data alone leaves the builder unprepared (no metadata on disk), so
    write the real feature spec with our split sizes to a temporary folder.
    """
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    splits = [tfds.core.SplitInfo(name=name, shard_lengths=[NUM_EXAMPLES], num_bytes=0)
              for name in ("train", "test")]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, data_dir=str(tmp_path)):
        yield str(tmp_path)


def _first(ds):
    return next(iter(ds.as_numpy_iterator()))


def test_load_split_returns_process_slice(mock_cifar10):
    ds, num_examples, info = sources.load_split("cifar10", "train", mock_cifar10)
    assert num_examples == NUM_EXAMPLES
    assert info.features["label"].num_classes == 10
    assert len(list(ds)) == NUM_EXAMPLES


def test_pretrain_batch_shapes_and_ranges(mock_cifar10):
    ds = input_pipeline.pretrain_dataset(_config(), per_process_batch_size=4, seed=0)
    batches = [b for _, b in zip(range(4), ds.as_numpy_iterator())]  # > 1 epoch
    for batch in batches:
        assert batch["views"].shape == (4, 2, 16, 16, 3)
        assert batch["views"].dtype == np.float32
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["views"].min() >= 0.0 and batch["views"].max() <= 1.0
        assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
        # The two views of an image are independent augmentations.
        assert np.abs(batch["views"][:, 0] - batch["views"][:, 1]).mean() > 1e-2


@pytest.mark.parametrize("cache", [True, False])
def test_pretrain_is_deterministic_per_seed(mock_cifar10, cache):
    config = _config(cache_dataset=cache, blur=True)
    a = _first(input_pipeline.pretrain_dataset(config, per_process_batch_size=4, seed=1))
    b = _first(input_pipeline.pretrain_dataset(config, per_process_batch_size=4, seed=1))
    c = _first(input_pipeline.pretrain_dataset(config, per_process_batch_size=4, seed=2))
    np.testing.assert_array_equal(a["views"], b["views"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["views"], c["views"])


def test_eval_dataset_keeps_partial_batch(mock_cifar10):
    config = _config(image_size=24)
    batches = list(input_pipeline.eval_dataset(config, "test", batch_size=4).as_numpy_iterator())
    assert [b["image"].shape for b in batches] == [(4, 24, 24, 3)] * 2 + [(2, 24, 24, 3)]
    for batch in batches:
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    # One deterministic pass: iterating again gives the same images.
    again = list(input_pipeline.eval_dataset(config, "test", batch_size=4).as_numpy_iterator())
    np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset'"):
        sources.load_split("no_such_dataset", "train", None)


def test_unknown_version_raises():
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'cifar10:9.9.9'"):
        sources.load_split("cifar10:9.9.9", "train", None)


def test_unprepared_data_dir_raises(tmp_path):
    with pytest.raises(ValueError, match="not prepared") as error:
        input_pipeline.pretrain_dataset(_config(data_dir=str(tmp_path)),
                                        per_process_batch_size=4, seed=0)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "cannot download" in message and "TFDS_DATA_DIR" in message
    assert "config.data_dir" in message and "tfds build" in message


def test_unknown_split_raises(mock_cifar10):
    with pytest.raises(ValueError, match=r"unknown or malformed split 'validation'.*'test', 'train'"):
        input_pipeline.eval_dataset(_config(), "validation", batch_size=4)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size_raises(batch_size):
    # Config fields are checked by config_validation; batch sizes are arguments.
    with pytest.raises(ValueError, match="per_process_batch_size must be a positive int"):
        input_pipeline.pretrain_dataset(_config(), per_process_batch_size=batch_size, seed=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        input_pipeline.eval_dataset(_config(), "test", batch_size=batch_size)


@pytest.mark.slow
def test_real_cifar10_pretrain_batches(real_data_dir):
    _, num_examples, info = sources.load_split("cifar10", "train[:10%]", real_data_dir)
    assert num_examples == 5000 and info.features["image"].shape == (32, 32, 3)
    config = _config(data_dir=real_data_dir, image_size=32, shuffle_buffer_size=256,
                     cache_dataset=False)
    ds = input_pipeline.pretrain_dataset(config, per_process_batch_size=8, seed=0)
    batches = [b for _, b in zip(range(4), ds.as_numpy_iterator())]
    views = batches[0]["views"]
    assert views.shape == (8, 2, 32, 32, 3)
    assert views.min() >= 0.0 and views.max() <= 1.0
    assert np.abs(views[:, 0] - views[:, 1]).mean() > 1e-2
    means = np.stack([b["views"] for b in batches]).mean(axis=(0, 1, 2, 3, 4))
    assert means.shape == (3,)
    assert ((means > 0.3) & (means < 0.6)).all(), means
    labels = np.concatenate([b["label"] for b in batches])
    assert ((labels >= 0) & (labels < 10)).all()


def test_pretrain_encoded_path_matches_decoded_path(mock_cifar10):
    # Without the cache, images stay encoded until the views are made; the
    # stream and the augmentations are those of the decoded path. The mocked
    # images are PNGs (decoded whole), so they match bitwise; JPEG windows
    # are compared with full decodes in test_augment.
    config = _config(blur=True)
    decoded = _first(input_pipeline.pretrain_dataset(config, per_process_batch_size=8, seed=3))
    config.cache_dataset = False
    encoded = _first(input_pipeline.pretrain_dataset(config, per_process_batch_size=8, seed=3))
    np.testing.assert_array_equal(encoded["label"], decoded["label"])
    np.testing.assert_array_equal(encoded["views"], decoded["views"])


def test_pretrain_device_mode_crops_on_the_host_and_carries_keys(mock_cifar10):
    # augment_on='device': the same crops and flips as the host's views, no colour, and
    # each view's key for device_augment, from (seed, process, position, view).
    config = _config(blur=True, augment_on="device")
    batches = [b for _, b in zip(range(2), input_pipeline.pretrain_dataset(
        config, per_process_batch_size=4, seed=3).as_numpy_iterator())]
    keys = np.concatenate([b["augment_keys"] for b in batches])
    assert keys.shape == (8, 2, 2) and keys.dtype == np.uint32
    seeds_at = input_pipeline.example_seeds(3, 2)
    for position in range(8):
        for view in range(2):
            want = augment.device_key_data(seeds_at(position)[view]).numpy()
            np.testing.assert_array_equal(keys[position, view], want)
    assert not np.array_equal(keys[:, 0], keys[:, 1])
    # The crops and flips are the host's (no colour here), its views the same images.
    host = _first(input_pipeline.pretrain_dataset(_config(blur=True), per_process_batch_size=4, seed=3))
    np.testing.assert_array_equal(host["label"], batches[0]["label"])
    crops = batches[0]["views"]
    assert np.abs(crops - host["views"]).max() > 1e-2
    # A resumed stream carries the same keys and crops.
    resumed = _first(input_pipeline.pretrain_dataset(config, per_process_batch_size=4, seed=3, skip_examples=4))
    np.testing.assert_array_equal(resumed["augment_keys"], batches[1]["augment_keys"])
    np.testing.assert_array_equal(resumed["views"], batches[1]["views"])


class _CountingSource:
    """``sources.load_split`` stand-in: EPOCH examples (image i is filled with
    i), counting every example read from it."""

    EPOCH = 100

    def __init__(self):
        self.reads = 0

    def __call__(self, *args, **kwargs):
        def examples():
            for i in range(self.EPOCH):
                self.reads += 1
                yield {"image": np.full((16, 16, 3), i, np.uint8), "label": np.int32(i % 10)}

        spec = {"image": tf.TensorSpec((16, 16, 3), tf.uint8), "label": tf.TensorSpec((), tf.int32)}
        ds = tf.data.Dataset.from_generator(examples, output_signature=spec)
        return ds.apply(tf.data.experimental.assert_cardinality(self.EPOCH)), self.EPOCH, None


def _image_ids(ds, num_batches):
    """Which source image each view pair came from, and the views, of the first batches."""
    batches = [b for _, b in zip(range(num_batches), ds.as_numpy_iterator())]
    views = np.concatenate([b["views"] for b in batches])
    return np.concatenate([b["label"] for b in batches]), views


@pytest.mark.parametrize("cache", [True, False])
def test_resume_reads_only_the_current_epoch_and_matches(monkeypatch, cache):
    source = _CountingSource()
    monkeypatch.setattr(sources, "load_split", source)
    config, batch, epoch = _config(cache_dataset=cache), 10, _CountingSource.EPOCH
    skip = 35 * batch  # epoch 3.5

    # Records read before the resumed stream's first example: the half epoch
    # already consumed, the shuffle buffer and perhaps the one that refills
    # it (tf.data may read it before or after handing the example out).
    # Replaying history read 3.5 epochs.
    start = input_pipeline._stream(source()[0], epoch, config.shuffle_buffer_size, 0, skip)
    source.reads = 0
    position, _ = next(iter(start))
    assert int(position) == skip
    assert epoch // 2 + config.shuffle_buffer_size <= source.reads <= epoch // 2 + config.shuffle_buffer_size + 1

    # The resumed batches are the uninterrupted run's from there on, views included.
    labels, views = _image_ids(input_pipeline.pretrain_dataset(config, per_process_batch_size=batch, seed=4), 40)
    resumed_labels, resumed_views = _image_ids(input_pipeline.pretrain_dataset(
        config, per_process_batch_size=batch, seed=4, skip_examples=skip), 5)
    np.testing.assert_array_equal(resumed_labels, labels[skip:skip + 5 * batch])
    np.testing.assert_array_equal(resumed_views, views[skip:skip + 5 * batch])


def test_every_epoch_is_a_permutation_of_its_own(monkeypatch):
    # Each epoch holds every example once, and epochs are shuffled differently.
    source = _CountingSource()
    epoch = source.EPOCH
    stream = input_pipeline._stream(source()[0].map(lambda e: e["image"][0, 0, 0]), epoch, 8, 0, 0)
    positions, ids = zip(*[(int(p), int(i)) for p, i in stream.take(3 * epoch).as_numpy_iterator()])
    assert list(positions) == list(range(3 * epoch))
    orders = [ids[e * epoch:(e + 1) * epoch] for e in range(3)]
    assert all(sorted(order) == list(range(epoch)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3
