"""Metric writers: clu's TensorBoard + log lines, plus a JSON-lines file.

``workdir/metrics.jsonl`` holds one JSON object per write, with ``step``, so a
run can be read back without TensorBoard (tests and scripts do).
"""
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
    """Appends scalars as JSON lines; ignores every other kind of summary."""

    def __init__(self, path: str):
        self._path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step)}
        record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

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

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard + logging + metrics.jsonl on process 0; logging elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(just_logging=True)
    default = metric_writers.create_default_writer(workdir, asynchronous=False)
    return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_jsonl(path: str) -> list[dict[str, float]]:
    """The records a JsonlWriter wrote, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def flat_hparams(config) -> dict:
    """A config as TensorBoard hparams: {'optimizer.momentum': 0.9, ...}, scalars only."""
    flat = {}

    def visit(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", json.loads(config.to_json_best_effort()))
    return flat
