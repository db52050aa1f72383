"""One pass of a function over an evaluation split on the mesh, every process's rows.

An evaluation split arrives as this process's tf.data batches of
{'image', 'label'}; processes may hold different numbers of them. Each batch
is padded to the per-process batch size, so the function compiles once and
splits evenly over the mesh, and a process that has run out contributes
padding until all have. A pass given a ``label`` says how far it is (the
images done, of how many, how fast) every PROGRESS_SECONDS and at its end.
"""
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from simclr_jax import sharding
from simclr_jax.data import input_pipeline, sources
from simclr_jax.evaluation.metrics import topk_accuracy

PROGRESS_SECONDS = 30.0


class Progress:
    """'<label>: 12000/50000 images (830 images/s)' every PROGRESS_SECONDS and
    once at the end of a pass; silent without a label. ``total``: the split's
    size when known (None: the count alone)."""

    def __init__(self, label: Optional[str] = None, total: Optional[int] = None):
        self.label, self.total, self.done = label, total, 0
        self.start = self.shown = time.perf_counter()

    def add(self, images: int) -> None:
        self.done += images
        if self.label and time.perf_counter() - self.shown >= PROGRESS_SECONDS:
            self._show()

    def end(self, outputs=None) -> None:
        """The pass's last line, once ``outputs`` are computed (the rate counts them)."""
        if self.label:
            jax.block_until_ready(outputs)
            self._show()

    def _show(self) -> None:
        self.shown = time.perf_counter()
        rate = self.done / max(self.shown - self.start, 1e-9)
        logging.info("%s: %d%s images (%.0f images/s)", self.label, self.done,
                     f"/{self.total}" if self.total else "", rate)


def _padded_global_batches(dataset: Any, mesh: Mesh, batch_size: int, progress: Progress):
    """Yields (images on the mesh, valid [B], labels [B]) per global batch of B rows.

    Each process's batch is padded to ``batch_size`` so a function of it
    compiles once and splits evenly over the mesh; a process that has run out
    contributes padding until all have. ``valid`` and ``labels`` are numpy,
    the same on every process.
    """
    spec = dataset.element_spec
    empty = {key: np.zeros((0,) + tuple(spec[key].shape[1:]), spec[key].dtype.as_numpy_dtype)
             for key in ("image", "label")}
    batches = dataset.as_numpy_iterator()
    while True:
        batch = next(batches, empty)
        n = len(batch["label"])
        pad = lambda x: np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        # A small gather first: it tells every process whether any still has data.
        rows = sharding.gather({"valid": np.arange(batch_size) < n, "label": pad(batch["label"])})
        if not rows["valid"].any():
            return
        progress.add(int(rows["valid"].sum()))
        yield sharding.put_batch(pad(batch["image"]), mesh), rows["valid"], rows["label"]


def map_padded_batches(fn: Any, dataset: Any, mesh: Mesh, batch_size: int, progress: Optional[Progress] = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(fn outputs, labels) over one pass of {'image', 'label'} batches, all processes' rows.

    ``dataset`` yields this process's batches of at most ``batch_size`` rows
    (the per-process batch size). Each is padded to ``batch_size`` so ``fn``
    compiles once and splits evenly over the mesh. Processes may hold
    different numbers of batches (uneven slices): one that has run out
    contributes padding until all have, and the valid rows of every process
    are gathered, so every process returns the same arrays. ``progress``:
    what the pass tells the log (default: nothing).
    """
    outputs, labels, progress = [], [], progress or Progress()
    for images, valid, batch_labels in _padded_global_batches(dataset, mesh, batch_size, progress):
        outputs.append(sharding.gather(fn(images))[valid])
        labels.append(batch_labels[valid])
    if not outputs:
        raise ValueError("the evaluation split is empty")
    progress.end()
    return np.concatenate(outputs), np.concatenate(labels)


def map_sharded_batches(fn: Any, dataset: Any, mesh: Mesh, batch_size: int, progress: Optional[Progress] = None
                        ) -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """(outputs, rows, labels): ``map_padded_batches`` with the outputs left on the devices.

    ``outputs`` [R, ...] is one global array split on its rows over 'data':
    each device keeps its shard of every batch, stacked in place (no
    transfer), so a device's rows are its shards of batch 0, 1, ... and R
    (all batches, padding included) is a multiple of the device count.
    ``rows`` [n] is the row of ``outputs`` of each example in the order
    ``map_padded_batches`` returns, ``labels`` [n] its label (both numpy,
    small, the same on every process); the other R - n rows are padding.
    """
    target, progress = sharding.batch_sharded(mesh), progress or Progress()
    shards, valid, labels = {}, [], []
    for images, batch_valid, batch_labels in _padded_global_batches(dataset, mesh, batch_size, progress):
        for shard in jax.device_put(fn(images), target).addressable_shards:
            shards.setdefault(shard.device, []).append(shard.data)
        valid.append(batch_valid)
        labels.append(batch_labels[batch_valid])
    if not valid:
        raise ValueError("the evaluation split is empty")
    num_batches, global_batch = len(valid), len(valid[0])
    per_device = global_batch // mesh.size
    # Example at position p of batch t sits on device p // per_device, after
    # that device's shards of batches 0..t-1.
    position = np.arange(global_batch)
    row = ((position // per_device) * num_batches * per_device)[None, :] + \
        (np.arange(num_batches) * per_device)[:, None] + (position % per_device)[None, :]
    blocks = [jnp.concatenate(parts) for parts in shards.values()]
    shape = (num_batches * global_batch,) + blocks[0].shape[1:]
    outputs = jax.make_array_from_single_device_arrays(shape, target, blocks)
    progress.end(outputs)
    return outputs, row[np.stack(valid)], np.concatenate(labels)


def split_accuracy(config, split: str, mesh: Mesh, logits_fn: Callable, label: Optional[str] = None) -> dict:
    """{'top1', 'top5', 'num_examples'} of ``logits_fn(images)`` on eval views
    of ``split`` (config supplies the data and eval_batch_size); ``label``
    names the pass in its progress lines (None: silent)."""
    batch_size = sharding.per_process_batch_size(config.eval_batch_size)
    dataset = input_pipeline.eval_dataset(config, split, batch_size=batch_size)
    progress = Progress(label and f"{label}: scoring {config.dataset}:{split}",
                        sources.prepared_split_size(config.dataset, split, config.data_dir) if label else None)
    logits, labels = map_padded_batches(logits_fn, dataset, mesh, batch_size, progress)
    return dict(topk_accuracy(logits, labels), num_examples=len(labels))
