"""Features of whole splits: what kNN and the cached linear classifier read.

A ``FeatureExtractor`` is built once per (model, head layer, data): its
jitted feature function compiles on first use and is reused for every split
and every later call (the kNN monitor calls it many times in one run), and
each split's eval pipeline is built once (with ``cache_dataset`` its decoded
images stay in memory, so later passes skip decoding).

With ``sharded=True`` (what kNN and the cached linear classifier use) the
features stay on the devices, split by rows over the mesh: a bank the size of
ImageNet's never sits whole on one host or one accelerator.
"""
import dataclasses

import jax
import numpy as np

from simclr_jax import sharding
from simclr_jax.data import input_pipeline, sources
from simclr_jax.evaluation import passes
from simclr_jax.models import SimCLR
from simclr_jax.models.classifier import feature_function


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
    """Eval-view features and labels of the train split (the bank) and the test split."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def to_sharded(self, mesh: jax.sharding.Mesh) -> "ShardedFeatures":
        return ShardedFeatures(ShardedSplit.from_numpy(self.train_x, self.train_y, mesh),
                               ShardedSplit.from_numpy(self.test_x, self.test_y, mesh))


@dataclasses.dataclass(frozen=True)
class ShardedSplit:
    """One split's features left on the devices, rows split over the mesh's 'data' axis.

    ``x`` [R, d] holds the n examples at rows ``rows`` (listed in the order
    SplitFeatures has them) and R - n padding rows (R is a multiple of the
    device count). ``labels`` [n] stay on the host: they are small.
    Consumers mask padding with ``row_labels`` (-1 on padding rows).
    """
    x: jax.Array
    rows: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_numpy(cls, x, labels, mesh: jax.sharding.Mesh) -> "ShardedSplit":
        """Host features (the same on every process), zero-padded to a multiple of the mesh size."""
        x = np.asarray(x, np.float32)
        padded = np.zeros((-(-len(x) // mesh.size) * mesh.size,) + x.shape[1:], np.float32)
        padded[:len(x)] = x
        return cls(sharding.put_rows(padded, mesh), np.arange(len(x)), np.asarray(labels))

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.x.sharding.mesh

    def row_labels(self) -> jax.Array:
        """[R] label of each row of ``x``, -1 on padding rows, split like ``x``."""
        host = np.full(self.x.shape[0], -1, np.int32)
        host[self.rows] = self.labels
        return sharding.put_rows(host, self.mesh)

    def numpy(self, max_rows=None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) on every process (the first ``max_rows`` examples
        if given), as SplitFeatures holds them; a collective: all processes call it."""
        rows = self.rows[:max_rows]
        return sharding.take_rows(self.x, rows), self.labels[:len(rows)]


@dataclasses.dataclass(frozen=True)
class ShardedFeatures:
    """The train split (the bank) and the test split, each a ShardedSplit."""
    train: ShardedSplit
    test: ShardedSplit

    def numpy(self, max_train_rows=None) -> SplitFeatures:
        """SplitFeatures on every process (only the first ``max_train_rows``
        train features if given; all train labels). A collective."""
        train_x, _ = self.train.numpy(max_train_rows)
        return SplitFeatures(train_x, self.train.labels, *self.test.numpy())


class FeatureExtractor:
    """``extractor(variables)`` -> SplitFeatures of ``config.train_split`` and ``config.test_split``.

    ``config`` supplies the data (dataset, data_dir, download, cache_dataset,
    image_size, eval_batch_size); every process extracts its slice and the
    features of all processes are gathered, so each process holds them all.
    With ``sharded=True`` it returns ShardedFeatures instead: nothing is
    gathered, each device keeps the features it computed.
    """

    def __init__(self, model: SimCLR, config, mesh: jax.sharding.Mesh, head_layer: int = 0,
                 sharded: bool = False, name: str = "features"):
        self.mesh, self.sharded, self.name = mesh, sharded, name
        self.batch_size = sharding.per_process_batch_size(config.eval_batch_size)
        self._features = feature_function(model, head_layer)
        self._config = config
        self._datasets = {}

    def _dataset(self, split: str):
        if split not in self._datasets:
            self._datasets[split] = input_pipeline.eval_dataset(self._config, split, batch_size=self.batch_size)
        return self._datasets[split]

    def _progress(self, split: str) -> passes.Progress:
        """The pass's progress lines: '<name>: features of cifar10:train: n/N images (r images/s)'."""
        config = self._config
        return passes.Progress(f"{self.name}: features of {config.dataset}:{split}",
                               sources.prepared_split_size(config.dataset, split, config.data_dir))

    def split(self, variables, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features [n, d], labels [n]) of one whole split, on every process."""
        return passes.map_padded_batches(lambda images: self._features(variables, images),
                                           self._dataset(split), self.mesh, self.batch_size, self._progress(split))

    def sharded_split(self, variables, split: str) -> ShardedSplit:
        """One whole split's features, left on the devices that computed them."""
        x, rows, labels = passes.map_sharded_batches(lambda images: self._features(variables, images),
                                                       self._dataset(split), self.mesh, self.batch_size,
                                                       self._progress(split))
        return ShardedSplit(x, rows, labels)

    def __call__(self, variables):
        """ShardedFeatures if built with ``sharded=True``, else SplitFeatures."""
        if self.sharded:
            return ShardedFeatures(self.sharded_split(variables, self._config.train_split),
                                   self.sharded_split(variables, self._config.test_split))
        train_x, train_y = self.split(variables, self._config.train_split)
        test_x, test_y = self.split(variables, self._config.test_split)
        return SplitFeatures(train_x, train_y, test_x, test_y)


class FeatureEvaluator:
    """An evaluation on the features of the train and test splits, extracted
    once and kept on the devices: ``run(variables)`` -> {'top1', 'top5',
    'num_examples'}. ``features`` and ``score`` are its two halves, for
    callers that also want the features (the pictures: ``features.numpy()``).
    Subclasses give ``name`` and ``_score(ShardedFeatures) -> {'top1', 'top5'}``."""

    name: str

    def __init__(self, model: SimCLR, config, mesh: jax.sharding.Mesh, head_layer: int = 0):
        self.features = FeatureExtractor(model, config, mesh, head_layer, sharded=True, name=self.name)
        self.num_classes = sources.num_classes(config.dataset, config.train_split, config.data_dir,
                                               download=config.download)

    def _score(self, features: "ShardedFeatures") -> dict:
        raise NotImplementedError

    def score(self, features: "ShardedFeatures | SplitFeatures") -> dict:
        if isinstance(features, SplitFeatures):
            features = features.to_sharded(self.features.mesh)
        return dict(self._score(features), num_examples=len(features.test.labels))

    def run(self, variables) -> dict:
        return self.score(self.features(variables))
