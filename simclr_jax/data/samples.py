"""A few examples of a split, for the pictures of a run (simclr_jax/pictures.py).

Each reads its own small pipeline, so neither the training stream nor an
evaluation's passes are touched.
"""
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import augment, input_pipeline, sources


def images_at(config, split: str, indices) -> np.ndarray:
    """Eval views (f32 [len(indices), S, S, 3]) of a split's examples at ``indices``,
    in the order evaluation reads them (one process); only those are decoded."""
    indices = np.asarray(indices, np.int64)
    ds, _, _ = sources.load_split(config.dataset, split, config.data_dir, download=config.download,
                                  autocache=False, decoders={"image": tfds.decode.SkipDecoding()})
    wanted = tf.constant(np.unique(indices))
    ds = ds.take(int(indices.max()) + 1).enumerate()
    ds = ds.filter(lambda i, example: tf.reduce_any(tf.equal(i, wanted)))
    size = config.image_size
    ds = ds.map(lambda i, example: (i, augment.eval_view(
        tf.io.decode_image(example["image"], channels=3, expand_animations=False), size, size)))
    found = {int(i): image for i, image in ds.as_numpy_iterator()}
    return np.stack([found[int(i)] for i in indices])


def augmentation_views(config, num_images: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(views f32 [N, 2, S, S, 3], labels [N]): two training views of the first
    images of the train split, seeded by config.seed. A pipeline of its own, so
    the training stream is untouched."""
    ds, _, _ = sources.load_split(config.dataset, config.train_split, config.data_dir,
                                  download=config.download, autocache=False)
    size, seeds_at = config.image_size, input_pipeline.example_seeds(config.seed, 2, process_index=0)
    views, labels = [], []
    for index, example in enumerate(ds.take(num_images)):
        seeds = seeds_at(index)
        views.append(np.stack([
            augment.train_view(example["image"], size, size, seed=seeds[v],
                               color_jitter_strength=config.color_jitter_strength, blur=config.blur).numpy()
            for v in range(2)]))
        labels.append(int(example["label"]) if "label" in example else -1)
    return np.stack(views), np.asarray(labels)
