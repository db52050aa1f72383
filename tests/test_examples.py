"""examples/retrieval.py and examples/evaluate_official.py, run on the official
ResNet-18 fixture and real CIFAR-10: the fixture's images are the first test
images, so the official outputs are the reference (its README: 1e-4 of the largest)."""
import os
import runpy

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.launch import ROOT

OUTPUTS = os.path.join(ROOT, "..", "shared", "fixtures", "official_simclr_tf2", "r18_cifar", "outputs.npz")


def _example(name: str) -> dict:
    return runpy.run_path(os.path.join(ROOT, "examples", f"{name}.py"), run_name="example")


@pytest.fixture(scope="module")
def official(official_files, real_data_dir):
    outputs = dict(np.load(OUTPUTS))
    test = tfds.as_numpy(tfds.load("cifar10", split=f"test[:{len(outputs['images'])}]", data_dir=real_data_dir,
                                   batch_size=-1))
    assert np.abs(test["image"] / 255.0 - outputs["images"]).max() < 1e-6  # the same images
    return official_files["r18_cifar", "saved_model"], outputs, test["label"]


def test_evaluate_official_reproduces_the_official_logits_and_their_accuracy(official, real_data_dir):
    checkpoint, outputs, labels = official
    logits, top1 = _example("evaluate_official")["main"](checkpoint, real_data_dir, len(labels))
    want = outputs["logits_sup"]
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
    assert top1 == (want.argmax(axis=1) == labels).mean()


def test_retrieval_ranks_by_the_official_features(official, real_data_dir):
    checkpoint, outputs, labels = official
    neighbours = _example("retrieval")["main"](checkpoint, real_data_dir, len(labels), 2)
    h = outputs["final_avg_pool"].astype(np.float64)
    cosine = (h @ h.T) / np.outer(np.linalg.norm(h, axis=1), np.linalg.norm(h, axis=1))
    np.fill_diagonal(cosine, -np.inf)
    assert neighbours.tolist() == np.argsort(-cosine, axis=1, kind="stable")[:, :2].tolist()
