"""Our encoders as SavedModels in the official SimCLR TF2 format, for TensorFlow users.

    python -m simclr_jax.export --pretrained=WORKDIR --out=DIR [--step=N]   (simclr_jax/export.py)

The SavedModel is what google-research/simclr's ``tf2/run.py`` saves (the
format of the released TF2 checkpoints): ``m = tf.saved_model.load(DIR)``,
then ``m(images, trainable=False)`` (float32 [B, H, W, 3] in [0, 1]) returns
the dict ``OUTPUTS``, and ``m.trainable_variables_list`` holds the trainable
variables under the names the official Keras code gives them
(official_tf2.official_names), in its order; the BatchNorm moving statistics
are in ``m.non_trainable_variables_list``. So code written for the released
models runs on ours, and ``simclr_jax.load_encoder(DIR)`` (or the official
import) reads the file back.

The network is our Flax model converted with jax2tf (serialized for CPU, GPU
and TPU), the variables passed in as arguments, not constants, so they stay
``tf.Variable``s a TF user can read, and fine-tune: gradients are exported.
``trainable=True`` runs BatchNorm on the batch's statistics, as the official
model in training mode does, without updating the moving statistics. Any
batch size; height and width must be multiples of the encoder's total stride
(8 with the CIFAR stem, 32 otherwise; CIFAR's 32 and ImageNet's 224 are):
jax2tf cannot differentiate a strided convolution over a symbolic size that
is not.
"""
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from flax import traverse_util
from jax.experimental import jax2tf

from simclr_jax import storage
from simclr_jax.models import resnet
from simclr_jax.weights import official_tf2

PLATFORMS = ("cpu", "cuda", "tpu")  # the serialized computation runs on any of them
OUTPUTS = ("initial_conv", "initial_max_pool", "block_group1", "block_group2", "block_group3", "block_group4",
           "final_avg_pool", "proj_head_input", "proj_head_output", "logits_sup")  # logits_sup: with a supervised head


def export_saved_model(encoder, directory: str) -> str:
    """Writes ``encoder`` (a ``simclr_jax.Encoder``) as an official-format
    SavedModel at ``directory`` (a local path or a bucket URL) and returns it.
    Locally it is written into a temporary sibling folder and renamed at the
    end, so a failure leaves nothing behind; into a bucket it is uploaded from
    a local temporary folder with ``saved_model.pb`` last, so a partial upload
    is not a SavedModel. An existing non-empty ``directory`` is an error,
    never overwritten."""
    directory = storage.resolve(directory)
    _check_target(directory)
    module = _module(encoder)
    if storage.is_url(directory):
        with tempfile.TemporaryDirectory() as local:
            tf.saved_model.save(module, local)
            _check_target(directory)  # nothing appeared meanwhile
            storage.copy_tree(local, directory, last=("saved_model.pb",))
        return directory
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp's 0700 -> what mkdir would give
        tf.saved_model.save(module, partial)
        _check_target(directory)  # nothing appeared meanwhile
        if os.path.isdir(directory):
            os.rmdir(directory)  # empty
        os.rename(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory


def _check_target(directory: str) -> None:
    if storage.isdir(directory) and storage.listdir(directory):
        raise FileExistsError(f"{directory} exists and is not empty: export writes a new SavedModel directory; "
                              "choose another --out, or delete that one first")
    if storage.exists(directory) and not storage.isdir(directory):
        raise FileExistsError(f"{directory} is a file: export writes a directory there; choose another --out")


def _variables(encoder) -> dict[str, tf.Variable]:
    """{our path: tf.Variable under its official name}, in the official order."""
    head = encoder.supervised_head
    values = traverse_util.flatten_dict(jax.device_get(dict(encoder.variables)), sep="/")
    if head is not None:
        values.update({f"{official_tf2.SUPERVISED_HEAD}/{k}": np.asarray(jax.device_get(v)) for k, v in head.items()})
    names = official_tf2.official_names(encoder.model_config, 0 if head is None else int(head["bias"].shape[0]))
    if set(names) != set(values):
        raise ValueError("the encoder's variables do not fit its architecture's official names: unnamed "
                         f"{sorted(set(values) - set(names))[:5]}, missing {sorted(set(names) - set(values))[:5]}")
    return {path: tf.Variable(np.asarray(values[path], np.float32), name=name,
                              trainable=not path.startswith("batch_stats/"))
            for path, name in names.items()}


def _forward(encoder, train: bool):
    """JAX function (flat variables, images) -> the official dict of outputs."""
    model, head_layer = encoder.model, encoder.head_layer

    def hidden(module, images):
        h = module.encoder(images, train)
        return module.head(h, train, return_all=True)  # [h, head layer 1, ..., z]

    def forward(flat, images):
        variables = traverse_util.unflatten_dict(
            {k: v for k, v in flat.items() if not k.startswith(official_tf2.SUPERVISED_HEAD)}, sep="/")
        mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
        hiddens, state = model.apply(variables, images, method=hidden, mutable=mutable)
        outputs = {name: maps[0] for name, maps in state["intermediates"]["encoder"].items()}
        outputs.update(final_avg_pool=hiddens[0], proj_head_input=hiddens[0], proj_head_output=hiddens[-1])
        if f"{official_tf2.SUPERVISED_HEAD}/kernel" in flat:
            kernel, bias = (flat[f"{official_tf2.SUPERVISED_HEAD}/{k}"] for k in ("kernel", "bias"))
            outputs["logits_sup"] = jnp.dot(hiddens[head_layer], kernel) + bias
        return {name: jnp.asarray(value, jnp.float32) for name, value in outputs.items()}

    return forward


def _module(encoder) -> tf.Module:
    """The tf.Module the official run.py saves: ``__call__(inputs, trainable)``
    traced for both values of ``trainable``, and the variable lists."""
    config, head = encoder.model_config, encoder.supervised_head
    if config.sk_ratio > 0 and config.cifar_stem and resnet.RESNET_STAGES[config.depth][0] == "basic":
        raise ValueError("a basic-block ResNet with the CIFAR stem and sk_ratio > 0 (ResNet-D shortcuts, no "
                         "selective kernels) has the same variables as one with sk_ratio = 0, so the official "
                         "format cannot say which it is: the file would be read back as the other network. "
                         "Export models with sk_ratio = 0, a bottleneck ResNet (depth >= 50) or the ImageNet stem")
    if not config.cifar_stem and config.get("stem_pool_padding", "same") != "same":
        raise ValueError("this encoder's stem max-pool pads symmetrically (torchvision's), the official network's "
                         "pads as TensorFlow's SAME: the SavedModel would compute another network. Export it with "
                         "--format=torchvision, or keep it in JAX")
    if head is not None and head["kernel"].shape[0] != encoder.feature_dim:
        raise ValueError(f"the supervised head takes {head['kernel'].shape[0]} features but head_layer="
                         f"{encoder.head_layer} gives {encoder.feature_dim}; load the encoder with the "
                         "head_layer the head was trained on")
    variables = _variables(encoder)
    stride = 8 if encoder.model.cifar_stem else 32  # the encoder's total downsampling
    converted = {train: jax2tf.convert(_forward(encoder, train), native_serialization_platforms=PLATFORMS,
                                       polymorphic_shapes=[None, f"(b, {stride}*h, {stride}*w, 3)"])
                 for train in (False, True)}

    class SimCLRModel(tf.Module):
        """The official SavedModel's interface (google-research/simclr tf2/run.py)."""

        def __init__(self):
            super().__init__()
            # Not ``trainable_variables``: tf.Module has a getter of that name (as in the official code).
            self.trainable_variables_list = [v for v in variables.values() if v.trainable]
            self.non_trainable_variables_list = [v for v in variables.values() if not v.trainable]

        @tf.function(autograph=False)
        def __call__(self, inputs, trainable):
            check = tf.debugging.assert_equal(
                tf.shape(inputs)[1:3] % stride, 0,
                message=f"this SavedModel takes images whose height and width are multiples of {stride}")
            with tf.control_dependencies([check]):
                return converted[bool(trainable)](variables, tf.identity(inputs))

    module = SimCLRModel()
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    for trainable in (True, False):
        module.__call__.get_concrete_function(spec, trainable=trainable)
    return module
