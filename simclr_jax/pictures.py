"""Pictures of a run: augmented views, a t-SNE of the features, nearest neighbours.

Pretraining writes ``workdir/augmentations.png`` (and the same grid to
TensorBoard); kNN and cached linear evaluations write
``workdir/embedding_tsne.png`` and ``workdir/retrieval.png``. Everything is
drawn with matplotlib's Agg renderer (no display), and matplotlib and
scikit-learn are imported only when a picture is made.
"""
import io

import numpy as np
from absl import logging

from simclr_jax import storage, writers
from simclr_jax.data import samples, sources
from simclr_jax.numerics import l2_normalize

TILE = 64  # images are upscaled (nearest neighbour) to about this many pixels
BANK_LIMIT = 50_000  # the retrieval grid searches the first this-many train images
GREEN, RED, BLUE = (0, 150, 0), (210, 0, 0), (40, 80, 200)


def _to_uint8(images) -> np.ndarray:
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def _scale_for(size: int) -> int:
    return max(1, round(TILE / size))


def _canvas(rows, cols, cell_h, cell_w, pad, *, band=0, left=0, gap_after_first=0):
    """A white canvas and cell (r, c)'s top-left corner: cells of cell_h x cell_w
    pixels, each below a ``band`` for its label, ``pad`` apart, after a ``left``
    margin (row labels); an extra gap after column 0."""
    def origin(r, c):
        return (pad + r * (band + cell_h + pad) + band,
                left + pad + c * (cell_w + pad) + (gap_after_first if c else 0))
    height = pad + rows * (band + cell_h + pad)
    width = left + pad + cols * (cell_w + pad) + (gap_after_first if cols > 1 else 0)
    return np.full((height, width, 3), 255, np.uint8), origin


def augmentation_grid(views, *, scale=None, pad=4, band=0, left=0) -> np.ndarray:
    """uint8 [H, W, 3]: column i shows image i's two views (f32 [N, 2, S, S, 3]
    in [0, 1]), view 1 above view 2, upscaled ``scale`` times (default: to
    about TILE pixels). band and left leave room for labels."""
    views = _to_uint8(views)
    n, _, size = views.shape[:3]
    scale = scale or _scale_for(size)
    tile = size * scale
    canvas, origin = _canvas(2, n, tile, tile, pad, band=band, left=left)
    for i in range(n):
        for v in range(2):
            y, x = origin(v, i)
            canvas[y:y + tile, x:x + tile] = _upscale(views[i, v], scale)
    return canvas


def _annotate(canvas, texts, title=None, fontsize=8) -> np.ndarray:
    """``canvas`` with texts drawn at pixel positions: (x, y, text, colour) with
    (x, y) the bottom centre of the text, y from the top; a ``title`` goes in a
    band added above, wrapped to the width."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = textwrap.wrap(title, max(20, canvas.shape[1] // 9)) if title else []  # ~9 px a character
    band = 8 + 16 * len(lines) if lines else 0
    canvas = np.concatenate([np.full((band,) + canvas.shape[1:], 255, np.uint8), canvas])
    height, width = canvas.shape[:2]
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.figimage(canvas, 0, 0, origin="upper")
    for x, y, text, colour in texts:
        fig.text(x / width, 1 - (y + band) / height, text, ha="center", va="bottom", fontsize=fontsize,
                 color=np.asarray(colour) / 255)
    if lines:
        fig.text(0.5, 1 - 4 / height, "\n".join(lines), ha="center", va="top", fontsize=fontsize + 2,
                 weight="bold", linespacing=1.2)
    agg = FigureCanvasAgg(fig)
    agg.draw()
    image = np.asarray(agg.buffer_rgba())[..., :3]
    out = np.full_like(canvas, 255)  # float rounding of the figure size can add or lose a pixel
    h, w = min(height, image.shape[0]), min(width, image.shape[1])
    out[:h, :w] = image[:h, :w]
    return out


def save_png(path: str, image: np.ndarray) -> str:
    """Writes a uint8 [H, W, 3] image as a PNG; returns ``path``."""
    storage.write_bytes(path, writers.encode_png(image))
    return path


def _name(class_names, label) -> str:
    label = int(label)
    return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)


def labelled_augmentation_grid(views, labels=None, class_names=None, title=None) -> np.ndarray:
    """augmentation_grid with row names, each image's class and a title."""
    views = np.asarray(views)
    size, scale, pad, band, left = views.shape[2], _scale_for(views.shape[2]), 4, 14, 48
    canvas = augmentation_grid(views, scale=scale, pad=pad, band=band, left=left)
    tile = size * scale
    texts = [(left / 2, pad + v * (band + tile + pad) + band + tile / 2 + 6, f"view {v + 1}", (0, 0, 0))
             for v in range(2)]
    if labels is not None:
        texts += [(left + pad + i * (tile + pad) + tile / 2, pad + band - 2, _name(class_names, label),
                   (0, 0, 0)) for i, label in enumerate(labels)]
    return _annotate(canvas, texts, title)


def nearest_neighbours(queries, bank, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k], cosine similarities [Q, k]) of each query's k nearest bank rows."""

    queries, bank = (l2_normalize(np.asarray(x, np.float32)) for x in (queries, bank))
    similarity = np.asarray(queries @ bank.T)
    k = min(k, similarity.shape[1])
    indices = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return indices, np.take_along_axis(similarity, indices, axis=1)


def retrieval_grid(query_images, query_labels, bank_images, bank_labels, neighbours, class_names,
                   title=None) -> np.ndarray:
    """uint8 image: row q is query image q (blue border) then bank_images[neighbours[q]]
    with a green border where the class matches the query's, red where not;
    every image is labelled with its class name."""
    queries, bank = _to_uint8(query_images), _to_uint8(bank_images)
    neighbours = np.asarray(neighbours)
    rows, k = neighbours.shape
    size, border, pad, band = queries.shape[1], 3, 4, 14
    scale = _scale_for(size)
    cell = size * scale + 2 * border
    canvas, origin = _canvas(rows, k + 1, cell, cell, pad, band=band, gap_after_first=12)
    texts = []

    def put(r, c, image, label, colour):
        y, x = origin(r, c)
        canvas[y:y + cell, x:x + cell] = colour
        canvas[y + border:y + cell - border, x + border:x + cell - border] = _upscale(image, scale)
        texts.append((x + cell / 2, y - 2, _name(class_names, label), colour))

    for q in range(rows):
        put(q, 0, queries[q], query_labels[q], BLUE)
        for j, index in enumerate(neighbours[q]):
            same = int(bank_labels[index]) == int(query_labels[q])
            put(q, j + 1, bank[index], bank_labels[index], GREEN if same else RED)
    return _annotate(canvas, texts, title)


def embedding_plot(features, labels, class_names, path, max_points=2000, seed=0, title=None) -> np.ndarray:
    """t-SNE (cosine geometry: features L2-normalised) of at most ``max_points``
    rows drawn with ``seed``, coloured by class, saved as a PNG at ``path``.
    Returns the 2-D embedding of the drawn rows."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE


    features, labels = np.asarray(features, np.float32), np.asarray(labels)
    if len(features) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), max_points, replace=False))
        features, labels = features[keep], labels[keep]
    features = np.asarray(l2_normalize(features))
    perplexity = min(30.0, max(1.0, (len(features) - 1) / 3))
    points = TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features)

    fig = Figure(figsize=(8, 6.5), dpi=100)
    ax = fig.add_subplot()
    classes = np.unique(labels)
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
    for i, label in enumerate(classes):
        where = labels == label
        colour = cmap(i if len(classes) <= 20 else i / max(len(classes) - 1, 1))
        ax.scatter(points[where, 0], points[where, 1], s=8, color=colour, label=_name(class_names, label),
                   alpha=0.8, linewidths=0)
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(features)} test features, coloured by class")
    fig.tight_layout()
    encoded = io.BytesIO()
    FigureCanvasAgg(fig).print_png(encoded)
    storage.write_bytes(path, encoded.getvalue())
    return points


# ------------------------------------------------------- from a config's data


def class_names(config) -> list:
    """The dataset's class names, or [] (``sources.class_names`` of its train split)."""
    return sources.class_names(config.dataset, config.train_split, config.data_dir,
                               download=config.download)


def write_augmentation_grid(config, workdir: str, writer, step: int = 0, num_images: int = 8) -> str:
    """workdir/augmentations.png and a TensorBoard image 'augmentations' (call
    on process 0 only). Returns the path."""
    views, labels = samples.augmentation_views(config, num_images)
    writer.write_images(step, {"augmentations": augmentation_grid(views)[None]})
    has_labels = bool((labels >= 0).any())
    title = (f"Two augmented views per image: crop {config.image_size} px, colour "
             f"{config.color_jitter_strength}, {'blur' if config.blur else 'no blur'}")
    grid = labelled_augmentation_grid(views, labels if has_labels else None,
                                      class_names(config) if has_labels else [], title)
    return save_png(storage.join(workdir, "augmentations.png"), grid)


def write_evaluation_pictures(config, workdir, train_x, train_y, test_x, test_y, *,
                              num_queries: int = 8, k: int = 8, max_points: int = 2000) -> list:
    """workdir/embedding_tsne.png and workdir/retrieval.png from evaluation
    features (call on process 0 only). Returns the paths written."""
    import jax

    names = class_names(config)
    layer = config.head_layer
    what = "h" if layer == 0 else f"head layer {layer}"
    paths = [storage.join(workdir, "embedding_tsne.png")]
    embedding_plot(test_x, test_y, names, paths[0], max_points=max_points, seed=config.seed,
                   title=f"t-SNE of {min(len(test_x), max_points)} {config.test_split} features ({what}), "
                         "coloured by class")
    if jax.process_count() > 1:  # gathered features interleave the processes' slices
        logging.info("retrieval.png is drawn by single-process evaluations only")
        return paths
    # One query of each class in turn (the first test image of it), then any.
    queries = np.unique(test_y, return_index=True)[1][:num_queries].tolist()  # first of each class
    taken = set(queries)
    queries += [i for i in range(min(len(test_y), 2 * num_queries)) if i not in taken][:num_queries - len(queries)]
    bank = min(len(train_y), BANK_LIMIT)  # train_x may hold just these first rows
    neighbours, _ = nearest_neighbours(test_x[queries], train_x[:bank], k)
    used, remap = np.unique(neighbours, return_inverse=True)
    title = (f"Queries from {config.test_split} (blue) and their {neighbours.shape[1]} nearest "
             f"{config.train_split} images{f' (first {bank})' if bank < len(train_y) else ''} by cosine "
             f"similarity of {what}: green = same class, red = not")
    grid = retrieval_grid(samples.images_at(config, config.test_split, queries), test_y[queries],
                          samples.images_at(config, config.train_split, used), train_y[used],
                          remap.reshape(neighbours.shape), names, title)
    paths.append(save_png(storage.join(workdir, "retrieval.png"), grid))
    return paths
