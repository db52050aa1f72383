"""A pretrained encoder for user code: images in, features out.

    encoder = simclr_jax.load_encoder("runs/smoke")  # a pretraining workdir
    h = encoder.embed(images)                        # uint8 [B, H, W, 3] -> float32 [B, D]

The architecture and image size come from the workdir's ``config.json``
(written by pretraining), the weights from its latest (or a chosen)
checkpoint, restored as evaluation restores them. ``embed`` applies the
evaluation preprocessing (``augment.eval_view``: uint8 -> [0, 1], a centre
crop for images larger than CIFAR's 32 px, bicubic resize to the training
size) and runs the same jitted feature function as the evaluation code, in
fixed-size chunks split over this process's devices, so it compiles once.
"""
import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from simclr_jax import augment, evaluate, models, sharding

CONFIG_FILE = "config.json"


def _workdir(path: str) -> str:
    """The pretraining workdir of ``path`` (the workdir or its checkpoints folder)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no such directory: {path!r}; pass a pretraining workdir (the --workdir of "
            f"main.py, holding {CONFIG_FILE} and checkpoints/) or its checkpoints/ folder")
    path = os.path.abspath(path)
    if (os.path.basename(os.path.normpath(path)) == "checkpoints"
            and not os.path.exists(os.path.join(path, CONFIG_FILE))):
        return os.path.dirname(os.path.normpath(path))
    return path


def _read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{workdir} has no {CONFIG_FILE}, which names the encoder's architecture and image "
            f"size; pass the pretraining workdir that main.py wrote (it holds {CONFIG_FILE} "
            "next to checkpoints/), or its checkpoints/ folder")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if "model" not in config or "image_size" not in config:
        raise ValueError(f"{path} is not a pretraining config: it lacks 'model' or 'image_size'")
    return ml_collections.ConfigDict(config)


class Encoder:
    """A restored encoder: ``embed(images)`` -> features (see the module docstring)."""

    def __init__(self, model: models.SimCLR, variables: dict, image_size: int, *,
                 mesh: jax.sharding.Mesh, head_layer: int = 0, batch_size: int = 256, step: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        devices = mesh.devices.size
        self.model, self.variables, self.mesh = model, variables, mesh
        self.image_size, self.head_layer, self.step = int(image_size), head_layer, step
        self.batch_size = -(-batch_size // devices) * devices  # a multiple of the device count
        self._features = evaluate.make_feature_fn(model, head_layer)
        shape = jax.ShapeDtypeStruct((devices, self.image_size, self.image_size, 3), np.float32)
        self.feature_dim = int(jax.eval_shape(self._features, variables, shape).shape[-1])
        size = self.image_size

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def preprocess(images):
            return tf.map_fn(lambda image: augment.eval_view(image, size, size), images,
                             fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))

        self._preprocess = preprocess

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> the evaluation views, float32 [B, S, S, 3] in [0, 1]."""
        with tf.device("/CPU:0"):  # host-side, like the input pipeline
            return self._preprocess(tf.constant(images)).numpy()

    def embed(self, images) -> np.ndarray:
        """uint8 images [B, H, W, 3] (or one [H, W, 3]) -> float32 features [B, D] (or [D])."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
            raise ValueError(
                f"embed expects uint8 RGB images of shape [B, H, W, 3] (or one [H, W, 3]) with "
                f"values 0..255, got {images.dtype} {images.shape}"
                + ("; convert [0, 1] floats with (x * 255).round().astype(np.uint8)"
                   if images.dtype.kind == "f" else ""))
        if images.ndim == 3:
            return self.embed(images[None])[0]
        if min(images.shape[1:3]) < 1:
            raise ValueError(f"embed got empty images, shape {images.shape}")
        n, chunk = len(images), self.batch_size
        outputs = []
        for start in range(0, n, chunk):
            views = self.preprocess(images[start:start + chunk])
            rows = len(views)
            if rows < chunk:  # pad to the compiled shape
                views = np.concatenate([views, np.zeros((chunk - rows,) + views.shape[1:], views.dtype)])
            # Dispatch is asynchronous: the next chunk is preprocessed while this one runs.
            outputs.append((self._features(self.variables, sharding.put_batch(views, self.mesh)), rows))
        features = [np.asarray(jax.device_get(out))[:rows] for out, rows in outputs]
        if not features:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.concatenate(features).astype(np.float32, copy=False)

    def __repr__(self):
        return (f"Encoder(depth={self.model.depth}, width_multiplier={self.model.width_multiplier}, "
                f"image_size={self.image_size}, feature_dim={self.feature_dim}, step={self.step}, "
                f"head_layer={self.head_layer}, devices={self.mesh.devices.size})")


def load_encoder(path: str, *, step: Optional[int] = None, head_layer: int = 0,
                 batch_size: int = 256) -> Encoder:
    """Restores the encoder of a pretraining workdir (or its checkpoints/ folder).

    ``step``: the checkpoint to read (default: the latest). ``head_layer``: 0
    returns h, the encoder's output; i >= 1 the output of projection-head
    layer i. ``batch_size``: images per compiled chunk (rounded up to a
    multiple of the device count). Runs on this process's devices.
    """
    workdir = _workdir(path)
    config = _read_config(workdir)
    model = models.model_from_config(config.model)
    evaluate.make_feature_fn(model, head_layer)  # a bad head_layer fails before restoring
    mesh = sharding.make_mesh(jax.local_devices())
    variables, restored_step = evaluate.encoder_variables(
        model, int(config.image_size), workdir, mesh=mesh, step=step)
    return Encoder(model, variables, config.image_size, mesh=mesh, head_layer=head_layer,
                   batch_size=batch_size, step=int(restored_step))
