"""torchvision ResNet state_dicts <-> our encoder's variables, in safetensors files.

A torchvision ``resnetNN()`` holds the layers of our 'torchvision' variant at
width 1: ``conv1``/``bn1`` is our stem, ``layer{s}.{b}`` our
``stage{s}_block{b+1}``, ``downsample.0/1`` its projection shortcut, ``fc``
the supervised head on h. PyTorch stores convolution kernels OIHW (ours are
HWIO), ``fc.weight`` [out, in] (ours [in, out]), BatchNorm's gamma and beta
as ``weight``/``bias`` beside ``running_mean``/``running_var`` and an int64
``num_batches_tracked``. A 3x3 ``conv1`` is the CIFAR stem (with
``maxpool = Identity()``, the usual PyTorch SimCLR swap).

Two things the keys do not hold are carried so a round trip is exact:
``num_batches_tracked`` (one count, the encoder's step, written to every
BatchNorm) and how the ImageNet stem's max-pool pads. torchvision pads it 1
on each side ('symmetric'); the official SimCLR and our default pool as
TensorFlow's SAME. An export of a 'same' encoder says so in the file's
metadata (``POOL_METADATA``), which the import reads; a file without it is
torchvision's. The file is read and written as bytes through ``storage``,
so a bucket URL works.
"""
import functools
import json
import struct
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from simclr_jax import storage
from simclr_jax.errors import CheckpointError, UserError
from simclr_jax.models import ProjectionHead, ResNet, resnet

SUFFIX = ".safetensors"
POOL_METADATA = "simclr_jax.stem_pool_padding"  # present only where the pooling is not torchvision's
UNRECORDED_FIELDS = ("head_layers", "proj_dim")  # no projection head in a torchvision ResNet
_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_COUNTER = "num_batches_tracked"
_INSTEAD = ("keep it in JAX (simclr_jax.load_encoder), or export it to the official TF2 SavedModel format "
            "(python -m simclr_jax.export --format=saved_model)")


def is_state_dict(path: str) -> bool:
    """Whether ``path`` names a safetensors file (what this module reads)."""
    return str(path).endswith(SUFFIX)


# --------------------------------------------------------------------------- the layout

def _layers(depth: int) -> list[tuple[str, str, str]]:
    """(torchvision module, our module under 'encoder/', 'conv' or 'bn') of
    torchvision's resnet of ``depth``, stem first."""
    kind, _ = resnet.RESNET_STAGES[depth]
    layers = [("conv1", "stem_conv", "conv"), ("bn1", "stem_bn", "bn")]
    for stage, projects in enumerate(resnet.block_projections(depth, 1.0, "torchvision")):
        for block, project in enumerate(projects):
            theirs, ours = f"layer{stage + 1}.{block}", f"stage{stage + 1}_block{block + 1}"
            for i in range(1, 4 if kind == "bottleneck" else 3):
                layers += [(f"{theirs}.conv{i}", f"{ours}/conv{i}", "conv"), (f"{theirs}.bn{i}", f"{ours}/bn{i}", "bn")]
            if project:
                layers += [(f"{theirs}.downsample.0", f"{ours}/proj_conv", "conv"),
                           (f"{theirs}.downsample.1", f"{ours}/proj_bn", "bn")]
    return layers


def _keys(depth: int) -> dict[str, tuple[str, str]]:
    """{torchvision key: (our collection, our path under 'encoder/')}; counters map to ('', '')."""
    keys = {}
    for theirs, ours, kind in _layers(depth):
        if kind == "conv":
            keys[f"{theirs}.weight"] = ("params", f"{ours}/kernel")
            continue
        keys.update({f"{theirs}.{field}": (collection, f"{ours}/{leaf}")
                     for field, (collection, leaf) in _BN_FIELDS.items()})
        keys[f"{theirs}.{_COUNTER}"] = ("", "")
    return keys


# --------------------------------------------------------------------------- exporting

def check_exportable(model_config) -> None:
    """One UserError listing every part of ``model_config`` that torchvision's
    ResNet cannot express, with what to do instead; nothing when it can."""
    problems = []
    if float(model_config.width_multiplier) != 1.0:
        problems.append(f"width_multiplier={model_config.width_multiplier} (torchvision's resnetNN() has width 1; "
                        "its wide_resnet50_2 widens only the 3x3 convolutions)")
    if float(model_config.sk_ratio) > 0:
        problems.append(f"sk_ratio={model_config.sk_ratio} (selective kernels and the ResNet-D stem and shortcuts "
                        "of SimCLR v2)")
    if float(model_config.se_ratio) > 0:
        problems.append(f"se_ratio={model_config.se_ratio} (squeeze-excitation)")
    if resnet.block_projections(int(model_config.depth), 1.0, str(model_config.variant))[0][0] != \
            resnet.block_projections(int(model_config.depth), 1.0, "torchvision")[0][0]:
        problems.append(f"variant='{model_config.variant}' at depth {model_config.depth} (a projection shortcut on "
                        "the first block of layer1, which torchvision's ResNet-18/34 has not)")
    if problems:
        raise UserError("torchvision's ResNet cannot hold this encoder: " + "; ".join(problems) + ". Instead, "
                        + _INSTEAD)


def check_target(path: str) -> None:
    """UserError unless ``path`` is a new file named *.safetensors (never overwritten)."""
    if not is_state_dict(path):
        raise UserError(f"{path}: a torchvision state_dict is written as a safetensors file; name it *{SUFFIX} "
                        "(load_encoder recognises it by that suffix)")
    if storage.exists(path):
        raise UserError(f"{path} exists: export writes a new file; choose another --out, or delete that one first")


def state_dict(model_config, variables: dict, head: Optional[dict], step: int) -> dict[str, np.ndarray]:
    """torchvision's state_dict of our encoder ``variables`` ({'params',
    'batch_stats'} with 'encoder' in each), with ``fc`` from ``head``
    ({'kernel', 'bias'} on h) when given; every ``num_batches_tracked`` is
    ``step``."""
    check_exportable(model_config)
    flat = traverse_util.flatten_dict(jax.device_get({c: variables[c]["encoder"] for c in ("params", "batch_stats")}),
                                      sep="/")
    tensors = {}
    for key, (collection, path) in _keys(int(model_config.depth)).items():
        if not collection:
            tensors[key] = np.array(step, np.int64)
            continue
        value = np.asarray(flat[f"{collection}/{path}"], np.float32)
        tensors[key] = np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value)  # HWIO->OIHW
    if head is not None:
        tensors["fc.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(head["kernel"]), np.float32).T)
        tensors["fc.bias"] = np.asarray(jax.device_get(head["bias"]), np.float32)
    return tensors


def export_torchvision(encoder, path: str) -> str:
    """Writes ``encoder`` (a ``simclr_jax.Encoder``: ResNet-18..152, width 1,
    'torchvision' layout, CIFAR or ImageNet stem) as a torchvision state_dict
    in the safetensors file ``path`` (local or a bucket URL, named *.safetensors,
    never overwritten) and returns it. ``fc`` is the encoder's supervised head
    on h when it has one; without one the file has no ``fc.*`` keys (set
    ``model.fc = torch.nn.Identity()``: the model then returns h). Every
    refusal is a UserError raised before anything is written."""
    config, head = encoder.model_config, encoder.supervised_head
    check_exportable(config)
    check_target(path)
    if head is not None and encoder.head_layer != 0:
        raise UserError(f"this encoder's supervised head reads projection-head layer {encoder.head_layer}, "
                        "torchvision's fc reads the pooled features h; " + _INSTEAD)
    tensors = state_dict(config, encoder.variables, head, int(encoder.step))
    same = not config.cifar_stem and config.get("stem_pool_padding", "same") == "same"
    storage.write_bytes(path, safetensors.numpy.save(tensors, metadata={POOL_METADATA: "same"} if same else None))
    return path


# --------------------------------------------------------------------------- importing

def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of the safetensors file ``path``; CheckpointError if unreadable."""
    if not storage.exists(path):
        raise CheckpointError(f"no such file: {path!r}; pass a torchvision state_dict saved with "
                              "safetensors.torch.save_file(model.state_dict(), path)")
    data = storage.read_bytes(path)
    try:
        tensors = safetensors.numpy.load(data)
        (size,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
    except Exception as e:  # noqa: BLE001 (safetensors' Rust error has no Python base class to name)
        raise CheckpointError(f"{path}: cannot read it as safetensors ({type(e).__name__}: {str(e)[:200]}); is it "
                              "complete? A torch.save() pickle (.pt, .pth) is not: in PyTorch, "
                              "safetensors.torch.save_file(model.state_dict(), path) writes one") from None
    return tensors, metadata


def infer(tensors: dict[str, np.ndarray], metadata: dict[str, str], path: str) -> tuple[dict, int]:
    """(our model config, fc classes or 0) of a torchvision ResNet state_dict,
    from its keys and shapes: bottleneck or basic blocks, depth from blocks
    per layer, the stem from conv1's kernel size, classes from fc. Any other
    key set, missing or extra keys, or shapes of another width are one
    CheckpointError naming them."""
    _check_is_resnet(tensors, path)
    bottleneck = "layer1.0.conv3.weight" in tensors
    counts = tuple(len({k.split(".")[1] for k in tensors if k.startswith(f"layer{s}.")}) for s in range(1, 5))
    kind = "bottleneck" if bottleneck else "basic"
    depth = next((d for d, stages in resnet.RESNET_STAGES.items() if stages == (kind, counts)), None)
    if depth is None:
        raise CheckpointError(f"{path}: {kind} blocks {counts} per layer are no ResNet depth of "
                              f"{resnet.VALID_DEPTHS}; export a torchvision resnet18/34/50/101/152")
    cifar_stem = tuple(tensors["conv1.weight"].shape[2:]) == (3, 3)
    pool = metadata.get(POOL_METADATA, "same" if cifar_stem else "symmetric")  # CIFAR: no max-pool to pad
    if pool not in resnet.STEM_POOL_PADDINGS:
        raise CheckpointError(f"{path}: metadata {POOL_METADATA}={pool!r}, expected one of {resnet.STEM_POOL_PADDINGS}")
    model = dict(depth=depth, width_multiplier=1.0, cifar_stem=cifar_stem, head_layers=2, proj_dim=128,
                 variant="torchvision", sk_ratio=0.0, se_ratio=0.0, stem_pool_padding=pool)
    _check_keys_and_shapes(tensors, model, path)
    return model, int(tensors["fc.weight"].shape[0]) if "fc.weight" in tensors else 0


def _check_is_resnet(tensors, path: str) -> None:
    if "conv1.weight" in tensors and any(k.startswith("layer4.") for k in tensors):
        return
    prefix = next((k[:-len("conv1.weight")] for k in tensors if k.endswith(".conv1.weight")
                   and f"{k[:-len('conv1.weight')]}layer4.0.conv1.weight" in tensors), None)
    hint = (f"its keys start with {prefix!r} (a ResNet inside another module): save that module's own "
            f"state_dict, e.g. model.{prefix.rstrip('.')}.state_dict()" if prefix else
            "only torchvision.models.resnet18/34/50/101/152 (conv1, bn1, layer1..4, fc) convert")
    raise CheckpointError(f"{path} is not a torchvision ResNet state_dict (no conv1.weight and layer1..4; its keys "
                          f"begin {sorted(tensors)[:3]}): {hint}")


def _expected_shapes(model: dict) -> dict[str, tuple]:
    """{torchvision key: shape} of the encoder ``model`` describes (fc apart)."""
    return _shapes(model["depth"], model["cifar_stem"])


@functools.cache  # tracing a ResNet-152 takes seconds; a file is read for its architecture, then its weights
def _shapes(depth: int, cifar_stem: bool) -> dict[str, tuple]:
    network = ResNet(depth=depth, cifar_stem=cifar_stem)
    abstract = jax.eval_shape(lambda: network.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    flat = traverse_util.flatten_dict(dict(abstract), sep="/")
    shapes = {}
    for key, (collection, path) in _keys(depth).items():
        shape = flat[f"{collection}/{path}"].shape if collection else ()
        shapes[key] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)
    return shapes


def _check_keys_and_shapes(tensors, model: dict, path: str) -> None:
    shapes = _expected_shapes(model)
    name = f"ResNet-{model['depth']}" + (" (CIFAR stem)" if model["cifar_stem"] else "")
    fc = {k for k in ("fc.weight", "fc.bias") if k in tensors}
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes) - fc)
    if len(fc) == 1:
        missing.append(({"fc.weight", "fc.bias"} - fc).pop())
    if missing or extra:
        raise CheckpointError(f"{path} does not hold torchvision's {name}: "
                              + "; ".join(f"{what} {len(keys)} keys {keys[:4]}" for what, keys in
                                          (("missing", missing), ("unexpected", extra)) if keys)
                              + ". Save the whole resnetNN() state_dict (fc may be left out)")
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {shapes[k]})" for k in shapes
             if tuple(tensors[k].shape) != shapes[k]]
    features = shapes[[k for k in shapes if k.endswith(".running_mean")][-1]][0]  # h: layer4's last BN's width
    if fc and (tensors["fc.weight"].ndim != 2 or tensors["fc.weight"].shape[1] != features
               or tensors["fc.bias"].shape != tensors["fc.weight"].shape[:1]):
        wrong.append(f"fc.weight {tuple(tensors['fc.weight'].shape)} with fc.bias {tuple(tensors['fc.bias'].shape)}")
    if wrong:
        raise CheckpointError(f"{path} has the keys of torchvision's {name} but other shapes: {wrong[:3]} "
                              f"({len(wrong)} in all). Only width 1 converts (not wide_resnet or resnext); "
                              "the CIFAR stem is conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)")


def to_flax(tensors: dict[str, np.ndarray], depth: int) -> tuple[dict, Optional[dict], int]:
    """({'params': {'encoder'}, 'batch_stats': {'encoder'}}, the supervised
    head {'kernel', 'bias'} from fc or None, the step: the largest
    ``num_batches_tracked``) of a state_dict ``infer`` accepted."""
    flat, counts = {}, [0]
    for key, (collection, path) in _keys(depth).items():
        value = tensors[key]
        if not collection:
            counts.append(int(value))
            continue
        value = np.asarray(value, np.float32)
        flat[f"{collection}/encoder/{path}"] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW->HWIO
    head = None
    if "fc.weight" in tensors:
        head = {"kernel": np.asarray(tensors["fc.weight"], np.float32).T, "bias": np.asarray(tensors["fc.bias"],
                                                                                             np.float32)}
    return traverse_util.unflatten_dict(flat, sep="/"), head, max(counts)


def fresh_head(model, feature_dim: int) -> dict:
    """{'params', 'batch_stats'} of ``model``'s projection head at its
    initialisation with seed 0: a torchvision ResNet has none."""
    head = ProjectionHead(num_layers=model.head_layers, out_dim=model.proj_dim)
    return dict(jax.jit(lambda key: head.init(key, jnp.zeros((1, feature_dim)), train=False))(jax.random.key(0)))
