"""Pictures: augmentation grid, nearest-neighbour retrieval, t-SNE plot, end to end."""
import os

import matplotlib.image
import numpy as np
import pytest

from configs import knn as knn_config
from simclr_jax import pictures, writers
from simclr_jax import protocols

COLOURS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0],
                    [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])


def _constant_images(colours, size=8):
    return np.broadcast_to(np.asarray(colours, np.float32)[:, None, None, :],
                           (len(colours), size, size, 3)).copy()


def test_augmentation_grid_puts_each_view_in_its_cell():
    n, size, pad = 3, 8, 4
    views = np.stack([_constant_images(COLOURS[2 * i:2 * i + 2], size) for i in range(n)])  # [3, 2, 8, 8, 3]
    grid = pictures.augmentation_grid(views, scale=2, pad=pad)
    tile = 2 * size
    assert grid.dtype == np.uint8
    assert grid.shape == (pad + 2 * (tile + pad), pad + n * (tile + pad), 3)
    for i in range(n):
        for v in range(2):
            y, x = pad + v * (tile + pad), pad + i * (tile + pad)
            want = np.round(COLOURS[2 * i + v] * 255).astype(np.uint8)
            assert (grid[y:y + tile, x:x + tile] == want).all(), (i, v)
    assert (grid[:pad] == 255).all() and (grid[:, :pad] == 255).all()  # white padding
    # The default scale upscales 32 px images to TILE pixels, nearest neighbour.
    assert pictures.augmentation_grid(np.zeros((2, 2, 32, 32, 3))).shape[0] == 4 + 2 * (pictures.TILE + 4)


def test_labelled_augmentation_grid_keeps_the_views_and_adds_text():
    views = np.stack([_constant_images(COLOURS[:2], 16)] * 4)
    image = pictures.labelled_augmentation_grid(views, np.arange(4), ["a", "b", "c", "d"], title="A title")
    assert image.dtype == np.uint8 and image.ndim == 3
    # Some dark text pixels beside the grid's red and green tiles.
    assert (image.sum(axis=2) < 200).sum() > 50


def test_nearest_neighbours_by_cosine_similarity():
    bank = np.array([[1, 0], [0, 1], [-1, 0], [0.9, 0.1], [10, 10]], np.float32)
    queries = np.array([[2, 0], [0, 3]], np.float32)
    indices, similarity = pictures.nearest_neighbours(queries, bank, k=3)
    np.testing.assert_array_equal(indices, [[0, 3, 4], [1, 4, 3]])  # the norm does not matter
    np.testing.assert_allclose(similarity[:, 0], 1.0, rtol=1e-6)
    assert (np.diff(similarity, axis=1) <= 0).all()


def test_retrieval_grid_shows_the_nearest_bank_images_with_coloured_borders():
    # Bank image j is colour j, its feature a unit vector at angle j; labels j % 2.
    angles = np.linspace(0, np.pi / 2, 8)
    bank_x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    bank_labels = np.arange(8) % 2
    bank_images = _constant_images(COLOURS, size=16)
    queries_x = bank_x[[1, 6]] + 1e-3
    neighbours, _ = pictures.nearest_neighbours(queries_x, bank_x, k=3)
    np.testing.assert_array_equal(np.sort(neighbours, axis=1), [[0, 1, 2], [5, 6, 7]])
    assert list(neighbours[:, 0]) == [1, 6]

    query_images = _constant_images(COLOURS[[6, 7]], size=16)
    grid = pictures.retrieval_grid(query_images, np.array([1, 0]), bank_images, bank_labels, neighbours,
                                   ["even", "odd"])
    # Layout as _canvas draws it: 16 px images upscaled to 64, 3 px borders.
    scale, border, pad, band, gap = 4, 3, 4, 14, 12
    cell = 16 * scale + 2 * border
    for q in range(2):
        for c in range(4):
            y = pad + q * (band + cell + pad) + band
            x = pad + c * (cell + pad) + (gap if c else 0)
            centre = grid[y + cell // 2, x + cell // 2]
            edge = grid[y + 1, x + cell // 2]
            if c == 0:
                np.testing.assert_array_equal(centre, np.round(COLOURS[6 + q] * 255))
                np.testing.assert_array_equal(edge, pictures.BLUE)
            else:
                j = neighbours[q, c - 1]
                np.testing.assert_array_equal(centre, np.round(COLOURS[j] * 255))
                same = bank_labels[j] == [1, 0][q]
                np.testing.assert_array_equal(edge, pictures.GREEN if same else pictures.RED)


def test_embedding_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 16)) + 5 * np.eye(16)[labels]
    path = str(tmp_path / "sub" / "embedding_tsne.png")
    points = pictures.embedding_plot(features, labels, ["cat", "dog", "frog"], path, max_points=90)
    assert points.shape == (90, 2)
    image = matplotlib.image.imread(path)
    assert image.shape == (650, 800, 4) and image.dtype == np.float32
    assert image[..., :3].std() > 0.05  # not blank
    # Well-separated classes stay apart: each point's nearest neighbour in 2-D shares its class.
    labels = labels[np.sort(np.random.default_rng(0).choice(120, 90, replace=False))]
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(90) * 1e9
    assert (labels[distances.argmin(axis=1)] == labels).mean() > 0.95


def test_save_png_round_trips(tmp_path):
    image = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    path = pictures.save_png(str(tmp_path / "a.png"), image)
    back = matplotlib.image.imread(path)
    np.testing.assert_array_equal(np.round(back[..., :3] * 255).astype(np.uint8), image)


@pytest.mark.slow
def test_pretraining_and_knn_evaluation_write_pictures(tiny_pretraining, real_data_dir, tmp_path):
    pretrain_dir = tiny_pretraining[0]  # the session's tiny pretraining run (tests/conftest.py)
    grid = matplotlib.image.imread(os.path.join(pretrain_dir, "augmentations.png"))
    assert grid.ndim == 3 and grid.shape[1] > 8 * pictures.TILE
    # No scalar record for the picture; the TensorBoard event file holds it.
    assert all("augmentations" not in r for r in writers.read_jsonl(os.path.join(pretrain_dir, "metrics.jsonl")))

    config = knn_config.get_config()
    config.pretrained = pretrain_dir
    config.data_dir = real_data_dir
    config.train_split, config.test_split = "train[:512]", "test[:128]"  # pictures of a few: seconds
    eval_dir = str(tmp_path / "eval")
    protocols.run(config, eval_dir)
    tsne = matplotlib.image.imread(os.path.join(eval_dir, "embedding_tsne.png"))
    retrieval = matplotlib.image.imread(os.path.join(eval_dir, "retrieval.png"))
    assert tsne.shape[:2] == (650, 800)
    assert retrieval.ndim == 3 and retrieval.shape[1] > 9 * pictures.TILE  # query + 8 neighbours

    # Off: no pictures.
    config.write_pictures = False
    quiet_dir = str(tmp_path / "quiet")
    protocols.run(config, quiet_dir)
    assert not [name for name in os.listdir(quiet_dir) if name.endswith(".png")]
