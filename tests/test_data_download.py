"""Unprepared TFDS datasets: download through TFDS when asked, fail fast and
clearly when that cannot work (no network, manual archives, download off)."""
import os
import threading
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections
import pytest
import tensorflow_datasets as tfds

from simclr_jax.data import input_pipeline, preparation, sources

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"  # in TFDS's checksums


def _assert_prepare_elsewhere_advice(message, dataset, data_dir):
    assert f"TFDS dataset {dataset!r} is not prepared under data_dir {data_dir}" in message
    assert f"`tfds build {dataset}`" in message and "on a machine with internet access" in message
    assert "config.data_dir" in message and "TFDS_DATA_DIR" in message


@pytest.fixture
def no_download_attempt(monkeypatch):
    """Fails the test if anything checks the network or asks TFDS to download."""
    def forbidden(*args, **kwargs):
        raise AssertionError("no download may be attempted here")
    monkeypatch.setattr(preparation, "unreachable", forbidden)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", forbidden)


def test_cifar10_download_without_network_fails_fast_and_says_why(tmp_path):
    if not preparation.unreachable([CIFAR10_URL], 5.0):
        pytest.skip("this machine reaches the CIFAR-10 host; the test needs one without network")
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        sources.load_split("cifar10", "train", str(tmp_path), download=True)
    assert time.perf_counter() - start < 30  # TFDS alone retries for minutes
    message = str(error.value)
    _assert_prepare_elsewhere_advice(message, "cifar10", tmp_path)
    assert "downloading it failed: cannot connect to www.cs.toronto.edu:443 (" in message
    assert not tfds.builder("cifar10", data_dir=str(tmp_path)).is_prepared()


def test_a_hanging_download_host_is_given_up_after_the_timeout(tmp_path, monkeypatch):
    release = threading.Event()

    def hang(endpoint, timeout=None):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(preparation.socket, "create_connection", hang)
    monkeypatch.setattr(preparation, "CONNECT_TIMEOUT_S", 1.0)
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=r"cannot connect to www\.cs\.toronto\.edu:443 "
                                             r"\(no connection within 1 s\)"):
            sources.load_split("cifar10", "train", str(tmp_path), download=True)
    finally:
        release.set()
    assert time.perf_counter() - start < 10


def test_imagenet_download_names_the_manual_folder_and_files(tmp_path, no_download_attempt):
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        sources.load_split("imagenet2012", "train", str(tmp_path), download=True)
    assert time.perf_counter() - start < 30
    message = str(error.value)
    assert "TFDS cannot download it: its files must be downloaded by hand" in message
    assert f"Put its files in {tmp_path / 'downloads' / 'manual'} " in message
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message  # TFDS's instructions
    _assert_prepare_elsewhere_advice(message, "imagenet2012", tmp_path)


def test_manual_files_tfds_rejects_give_its_reason_and_the_folder(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "ILSVRC2012_img_train.tar").write_bytes(b"not a tar")  # the val archive is missing
    with pytest.raises(ValueError) as error:
        sources.load_split("imagenet2012", "train", str(tmp_path), download=True)
    message = str(error.value)
    assert "downloading and preparing it with TFDS failed (" in message
    assert "ILSVRC2012_img_val.tar" in message and f"Put its files in {manual} " in message
    assert isinstance(error.value.__cause__, Exception)  # TFDS's own error stays chained


def test_download_false_keeps_the_prepare_elsewhere_message(tmp_path, no_download_attempt):
    for dataset in ("cifar10", "imagenet2012"):
        with pytest.raises(ValueError) as error:
            sources.load_split(dataset, "train", str(tmp_path), download=False)
        message = str(error.value)
        _assert_prepare_elsewhere_advice(message, dataset, tmp_path)
        assert "config.download is False, so TFDS cannot download it here" in message
        assert "Or set config.download=True" in message


def test_download_true_prepares_with_tfds_then_reads_the_split(tmp_path, monkeypatch):
    calls = []

    def download_and_prepare(builder):
        calls.append(builder.name)
        splits = [tfds.core.SplitInfo(name=name, shard_lengths=[7], num_bytes=0)
                  for name in ("train", "test")]
        builder.info.set_splits(tfds.core.SplitDict(splits))

    monkeypatch.setattr(preparation, "unreachable", lambda urls, timeout: [])
    with tfds.testing.mock_data(num_examples=7, data_dir=str(tmp_path)), \
            mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare):
        with pytest.raises(ValueError, match="config.download is False"):
            sources.load_split("cifar10", "train", str(tmp_path))  # download defaults to False
        assert calls == []
        ds, num_examples, info = sources.load_split("cifar10", "train", str(tmp_path), download=True)
        assert calls == ["cifar10"] and num_examples == 7 and len(list(ds)) == 7
        assert info.features["label"].num_classes == 10


def _config(data_dir, download):
    return ml_collections.ConfigDict(dict(
        dataset="cifar10", data_dir=data_dir, download=download, train_split="train",
        image_size=16, color_jitter_strength=0.5, blur=False, augment_on="host", shuffle_buffer_size=8,
        cache_dataset=True))


PIPELINES = {
    "pretrain": lambda c: input_pipeline.pretrain_dataset(c, per_process_batch_size=4, seed=0),
    "eval": lambda c: input_pipeline.eval_dataset(c, "test", batch_size=4),
    "split_labels": lambda c: input_pipeline.split_labels(c, "cifar10", "train"),
    "labelled_examples": lambda c: input_pipeline.labelled_examples(c, "cifar10", "train"),
    "labelled_subset": lambda c: input_pipeline.labelled_examples(c, "cifar10", "train", [0, 1]),
    "num_classes": lambda c: sources.num_classes("cifar10", "train", c.data_dir, download=c.download),
    "class_names": lambda c: sources.class_names("cifar10", "train", c.data_dir, download=c.download),
}


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_every_pipeline_passes_config_download_to_load_split(pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "unreachable", lambda urls, timeout: ["host.test:443 (test)"])
    with pytest.raises(ValueError, match=r"downloading it failed: cannot connect to host\.test:443"):
        PIPELINES[pipeline](_config(str(tmp_path), download=True))
    with pytest.raises(ValueError, match="config.download is False"):
        PIPELINES[pipeline](_config(str(tmp_path), download=False))
