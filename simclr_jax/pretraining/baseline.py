"""The same network at random initialisation, scored by the run's monitors:
what the end-of-run summary reads a kNN number against. A random ResNet
already sorts CIFAR-10 well above chance (about 20-30% kNN top-1), so 25%
after a short run says little on its own.

Its weights are the run's own initialisation before any init_from, which
are ``--config.random_init=True``'s (the same rbg key of the seed, the same
init), so the number is the kNN recipe's baseline, and nothing compiles
anew. It is scored at the run's final monitor, one more pass of the
monitors' compiled feature function, and kept in ``workdir/random_init.json``
with the settings it depends on: a resumed run that ends again reads it.
"""
import json
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import storage

FILE = "random_init.json"
SCORES = ("top1", "top5")


def _settings(config) -> dict:
    """What the baseline's numbers depend on, as JSON reads it back."""
    return json.loads(json.dumps(dict(
        dataset=config.dataset, train_split=config.train_split, test_split=config.test_split, seed=config.seed,
        image_size=config.image_size, model=config.model.to_dict(), knn=config.knn.to_dict())))


def _cached(path: str, settings: dict, names: list[str]) -> np.ndarray:
    """[monitors, scores] from the file if it holds these settings, else NaN:
    process 0 reads it and tells the others, so all score it or none (a collective)."""
    table = np.full((len(names), len(SCORES)), np.nan)
    if jax.process_index() == 0 and storage.exists(path):
        saved = json.loads(storage.read_text(path))
        if saved.get("settings") == settings and set(names) <= set(saved["scores"]):
            table = np.array([[saved["scores"][name][s] for s in SCORES] for name in names])
    return np.asarray(multihost_utils.broadcast_one_to_all(table))


def scores(evaluators: list, random_variables: Callable[[], dict], config, workdir: str
           ) -> dict[str, dict[str, float]]:
    """{monitor name: {'top1', 'top5'}} of the network at random initialisation
    (``random_variables()``: its variables on the mesh, called only if scored)."""
    path, settings, names = storage.join(workdir, FILE), _settings(config), [e.name for e in evaluators]
    table = _cached(path, settings, names)
    if not np.isnan(table).any():
        return _named(names, table)
    variables = random_variables()
    results = [e.run(variables) for e in evaluators]
    scored = _named(names, np.array([[float(result[s]) for s in SCORES] for result in results]))
    if jax.process_index() == 0:
        storage.write_text(path, json.dumps(dict(settings=settings, scores=scored), indent=2))
    return scored


def _named(names: list[str], table: np.ndarray) -> dict[str, dict[str, float]]:
    return {name: dict(zip(SCORES, map(float, row))) for name, row in zip(names, table)}
