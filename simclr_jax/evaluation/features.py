"""Features of whole splits: what kNN and the cached linear classifier read.

A ``FeatureExtractor`` is built once per (model, head layer, data): its
jitted feature function compiles on first use and is reused for every split
and every later call (the kNN monitor calls it many times in one run), and
each split's eval pipeline is built once (with ``cache_dataset`` its decoded
images stay in memory, so later passes skip decoding).
"""
import dataclasses
import functools

import jax
import numpy as np

from simclr_jax import sharding
from simclr_jax.data import input_pipeline
from simclr_jax.models import SimCLR


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
    """Eval-view features and labels of the train split (the bank) and the test split."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def feature_function(model: SimCLR, head_layer: int):
    """jit(variables, images) -> features of head layer ``head_layer`` (0 = h), in inference mode."""
    if not 0 <= head_layer <= model.head_layers:
        raise ValueError(f"head_layer must be in [0, {model.head_layers}] (0 = encoder output h), got {head_layer}")
    return jax.jit(functools.partial(model.apply, train=False, head_layer=head_layer, method=SimCLR.features))


class FeatureExtractor:
    """``extractor(variables)`` -> SplitFeatures of ``config.train_split`` and ``config.test_split``.

    ``config`` supplies the data (dataset, data_dir, download, cache_dataset,
    image_size, eval_batch_size); every process extracts its slice and the
    features of all processes are gathered, so each process holds them all.
    """

    def __init__(self, model: SimCLR, config, mesh: jax.sharding.Mesh, head_layer: int = 0):
        self.mesh = mesh
        self.batch_size = sharding.per_process_batch_size(config.eval_batch_size)
        self._features = feature_function(model, head_layer)
        self._config = config
        self._datasets = {}

    def split(self, variables, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features [n, d], labels [n]) of one whole split."""
        if split not in self._datasets:
            self._datasets[split] = input_pipeline.eval_dataset(self._config, split, batch_size=self.batch_size)
        return sharding.map_padded_batches(lambda images: self._features(variables, images),
                                           self._datasets[split], self.mesh, self.batch_size)

    def __call__(self, variables) -> SplitFeatures:
        train_x, train_y = self.split(variables, self._config.train_split)
        test_x, test_y = self.split(variables, self._config.test_split)
        return SplitFeatures(train_x, train_y, test_x, test_y)
