"""A pretrained encoder: model, restored variables and architecture, in one object.

    encoder = simclr_jax.load_encoder("runs/smoke")  # a pretraining workdir
    h = encoder.embed(images)                        # uint8 [B, H, W, 3] -> float32 [B, D]

The architecture and image size come from the workdir's ``config.json``
(written by pretraining), the weights from its latest (or a chosen)
checkpoint. Every evaluation protocol starts from the same object
(``restore_encoder``), so user code and the protocols see the same features.
``embed`` applies the evaluation preprocessing (``augment.eval_view``: uint8
-> [0, 1], a centre crop for images larger than CIFAR's 32 px, bicubic resize
to the training size) and runs the jitted feature function in fixed-size
chunks split over this process's devices, so it compiles once.
"""
from typing import Optional

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from simclr_jax import sharding
from simclr_jax.data import augment
from simclr_jax.errors import CheckpointError
from simclr_jax.models import model_from_config
from simclr_jax.models.classifier import feature_function
from simclr_jax.weights import pretrained


class Encoder:
    """A restored encoder: ``embed(images)`` -> features (see the module docstring).

    ``model_config`` and ``image_size`` are the architecture it was trained
    with; ``variables`` its {'params', 'batch_stats'}, replicated on ``mesh``;
    ``supervised_head`` the classifier {'kernel', 'bias'} that ``logits``
    applies (an official checkpoint's head or our online probe), or None.
    """

    def __init__(self, model_config: ml_collections.ConfigDict, variables: dict, image_size: int, *,
                 mesh: jax.sharding.Mesh, head_layer: int = 0, batch_size: int = 256, step: int = 0,
                 supervised_head: Optional[dict] = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model_config, self.model = model_config, model_from_config(model_config)
        self.variables, self.mesh, self.step = variables, mesh, step
        self.image_size, self.head_layer = int(image_size), head_layer
        devices = mesh.devices.size
        self.batch_size = -(-batch_size // devices) * devices  # a multiple of the device count
        self._features = feature_function(self.model, head_layer)
        self.supervised_head = supervised_head
        self._logits = jax.jit(lambda v, head, x: self._features(v, x) @ head["kernel"] + head["bias"])
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
                f"embed expects uint8 RGB images of shape [B, H, W, 3] (or one [H, W, 3]) with values 0..255, "
                f"got {images.dtype} {images.shape}"
                + ("; convert [0, 1] floats with (x * 255).round().astype(np.uint8)" if images.dtype.kind == "f"
                   else ""))
        if images.ndim == 3:
            return self.embed(images[None])[0]
        if min(images.shape[1:3]) < 1:
            raise ValueError(f"embed got empty images, shape {images.shape}")
        return self._in_chunks(lambda views: self._features(self.variables, views), images, self.preprocess,
                               self.feature_dim)

    def embed_views(self, views) -> np.ndarray:
        """float32 views [B, S, S, 3] in [0, 1], already preprocessed as you wish
        (any S the network takes) -> features [B, D] of ``head_layer``."""
        views = self._check_views(views)
        return self._in_chunks(lambda x: self._features(self.variables, x), views, None, self.feature_dim)

    def logits(self, views) -> np.ndarray:
        """The supervised head's logits [B, C] on the ``head_layer`` features of
        ``views`` (as ``embed_views`` takes them). The head is an official
        checkpoint's (the released models' linear-evaluation head on h, or a
        fine-tuned classifier: SimCLR v2's sit on head layer 1) or our online
        probe (on h)."""
        if self.supervised_head is None:
            raise ValueError("this encoder has no supervised head: official checkpoints saved with one "
                             "(lineareval_while_pretraining, or fine-tuned) and our runs with "
                             "config.online_probe=True on a labelled dataset carry it")
        inputs = self.supervised_head["kernel"].shape[0]
        if inputs != self.feature_dim:
            raise ValueError(f"the supervised head takes {inputs} features but head_layer={self.head_layer} "
                             f"gives {self.feature_dim}; load the encoder with the head_layer it was trained on")
        views = self._check_views(views)
        return self._in_chunks(lambda x: self._logits(self.variables, self.supervised_head, x), views, None,
                               self.supervised_head["bias"].shape[0])

    def _check_views(self, views) -> np.ndarray:
        views = np.asarray(views)
        if views.ndim != 4 or views.shape[-1] != 3 or views.dtype.kind != "f":
            raise ValueError(f"expected float views [B, S, S, 3] in [0, 1], got {views.dtype} {views.shape}; "
                             "for uint8 images of any size use embed()")
        return views.astype(np.float32, copy=False)

    def _in_chunks(self, fn, inputs, prepare, width: int) -> np.ndarray:
        """fn over fixed-size chunks of ``inputs`` (the last one padded), split over the mesh."""
        chunk, outputs = self.batch_size, []
        for start in range(0, len(inputs), chunk):
            views = inputs[start:start + chunk] if prepare is None else prepare(inputs[start:start + chunk])
            rows = len(views)
            if rows < chunk:  # pad to the compiled shape
                views = np.concatenate([views, np.zeros((chunk - rows,) + views.shape[1:], views.dtype)])
            # Dispatch is asynchronous: the next chunk is prepared while this one runs.
            outputs.append((fn(sharding.put_batch(views, self.mesh)), rows))
        if not outputs:
            return np.zeros((0, width), np.float32)
        return np.concatenate([np.asarray(jax.device_get(out))[:rows] for out, rows in outputs]).astype(
            np.float32, copy=False)

    def __repr__(self):
        return (f"Encoder(depth={self.model.depth}, width_multiplier={self.model.width_multiplier}, "
                f"image_size={self.image_size}, feature_dim={self.feature_dim}, step={self.step}, "
                f"head_layer={self.head_layer}, devices={self.mesh.devices.size})")


def load_encoder(path: str, *, step: Optional[int] = None, head_layer: Optional[int] = None, batch_size: int = 256,
                 random_init_seed: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None) -> Encoder:
    """Restores the encoder of a pretraining workdir (or its checkpoints/ folder),
    of an official SimCLR TF2 checkpoint: a SavedModel directory (as
    released), a training CheckpointManager directory or a ``ckpt-N`` prefix,
    its architecture read from the variables (see official_tf2.py), or of a
    torchvision ResNet state_dict saved as ``*.safetensors`` (its fc as the
    supervised head; see weights/torchvision.py).

    ``step``: our checkpoint to read (default: the latest). ``head_layer``: 0
    returns h, the encoder's output; i >= 1 the output of projection-head
    layer i (also what ``logits`` feeds the supervised head); default: the
    layer the path's supervised head reads (a fine-tuned network's
    config.json says it; else 0). ``batch_size``:
    images per compiled chunk of ``embed`` (rounded up to a multiple of the
    device count). ``random_init_seed``: the same architecture at random
    initialisation instead (the baseline; reads only the architecture).
    ``mesh``: default this process's devices.
    """
    if head_layer and pretrained.source(path) == "torchvision":
        raise CheckpointError(f"head_layer={head_layer}: {path} is a torchvision ResNet, which has no projection "
                              "head; load it with head_layer=0 (its features h)")
    mesh = mesh or sharding.make_mesh(jax.local_devices())
    trained = pretrained.architecture(path)
    model_config, image_size = trained.model, int(trained.image_size)
    head_layer = trained.head_layer if head_layer is None else head_layer
    model = model_from_config(model_config)
    feature_function(model, head_layer)  # a bad head_layer fails before restoring
    if random_init_seed is not None:
        variables, head, step = pretrained.random_variables(model, image_size, random_init_seed, mesh), None, 0
    else:
        variables, head, step = pretrained.restore(path, model, image_size, mesh, step)
    return Encoder(model_config, variables, image_size, mesh=mesh, head_layer=head_layer, batch_size=batch_size,
                   step=int(step), supervised_head=head)
