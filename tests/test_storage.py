"""The storage layer on a local disk and in a bucket (a GCS API server on
loopback), and the TensorBoard events written through it, read back by
TensorBoard's own reader."""
import io
import os

import matplotlib.image
import numpy as np
import pytest

from simclr_jax import storage, writers


@pytest.fixture(params=["local", "bucket"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_bucket") + f"/{request.node.name.replace('[', '_').rstrip(']')}"


def test_write_read_list_and_replace(root):
    path = storage.join(root, "sub", "config.json")
    assert not storage.exists(path)
    storage.write_text(path, '{"a": 1}')
    storage.write_text(path, '{"a": 2}')  # replaced, not appended
    assert storage.read_text(path) == '{"a": 2}'
    assert storage.isdir(storage.join(root, "sub")) and not storage.isdir(path)
    assert storage.listdir(storage.join(root, "sub")) == ["config.json"]  # no partial file left behind
    storage.rmtree(storage.join(root, "sub"))
    assert not storage.exists(path)


def test_appender_grows_the_file_across_writers(root):
    path = storage.join(root, "metrics.jsonl")
    first = storage.Appender(path)
    first.write("a\n")
    first.flush()
    assert storage.read_text(path) == "a\n"  # visible at each flush
    first.write("b\n")
    first.close()
    second = storage.Appender(path)  # a resumed run goes on in the same file
    second.write("c\n")
    second.close()
    assert storage.read_text(path) == "a\nb\nc\n"


def test_copy_tree_copies_every_file(root, tmp_path):
    source = tmp_path / "model"
    (source / "variables").mkdir(parents=True)
    (source / "variables" / "v.data").write_bytes(b"\x00\x01")
    (source / "saved_model.pb").write_bytes(b"pb")
    target = storage.join(root, "export")
    storage.copy_tree(str(source), target, last=("saved_model.pb",))
    assert storage.read_bytes(storage.join(target, "variables", "v.data")) == b"\x00\x01"
    assert storage.read_bytes(storage.join(target, "saved_model.pb")) == b"pb"


def test_paths(gcs_bucket):
    assert storage.is_url("gs://b/run") and not storage.is_url("/tmp/run") and not storage.is_url("run")
    assert storage.resolve("gs://b/run/") == "gs://b/run"
    assert storage.resolve("run") == os.path.abspath("run")
    assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.parent("gs://b/run/checkpoints") == "gs://b/run"
    assert storage.name("gs://b/run/checkpoints") == "checkpoints"


def test_tensorboard_reads_back_scalars_images_and_hparams(root, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    writer = writers.TensorBoardWriter(root)
    writer.write_hparams({"optimizer.momentum": 0.9, "model.depth": 18, "dataset": "cifar10"})
    writer.write_scalars(1, {"loss": 2.5, "lr": np.float32(0.1)})
    writer.write_scalars(2, {"loss": 2.0})
    image = np.zeros((4, 6, 3), np.uint8)
    image[1, 2] = (255, 0, 0)
    writer.write_images(2, {"augmentations": image[None]})
    writer.close()
    (name,) = storage.listdir(root)
    assert "tfevents" in name
    local = tmp_path / name  # TensorBoard's reader goes through TensorFlow's file system: read a copy
    local.write_bytes(storage.read_bytes(storage.join(root, name)))
    events = event_accumulator.EventAccumulator(str(local), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("lr")] == [(1, 0.1)]
    (picture,) = events.Images("augmentations")
    assert (picture.step, picture.width, picture.height) == (2, 6, 4)
    decoded = matplotlib.image.imread(io.BytesIO(picture.encoded_image_string), format="png")
    np.testing.assert_array_equal(np.round(decoded[..., :3] * 255).astype(np.uint8), image)
    from tensorboard.plugins.hparams import plugin_data_pb2

    metadata = events.SummaryMetadata("_hparams_/session_start_info")
    hparams = plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content).session_start_info.hparams
    assert (hparams["optimizer.momentum"].number_value, hparams["dataset"].string_value) == (0.9, "cifar10")
