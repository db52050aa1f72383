"""Pretraining on a folder of the user's own images ('images:ROOT'): listing,
decoding, bad files skipped, clear errors, and end to end with kNN on a
labelled 'folder:ROOT'."""
import logging
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import writers
from simclr_jax.data import input_pipeline, sources

# name -> (height, width, channels); every size differs, so a decoded image is known by its shape.
GOOD = {
    "a/photo.jpg": (37, 53, 3),
    "a/b/c/deep.PNG": (100, 64, 3),
    "gray.png": (30, 20, 1),
    "x/rgba.png": (25, 33, 4),
    "x/upper.JPEG": (41, 19, 3),
    "x/png_named.jpg": (18, 22, 3),  # a PNG with a .jpg name: its bytes decide
}
TRUNCATED = "x/truncated.jpg"  # a JPEG cut in half: the right signature, no end marker
CORRUPT = "corrupt.jpg"  # random bytes


def _encode(path, image):
    is_jpeg = path.lower().endswith((".jpg", ".jpeg")) and "png_named" not in path
    return (tf.io.encode_jpeg(image, quality=95) if is_jpeg else tf.io.encode_png(image)).numpy()


def _write(root, name, data):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def photo_folder(tmp_path):
    """A nested unlabelled folder: GOOD images, a truncated and a corrupt JPEG, a text file."""
    root = str(tmp_path / "photos")
    rng = np.random.default_rng(0)
    originals = {}
    for name, shape in GOOD.items():
        coarse = rng.integers(0, 256, (4, 4, shape[2])).astype(np.float32)
        image = tf.image.resize(coarse, shape[:2]).numpy().round().astype(np.uint8)  # smooth, JPEG-friendly
        _write(root, name, _encode(name, image))
        originals[shape[:2]] = (name, image)
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).numpy()
    _write(root, TRUNCATED, jpeg[:len(jpeg) // 2])
    _write(root, CORRUPT, b"\x00" + rng.bytes(500))
    _write(root, "notes.txt", b"not an image")
    return root, originals


def _images(ds):
    return [example["image"] for example in ds.as_numpy_iterator()]


def test_loader_yields_exactly_the_good_images_in_three_channels(photo_folder, caplog):
    root, originals = photo_folder
    with caplog.at_level(logging.WARNING):
        ds, num_examples, info = sources.load_split(f"images:{root}", "ignored", None)
    warnings = [r.getMessage() for r in caplog.records if "not whole JPEG or PNG" in r.getMessage()]
    assert len(warnings) == 1 and "Skipping 2 of 8 image files" in warnings[0], warnings
    assert CORRUPT in warnings[0] and TRUNCATED in warnings[0]
    assert info.skipped == (os.path.join(root, CORRUPT), os.path.join(root, TRUNCATED))
    assert num_examples == len(GOOD)
    assert sources.label_classes(info) == 0  # no probe, no kNN monitor

    examples = list(ds.as_numpy_iterator())
    assert sorted(e["image"].shape[:2] for e in examples) == sorted(originals)
    for example in examples:
        image = example["image"]
        name, original = originals[image.shape[:2]]
        assert image.dtype == np.uint8 and image.shape[-1] == 3 and example["label"] == -1
        if name.lower().endswith(".png") or "png_named" in name:  # lossless
            want = np.repeat(original, 3, -1) if original.shape[-1] == 1 else original[..., :3]
            np.testing.assert_array_equal(image, want)
        else:
            assert np.abs(image.astype(int) - original).mean() < 5  # JPEG: close, not exact

    # Listing again (as training does) neither re-checks nor warns again; the order is fixed.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again, _, _ = sources.load_split(f"images:{root}", "train", None)
    assert not [r for r in caplog.records if "not whole" in r.getMessage()]
    assert [i.shape for i in _images(again)] == [e["image"].shape for e in examples]


def test_each_process_reads_every_process_count_th_file(photo_folder, monkeypatch):
    root, originals = photo_folder
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    shapes = []
    for index in range(2):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        ds, num_examples, _ = sources.load_split(f"images:{root}", "train", None)
        assert num_examples == len(GOOD)  # the whole folder
        shapes.append({image.shape[:2] for image in _images(ds)})
    assert not shapes[0] & shapes[1] and shapes[0] | shapes[1] == set(originals)


def _pipeline_config(root, cache):
    return ml_collections.ConfigDict(dict(
        dataset=f"images:{root}", data_dir=None, train_split="train", image_size=16,
        download=False, color_jitter_strength=0.5, blur=True, augment_on="host", shuffle_buffer_size=8,
        cache_dataset=cache))


@pytest.mark.parametrize("cache", [True, False])
def test_pretrain_and_eval_pipelines_skip_the_truncated_file(photo_folder, cache):
    """Decoded and cached, or kept encoded until the views are made (cache_dataset=False)."""
    root, _ = photo_folder
    config = _pipeline_config(root, cache)
    ds = input_pipeline.pretrain_dataset(config, per_process_batch_size=4, seed=1)
    batches = [b for _, b in zip(range(5), ds.as_numpy_iterator())]  # 20 views of 6 images: > 3 epochs
    for batch in batches:
        assert batch["views"].shape == (4, 2, 16, 16, 3) and batch["views"].dtype == np.float32
        assert 0.0 <= batch["views"].min() and batch["views"].max() <= 1.0
        assert (batch["label"] == -1).all()
    again = next(input_pipeline.pretrain_dataset(config, per_process_batch_size=4, seed=1).as_numpy_iterator())
    np.testing.assert_array_equal(again["views"], batches[0]["views"])

    views = np.concatenate([b["image"] for b in input_pipeline.eval_dataset(config, "test", batch_size=4)
                            .as_numpy_iterator()])
    assert views.shape == (len(GOOD), 16, 16, 3)


def test_a_labelled_folder_skips_unreadable_files_as_an_unlabelled_one_does(tmp_path, caplog):
    rng = np.random.default_rng(1)
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).numpy()
    for split in ("train", "test"):
        for label in ("a", "b"):
            for i in range(3):
                _write(str(tmp_path), f"{split}/{label}/{i}.jpg", jpeg)
    _write(str(tmp_path), "train/a/truncated.jpg", jpeg[:len(jpeg) // 2])
    _write(str(tmp_path), "train/b/empty.png", b"")
    with caplog.at_level(logging.WARNING):
        for decoded in (True, False):  # decoded here, or left encoded for the pipeline
            decoders = None if decoded else {"image": tfds.decode.SkipDecoding()}
            ds, num_examples, _ = sources.load_split(f"folder:{tmp_path}", "train", None, decoders=decoders)
            examples = list(ds.as_numpy_iterator())
            assert num_examples == len(examples) == 6 and sorted(e["label"] for e in examples) == [0, 0, 0, 1, 1, 1]
            if decoded:
                assert all(e["image"].shape == (12, 12, 3) for e in examples)
    warnings = [r.getMessage() for r in caplog.records if "not whole JPEG or PNG" in r.getMessage()]
    assert len(warnings) == 1 and "Skipping 2 of 8 image files" in warnings[0]
    assert "train/a/truncated.jpg" in warnings[0] and "train/b/empty.png" in warnings[0]


def test_a_labelled_folder_needs_two_classes_each_with_training_images(tmp_path):
    from simclr_jax.errors import DataError

    png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
    for split in ("train", "test"):
        _write(str(tmp_path / "one"), f"{split}/only/0.png", png)
        _write(str(tmp_path / "gap"), f"{split}/a/0.png", png)
    _write(str(tmp_path / "gap"), "test/b/0.png", png)  # b: test images only
    with pytest.raises(DataError, match=r"has 1 class \(only\): a labelled folder needs two or more"):
        sources.load_split(f"folder:{tmp_path / 'one'}", "test", None)
    with pytest.raises(DataError, match=r"class\(es\) \['b'\] have no images under .*gap/train"):
        sources.load_split(f"folder:{tmp_path / 'gap'}", "test", None)


def test_empty_or_imageless_or_missing_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no images in .*empty.*looked for \.jpg/\.jpeg/\.png files"):
        sources.load_split(f"images:{empty}", "train", None)
    text_only = str(tmp_path / "text")
    _write(text_only, "sub/notes.txt", b"hello")
    with pytest.raises(ValueError, match=r"no images in .*text.*found 0 with those extensions"):
        sources.load_split(f"images:{text_only}", "train", None)
    corrupt_only = str(tmp_path / "corrupt")
    _write(corrupt_only, "bad.jpg", b"GIF89a not really")
    with pytest.raises(ValueError, match=r"found 1 with those extensions, 1 of them not JPEG or PNG"):
        sources.load_split(f"images:{corrupt_only}", "train", None)
    with pytest.raises(ValueError, match=r"image folder .*nowhere.* does not exist"):
        sources.load_split(f"images:{tmp_path}/nowhere", "train", None)


def test_evaluating_on_unlabelled_images_asks_for_labels(photo_folder, tmp_path):
    from configs import knn as knn_config
    from configs import smoke
    from simclr_jax.weights import checkpoint
    from simclr_jax import protocols

    root, _ = photo_folder
    workdir = str(tmp_path / "pretrain")
    checkpoint.write_run_config(workdir, smoke.get_config())  # the architecture: random init needs no more
    config = knn_config.get_config()
    config.pretrained, config.random_init = workdir, True
    config.dataset = f"images:{root}"
    config.eval_batch_size = 16
    with pytest.raises(ValueError, match="has no 'label' class feature"):
        protocols.run(config, str(tmp_path / "eval"))


# --------------------------------------------------------------------------- end to end

CLASSES = (0, 1, 2)  # CIFAR-10 airplane, automobile, bird


def _real_images(data_dir, n):
    ds = tfds.load("cifar10", split=f"train[:{n}]", data_dir=data_dir)
    return [(e["image"], int(e["label"])) for e in ds.as_numpy_iterator()]


@pytest.mark.slow
def test_pretrain_on_own_images_then_knn_on_a_labelled_folder(real_data_dir, tmp_path):
    from configs import knn as knn_config
    from simclr_jax import encoder, protocols
    from simclr_jax.evaluation import knn
    from tests.helpers import pretrain, tiny_real_data_config as _tiny_config

    examples = _real_images(real_data_dir, 300)
    sizes = [(37, 53), (100, 64), (32, 32), (45, 45)]
    photos = str(tmp_path / "photos")
    for i, (image, _) in enumerate(examples[:96]):
        image = tf.image.resize(image, sizes[i % 4]).numpy().round().astype(np.uint8)
        if i % 8 == 5:
            image = image.mean(-1, keepdims=True).astype(np.uint8)  # grayscale
        elif i % 8 == 6:
            image = np.concatenate([image, np.full(image.shape[:2] + (1,), 128, np.uint8)], -1)  # RGBA
        name = f"set{i % 3}/day{i % 2}/{i}.{'png' if i % 8 in (3, 5, 6) else 'jpg'}"
        _write(photos, name, _encode(name, image))
    jpeg = tf.io.encode_jpeg(examples[0][0]).numpy()
    _write(photos, "set0/truncated.jpg", jpeg[:len(jpeg) // 2])
    _write(photos, "set1/corrupt.jpg", os.urandom(300).replace(b"\xff", b"\x00"))
    _write(photos, "README.txt", b"my holiday photos")

    workdir = str(tmp_path / "pretrain")
    config = _tiny_config(real_data_dir, dataset=f"images:{photos}", train_split="unused",
                          test_split="unused", cache_dataset=False, num_train_steps=4)
    assert config.online_probe and config.knn_monitor  # turned off by the missing labels
    state = pretrain(config, workdir)
    assert int(state.step) == 4
    records = [r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and "probe_acc" not in r for r in records)
    assert not [r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "knn_top1" in r]

    # kNN of the pretrained encoder on a labelled folder: ROOT/<split>/<class>/*.
    labelled = str(tmp_path / "labelled")
    images = {"train": [], "test": []}
    for i, (image, label) in enumerate(examples[96:]):
        if label not in CLASSES:
            continue
        split = "test" if i % 4 == 0 else "train"
        images[split].append((image, label))
        _write(labelled, f"{split}/class{label}/{i}.png", tf.io.encode_png(image).numpy())
    eval_config = knn_config.get_config()
    eval_config.pretrained = workdir
    eval_config.dataset = f"folder:{labelled}"
    eval_config.eval_batch_size = 16
    eval_config.knn.k = 10
    record = protocols.run(eval_config, str(tmp_path / "eval"))
    assert record["checkpoint_step"] == 4 and record["num_examples"] == len(images["test"])
    # The same kNN computed here from the pretrained encoder's features of the
    # same images (folder labels are the sorted class folders: class0..2 -> 0..2).
    embed = encoder.load_encoder(workdir).embed
    features = {split: (embed(np.stack([image for image, _ in pairs])), np.array([label for _, label in pairs]))
                for split, pairs in images.items()}
    want = knn.knn_accuracy(*features["train"], *features["test"], num_classes=3, k=10)
    assert record["top1"] == pytest.approx(want["top1"], abs=1e-6)
