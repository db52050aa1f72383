"""Where pretrained weights come from: our pretraining workdirs, official SimCLR
checkpoints and torchvision ResNet state_dicts (safetensors files).

``architecture(path)`` is what ``path`` was trained with: our workdir's
config.json, or what an official checkpoint's variables (official_tf2) or a
state_dict's keys and shapes (torchvision) say.
``restore(path, ...)`` reads its variables onto a mesh, with its supervised
head when it has one: an official checkpoint's linear-evaluation or
fine-tuned head, or our online probe (the same thing: a linear classifier
trained on stop_gradient(h) beside pretraining). Evaluation (``load_encoder``)
and pretraining's ``init_from`` both read weights through here.
"""
import contextlib
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import config_validation, sharding, storage
from simclr_jax.errors import CheckpointError
from simclr_jax.models import SimCLR
from simclr_jax.weights import checkpoint, official_tf2, torchvision
from simclr_jax.weights.checkpoint import PROBE


@contextlib.contextmanager
def _reading(path: str, official: bool):
    """Reading errors as CheckpointError; an official file's name the path (ours already do)."""
    try:
        yield
    except (OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {e}" if official else str(e)) from e


def official_prefix(path: str) -> Optional[str]:
    """The TF checkpoint prefix of an official checkpoint; None for our workdirs."""
    if storage.isdir(path) and storage.exists(storage.join(checkpoint.run_workdir(path), checkpoint.CONFIG_FILE)):
        return None
    return official_tf2.variables_prefix(path)


def source(path: str) -> str:
    """What ``path`` holds: 'torchvision' (a *.safetensors state_dict),
    'official' (an official TF2 checkpoint) or 'ours' (a workdir); the one
    dispatch every reader below goes through."""
    if torchvision.is_state_dict(path):
        return "torchvision"
    with _reading(path, official=False):
        return "ours" if official_prefix(path) is None else "official"


def _torchvision(path: str) -> tuple[dict, dict, int]:
    """(tensors, our model config, fc classes) of a torchvision state_dict file."""
    with _reading(path, official=True):
        tensors, metadata = torchvision.read(path)
        model, classes = torchvision.infer(tensors, metadata, path)
    return tensors, model, classes


def architecture(path: str) -> ml_collections.ConfigDict:
    """{'model', 'image_size', 'head_layer', 'protocol'} that ``path`` was
    trained with: the architecture fields alone (config_validation.MODEL_FIELDS),
    not how the run computed; the layer its supervised head reads (0 = h, but
    for a network fine-tuned from a head layer, whose config.json says which);
    the protocol that wrote it ('finetune', 'distill'; None for pretraining
    workdirs and official checkpoints)."""
    kind = source(path)
    if kind == "torchvision":
        model = _torchvision(path)[1]
        return ml_collections.ConfigDict(dict(model=model, image_size=32 if model["cifar_stem"] else 224,
                                              head_layer=0, protocol=None))
    if kind == "ours":
        with _reading(path, official=False):
            run_config = checkpoint.read_run_config(checkpoint.run_workdir(path))
        model = {name: run_config.model[name] for name in config_validation.MODEL_FIELDS}  # not how it computed
        return ml_collections.ConfigDict(dict(model=model, image_size=run_config.image_size,
                                              head_layer=run_config.get("head_layer", 0),
                                              protocol=run_config.get("protocol")))
    with _reading(path, official=True):
        model_config, _, image_size = official_tf2.infer(official_tf2.read_variables(official_prefix(path),
                                                                                     shapes_only=True))
    return ml_collections.ConfigDict(dict(model=model_config.to_dict(), image_size=image_size, head_layer=0,
                                          protocol=None))


def resolve(path: str, model, *, field: str, image_size=None, unset_ok: bool = False) -> ml_collections.ConfigDict:
    """The architecture of ``path`` (as ``architecture``), checked against the
    config's ``model`` fields (and ``image_size``, when given) that are set:
    the one resolver pretraining's init_from, evaluation and distillation
    call. A set field that differs is a ConfigError naming each, with the
    value to set (a torchvision ResNet has no projection head: the config's
    head fields stand); ``unset_ok``: the recipe may leave fields None to take the
    checkpoint's (evaluation, distillation). ``field`` names the config
    field that holds ``path``."""
    trained = architecture(path)
    unrecorded = torchvision.UNRECORDED_FIELDS if source(path) == "torchvision" else ()  # the config's own head
    pairs = [(f"model.{name}", model[name], trained.model[name]) for name in config_validation.MODEL_FIELDS
             if name not in unrecorded]
    if image_size is not None:
        pairs.append(("image_size", image_size, trained.image_size))
    conflicts = [f"--config.{name}={want!r} (the config has {have!r})" for name, have, want in pairs
                 if have is not None and have != want]
    if conflicts:
        raise config_validation.ConfigError(
            f"config.{field}={path!r} holds another architecture: set " + ", ".join(conflicts)
            + (", or leave them unset (None) to take the checkpoint's" if unset_ok else ""))
    return trained


def supervised_head_classes(path: str, step: Optional[int] = None) -> int:
    """The class count of ``path``'s supervised head (0: none), from metadata
    alone: nothing is restored. ``step``: our checkpoint (None: the latest)."""
    kind = source(path)
    if kind == "torchvision":
        return _torchvision(path)[2]
    if kind == "official":
        with _reading(path, official=True):
            return official_tf2.infer(official_tf2.read_variables(official_prefix(path), shapes_only=True))[1]
    with _reading(path, official=False):
        return checkpoint.saved_head_classes(checkpoint.run_workdir(path), PROBE, step)


def abstract_variables(model: SimCLR, image_size: int, mesh) -> dict:
    """{'params', 'batch_stats'} as ShapeDtypeStructs, replicated on ``mesh``: what a restore fills in."""
    replicated = sharding.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        jax.eval_shape(lambda key: _init(model, image_size, key), jax.random.key(0, impl="rbg")))


def random_variables(model: SimCLR, image_size: int, seed: int, mesh) -> dict:
    """{'params', 'batch_stats'} at random initialisation, replicated on ``mesh``."""
    return jax.jit(lambda key: _init(model, image_size, key), out_shardings=sharding.replicated(mesh))(
        jax.random.key(seed, impl="rbg"))


def _init(model: SimCLR, image_size: int, key) -> dict:
    return dict(model.init(key, jnp.zeros((1, image_size, image_size, 3)), train=False))


def restore(path: str, model: SimCLR, image_size: int, mesh,
            step: Optional[int] = None) -> tuple[dict, Optional[dict], int]:
    """(variables, supervised head {'kernel', 'bias'} or None, step) of ``path``,
    replicated on ``mesh``. ``step``: our checkpoint to read (None: the latest).
    A torchvision state_dict's step is its ``num_batches_tracked``, and its
    projection head (it has none) the model's initialisation with seed 0."""
    abstract = abstract_variables(model, image_size, mesh)
    kind = source(path)
    if kind == "torchvision":
        return _restore_torchvision(path, model, abstract, mesh)
    prefix = official_prefix(path) if kind == "official" else None
    if prefix is not None:
        with _reading(path, official=True):
            tree, head = official_tf2.to_flax(official_tf2.read_variables(prefix), model, abstract)
        head = None if head is None else sharding.put_replicated(head, mesh)
        return sharding.put_replicated(tree, mesh), head, official_tf2.step_of(prefix)
    with _reading(path, official=False):
        variables, step = checkpoint.restore_variables(checkpoint.run_workdir(path), abstract, step,
                                                       optional_params=(PROBE,))
    head = variables["params"].pop(PROBE, None)
    return variables, head, step


def _restore_torchvision(path: str, model: SimCLR, abstract: dict, mesh) -> tuple[dict, Optional[dict], int]:
    tensors, trained, _ = _torchvision(path)
    encoder, head, step = torchvision.to_flax(tensors, trained["depth"])
    feature_dim = abstract["params"]["head"]["dense1"]["kernel"].shape[0]
    fresh = torchvision.fresh_head(model, feature_dim)
    variables = {c: {"encoder": encoder[c]["encoder"], "head": fresh[c]} for c in ("params", "batch_stats")}
    shapes = lambda tree: jax.tree.map(lambda leaf: tuple(leaf.shape), tree)
    if shapes(variables) != shapes(abstract):
        raise CheckpointError(f"{path} holds torchvision's ResNet-{trained['depth']}"
                              f"{' (CIFAR stem)' if trained['cifar_stem'] else ''}, not this model's encoder "
                              f"(depth {model.depth}, width {model.width_multiplier}, cifar_stem {model.cifar_stem})")
    head = None if head is None else sharding.put_replicated(head, mesh)
    return sharding.put_replicated(variables, mesh), head, step
