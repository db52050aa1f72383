"""Metric writers behind clu's interface: TensorBoard and a JSON-lines file.

``workdir/metrics.jsonl`` holds one JSON object per write, with ``step``, so a
run can be read back without TensorBoard (tests and scripts do): a training
loop's means over each logging interval (with ``epoch``,
``images_per_sec`` and ``input_wait``, the share of the interval the
accelerator waited for the next batch), pretraining's monitor rows (``knn_top1``, ``knn_top5``),
an evaluation's ``<protocol>/top1`` and ``/top5``, and nothing else. Both files
go through ``storage``, so a workdir in a bucket gets them too: the
TensorBoard events are written here (scalars, images, hparams) rather than by
``tf.summary``, whose file system cannot be pointed at a test server.
"""
import io
import json
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface

from simclr_jax import config_schema, storage


class _IgnoresOthers(interface.MetricWriter):
    """The summary kinds a writer below does not record."""

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass


class JsonlWriter(_IgnoresOthers):
    """Appends scalars as JSON lines; ignores every other kind of summary."""

    def __init__(self, path: str):
        self._path = path
        self._file = storage.Appender(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step)}
        record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class TensorBoardWriter(_IgnoresOthers):
    """Scalars, images and hparams as a TensorBoard event file in ``logdir``,
    one new file per writer (as tf.summary names them), flushed on every write."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event = event_pb2.Event
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.simclr_jax.v2"
        self._file = storage.Appender(storage.join(logdir, name), binary=True)
        self._records = RecordWriter(self._file)
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())
        self._file.flush()

    def _summary(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import summary_pb2

        self._write(self._event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        from tensorboard.compat.proto import summary_pb2

        self._summary(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v)))
                             for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Any]):
        """``images``: {tag: uint8 [H, W, 3] or [N, H, W, 3]}; each written as PNG."""
        from tensorboard.compat.proto import summary_pb2

        values = []
        for tag, batch in images.items():
            batch = np.asarray(batch)
            for i, image in enumerate(batch[None] if batch.ndim == 3 else batch):
                encoded = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                                                    encoded_image_string=encode_png(image))
                values.append(summary_pb2.Summary.Value(tag=tag if i == 0 else f"{tag}/{i}", image=encoded))
        self._summary(step, values)

    def write_hparams(self, hparams: Mapping[str, Any]):
        from tensorboard.plugins.hparams import summary_v2

        self._write(self._event(wall_time=time.time(), summary=summary_v2.hparams_pb(dict(hparams))))

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 [H, W, 3] image as PNG bytes."""
    import matplotlib.image

    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, np.ascontiguousarray(image), format="png")
    return buffer.getvalue()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard + metrics.jsonl on process 0; nothing elsewhere. No log
    writer: the log's one account of a run is its own progress line (the
    loop's ``describe``), not a second line of the same scalars."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    return metric_writers.MultiWriter([TensorBoardWriter(workdir), JsonlWriter(storage.join(workdir, "metrics.jsonl"))])


def read_jsonl(path: str) -> list[dict[str, float]]:
    """The records a JsonlWriter wrote, in order."""
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def flat_hparams(config) -> dict:
    """A config as TensorBoard hparams: {'optimizer.momentum': 0.9, ...}, scalars only."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in config_schema.flatten(json.loads(config.to_json_best_effort())).items()}


def append_result(workdir: str, record: dict[str, Any]) -> None:
    """Adds one record to workdir/eval_results.json (a JSON list), atomically."""
    path = storage.join(workdir, "eval_results.json")
    records = json.loads(storage.read_text(path)) if storage.exists(path) else []
    records.append(record)
    storage.write_text(path, json.dumps(records, indent=2))
