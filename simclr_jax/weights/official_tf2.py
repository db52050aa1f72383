"""Official SimCLR TF2 checkpoints (google-research/simclr, tf2/) as Flax variables.

The official code saves a SavedModel (the released v1 and v2 models) or, while
training, a ``tf.train.Checkpoint`` (``ckpt-N``). Both hold every variable
under its Keras name, e.g. ``resnet/block_group1/bottleneck_block/sk__conv2d/
conv2d_fixed_padding_5/conv2d_5/kernel``. Keras numbers layers in the order
it creates them, so within one block the convolutions sorted by their number,
and the BatchNorms sorted by theirs, come in the order the official block
builds them; ``_block_layout`` lists that order in our module's names. The
variables are read straight from the files (``tf.train.load_checkpoint``): no
official code and no graph is loaded, only TensorFlow.

The architecture is read from the variables themselves: depth from the blocks
per group, width from the first block, stem, projection shortcuts (so the
variant), selective kernels and squeeze-excitation from the layers present,
head layers and classes from the heads. Every official variable must land on
a Flax leaf of the same shape, and every leaf must be filled, or the import
fails naming what did not fit.

The other way, ``official_names`` gives the names the official code would
give our model's variables (official_export.py writes SavedModels with them),
so the import reads our exports too.
"""
import collections
import os
import re
from typing import Optional

import ml_collections
import numpy as np
import tensorflow as tf
from flax import traverse_util
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_jax.models import resnet

SK_RATIO = 0.0625  # the released v2 models'; the mixing width alone does not pin it down (see infer)
_NUMBERED = re.compile(r"^(.*?)(?:_(\d+))?$")  # 'conv2d_5' -> ('conv2d', 5); 'conv2d' -> ('conv2d', 0)
_BN = ("batch_normalization", "sync_batch_normalization")
_BN_FIELDS = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
              "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")}


# --------------------------------------------------------------------------- finding and reading files

def variables_prefix(path: str) -> Optional[str]:
    """The TF checkpoint prefix of an official SavedModel directory, a
    CheckpointManager directory or a ``ckpt-N`` prefix; None if ``path`` is
    none of them (e.g. one of our workdirs)."""
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return os.path.join(path, "variables", "variables")
    if tf.io.gfile.exists(path + ".index"):
        return path
    if tf.io.gfile.isdir(path) and tf.io.gfile.exists(os.path.join(path, "checkpoint")):
        return tf.train.latest_checkpoint(path)
    return None


def read_variables(prefix: str, shapes_only: bool = False) -> dict[str, np.ndarray]:
    """{official variable name: value} of the model's variables in a TF checkpoint
    (optimiser slots, step counters and other objects left out). With
    ``shapes_only`` nothing is read: each value is a zero-size-in-memory array
    of the variable's shape, enough for ``infer``."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except (tf.errors.OpError, IndexError, ValueError) as e:  # IndexError: a data file cut short
        raise _unreadable(prefix, e) from None
    names = {}
    for node in graph.nodes:
        for attribute in node.attributes:
            key, name = attribute.checkpoint_key, attribute.full_name.split(":")[0]
            if attribute.name == "VARIABLE_VALUE" and not key.startswith("optimizer/") and "/" in name:
                names[name] = key
    if shapes_only:
        shapes = reader.get_variable_to_shape_map()
        return {name: np.broadcast_to(np.float32(0), shapes[key]) for name, key in names.items()}
    try:
        return {name: reader.get_tensor(key) for name, key in names.items()}
    except (tf.errors.OpError, IndexError, ValueError) as e:
        raise _unreadable(prefix, e) from None


def _unreadable(prefix: str, error: Exception) -> ValueError:
    return ValueError(f"cannot read the TF checkpoint {prefix!r} ({type(error).__name__}: {str(error)[:200]}); "
                      "is it complete (a download cut short)?")


def step_of(prefix: str) -> int:
    """The step the official run.py saved at: saved_model/<global step>/, or the
    save number of ckpt-<n>; 0 if the path says neither."""
    saved_model_step = os.path.basename(os.path.dirname(os.path.dirname(prefix)))
    ckpt = re.fullmatch(r"ckpt-(\d+)", os.path.basename(prefix))
    return int(saved_model_step) if saved_model_step.isdigit() else int(ckpt.group(1)) if ckpt else 0


# --------------------------------------------------------------------------- the official layout

def _numbered(segment: str) -> tuple[str, int]:
    base, number = _NUMBERED.match(segment).groups()
    return base, int(number or 0)


def _layers(variables, scope: str) -> tuple[list, list, list]:
    """(convolutions, BatchNorms, dense layers) directly in ``scope``, each a list
    of {field: official variable name} in Keras's creation order."""
    owners = collections.defaultdict(dict)
    for name in variables:
        if name.startswith(scope + "/") and not name.startswith(f"{scope}/block_group"):  # the stem: not the blocks
            *path, owner, field = name.split("/")
            owners[owner][field] = name
    kinds = {"conv": [], "bn": [], "dense": []}
    for owner, fields in owners.items():
        base, number = _numbered(owner)
        kind = "bn" if base in _BN else "dense" if base == "dense" else "conv" if base == "conv2d" else None
        if kind is None:
            raise ValueError(f"unknown official layer {scope}/{owner} (variables {sorted(fields)})")
        kinds[kind].append((number, fields))
    return tuple([fields for _, fields in sorted(kinds[k], key=lambda item: item[0])] for k in ("conv", "bn", "dense"))


def _block_layout(bottleneck: bool, project: bool, sk: bool, se: bool) -> tuple[list, list]:
    """Our (convolution paths, BatchNorm paths) of one block, in the order the
    official block creates them: projection first, SE's two convolutions last."""
    convs, norms = (["proj_conv"], ["proj_bn"]) if project else ([], [])
    if bottleneck:
        middle = (["sk/conv", "sk/fc1", "sk/fc2"], ["sk/bn", "sk/fc1_bn"]) if sk else (["conv2"], ["bn2"])
        convs += ["conv1", *middle[0], "conv3"]
        norms += ["bn1", *middle[1], "bn3"]
    else:
        convs, norms = convs + ["conv1", "conv2"], norms + ["bn1", "bn2"]
    return convs + (["se/reduce", "se/expand"] if se else []), norms


def _stem_layout(num_convs: int) -> tuple[list, list]:
    if num_convs == 3:  # ResNet-D
        return ["stem_conv1", "stem_conv2", "stem_conv"], ["stem_bn1", "stem_bn2", "stem_bn"]
    return ["stem_conv"], ["stem_bn"]


def _blocks(variables) -> list[list[str]]:
    """Block scopes of each of the four groups, in order."""
    groups = []
    for group in range(1, 5):
        prefix = f"resnet/block_group{group}/"
        scopes = {"/".join(name.split("/")[:3]) for name in variables if name.startswith(prefix)}
        groups.append(sorted(scopes, key=lambda scope: _numbered(scope.split("/")[-1])[1]))
    return groups


# --------------------------------------------------------------------------- architecture

def infer(variables: dict[str, np.ndarray]) -> tuple[ml_collections.ConfigDict, int, int]:
    """(our model config, supervised classes or 0, image size) of an official
    model, or of one we exported (official_export.py): any width, either
    variant (a basic-block ResNet whose first block has no projection is
    torchvision's), any selective-kernel or squeeze-excitation ratio."""
    groups = _blocks(variables)
    if not all(groups) or not any(name.startswith("projection_head/") for name in variables):
        raise ValueError("these are not SimCLR's variables: expected resnet/block_group1..4/ and "
                         "projection_head/ (the official tf2/ model's names)")
    bottleneck = "bottleneck_block" in groups[0][0]
    kind = "bottleneck" if bottleneck else "basic"
    counts = tuple(len(g) for g in groups)
    depth = next((d for d, stages in resnet.RESNET_STAGES.items() if stages == (kind, counts)), None)
    if depth is None:
        raise ValueError(f"no ResNet depth has {kind} blocks {counts} per group")
    stem_convs, _, _ = _layers(variables, "resnet")
    sk = any("/sk__conv2d" in name for name in variables)
    se = any("/se__layer" in name for name in variables)
    first_convs, _, _ = _layers(variables, groups[0][0])
    project = _projects(first_convs, bottleneck, sk, se)
    base_width = variables[first_convs[int(project)]["kernel"]].shape[-1]  # conv1: the first after the projection
    head_layers = sorted({name.split("/")[1] for name in variables if name.startswith("projection_head/nl_")})
    _, _, last_dense = _layers(variables, f"projection_head/{head_layers[-1]}")
    supervised = [v for n, v in variables.items() if n.startswith("head_supervised/") and n.endswith("kernel")]
    cifar_stem = len(stem_convs) == 1 and variables[stem_convs[0]["kernel"]].shape[:2] == (3, 3)
    widest = 8 * base_width  # SK and SE widths are int(ratio * width): read at group 4's, they fit every group
    sk_mid, se_mid = _widest_middle(variables, "sk__conv2d", 1), _widest_middle(variables, "se__layer", 0)
    if sk:
        sk_ratio = sk_mid / widest if sk_mid > resnet.SK_MIN_DIM else min(SK_RATIO, resnet.SK_MIN_DIM / widest)
    else:  # a basic-block ResNet-D stem (sk_ratio > 0 without selective kernels) has three convolutions
        sk_ratio = SK_RATIO if len(stem_convs) == 3 else 0.0
    model = ml_collections.ConfigDict(dict(
        depth=depth, width_multiplier=base_width / 64, cifar_stem=bool(cifar_stem),
        head_layers=len(head_layers), proj_dim=int(variables[last_dense[0]["kernel"]].shape[-1]),
        variant="official" if bottleneck or project else "torchvision",
        sk_ratio=float(sk_ratio), se_ratio=se_mid / widest if se else 0.0,
        stem_pool_padding="same"))  # the official stem pools as TensorFlow's SAME
    return model, int(supervised[0].shape[-1]) if supervised else 0, 32 if cifar_stem else 224


def _projects(convs: list, bottleneck: bool, sk: bool, se: bool) -> bool:
    """Whether a block with these convolutions has a projection shortcut: one
    more convolution than the block without one."""
    return len(convs) == len(_block_layout(bottleneck, False, sk, se)[0]) + 1


def _widest_middle(variables, layer: str, index: int) -> int:
    """The largest middle width of the ``layer`` ('sk__conv2d': the mixing
    convolutions; 'se__layer': the reduction) over all blocks: the output width
    of convolution ``index`` (in creation order) of each such layer; 0 if none."""
    scopes = set()
    for name in variables:
        parts = name.split("/")
        scopes.update("/".join(parts[:i + 1]) for i, part in enumerate(parts) if _numbered(part)[0] == layer)
    return max((int(variables[_layers(variables, scope)[0][index]["kernel"]].shape[-1]) for scope in scopes),
               default=0)


# --------------------------------------------------------------------------- conversion

def _name_layers(names: dict, prefix, layout, convs, norms, scope) -> None:
    """Adds {official name: 'collection/path/field'} of one scope's layers to ``names``."""
    conv_paths, norm_paths = layout
    if len(convs) != len(conv_paths) or len(norms) != len(norm_paths):
        raise ValueError(f"{scope} has {len(convs)} convolutions and {len(norms)} BatchNorms; the architecture "
                         f"inferred from the rest expects {len(conv_paths)} and {len(norm_paths)}")
    for path, fields in zip(conv_paths, convs):
        names.update({name: f"params/{prefix}/{path}/{field}" for field, name in fields.items()})
    for path, fields in zip(norm_paths, norms):
        for field, name in fields.items():
            collection, ours = _BN_FIELDS[field]
            names[name] = f"{collection}/{prefix}/{path}/{ours}"


def flax_names(variables, model) -> dict[str, str]:
    """{official variable name: our 'params/...' or 'batch_stats/...' path} for
    ``model``'s encoder and projection head (the supervised head is apart)."""
    names = {}
    stem_convs, stem_norms, _ = _layers(variables, "resnet")
    _name_layers(names, "encoder", _stem_layout(len(stem_convs)), stem_convs, stem_norms, "the stem")
    sk, se = model.sk_ratio > 0, model.se_ratio > 0
    for group, scopes in enumerate(_blocks(variables)):
        for index, scope in enumerate(scopes):
            convs, norms, _ = _layers(variables, scope)
            bottleneck = "bottleneck" in scope
            layout = _block_layout(bottleneck, _projects(convs, bottleneck, sk, se), sk, se)
            _name_layers(names, f"encoder/stage{group + 1}_block{index + 1}", layout, convs, norms, scope)
    for j in range(model.head_layers):
        _, norms, dense = _layers(variables, f"projection_head/nl_{j}")
        _name_layers(names, "head", ([f"dense{j + 1}"], [f"bn{j + 1}"]), dense, norms, f"head layer {j}")
    return names


def to_flax(variables: dict[str, np.ndarray], model, abstract: dict) -> tuple[dict, Optional[dict]]:
    """({'params', 'batch_stats'} of ``model`` holding the official values,
    the supervised head {'kernel', 'bias'} or None). ``abstract`` is the
    model's variables (shapes) to fill: every leaf must get a value of its shape."""
    names = flax_names(variables, model)
    unknown = sorted(n for n in variables if n not in names and not n.startswith("head_supervised/"))
    if unknown:
        raise ValueError(f"the official checkpoint has variables this architecture does not know: {unknown[:5]} "
                         f"({len(unknown)} in all)")
    shapes = traverse_util.flatten_dict({c: abstract[c] for c in ("params", "batch_stats")}, sep="/")
    flat = {}
    for name, path in names.items():
        if path not in shapes or shapes[path].shape != variables[name].shape:
            raise ValueError(f"official {name} {variables[name].shape} does not fit {path} "
                             f"{getattr(shapes.get(path), 'shape', 'absent')} of the inferred architecture")
        flat[path] = np.asarray(variables[name], np.float32)
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise ValueError(f"the official checkpoint has no values for {missing[:5]} ({len(missing)} in all)")
    _, _, supervised = _layers(variables, "head_supervised/linear_layer")
    head = {k: np.asarray(variables[n], np.float32) for k, n in supervised[0].items()} if supervised else None
    return traverse_util.unflatten_dict(flat, sep="/"), head


# --------------------------------------------------------------------------- naming (for export)

SUPERVISED_HEAD = "supervised_head"  # official_names' key prefix of the supervised head's kernel and bias


class _KerasNames:
    """Keras's layer names: each layer class numbers its instances over the
    whole model in creation order ('conv2d', 'conv2d_1', ...)."""

    def __init__(self):
        self._counts = collections.Counter()

    def __call__(self, kind: str) -> str:
        number, self._counts[kind] = self._counts[kind], self._counts[kind] + 1
        return f"{kind}_{number}" if number else kind


def _conv(new, scope: str, path: str, fixed_padding: bool = True, bias: bool = False) -> list:
    """[(our path, official name)] of a convolution: the official
    Conv2dFixedPadding wraps a Keras Conv2D; SK's mixing and SE use bare ones."""
    if fixed_padding:
        scope = f"{scope}/{new('conv2d_fixed_padding')}"
    scope = f"{scope}/{new('conv2d')}"
    return [(f"params/{path}/{field}", f"{scope}/{field}") for field in ("kernel", "bias")[:1 + bias]]


def _norm(new, scope: str, path: str, center: bool = True) -> list:
    """[(our path, official name)] of a BatchNormRelu (a SyncBatchNormalization inside)."""
    scope = f"{scope}/{new('batch_norm_relu')}/{new('sync_batch_normalization')}"
    return [(f"{_BN_FIELDS[field][0]}/{path}/{_BN_FIELDS[field][1]}", f"{scope}/{field}") for field in _BN_FIELDS
            if center or field != "beta"]


def _stem_names(new, model) -> list:
    """The stem's names: each convolution, then its BatchNorm."""
    convs, norms = _stem_layout(3 if model.sk_ratio > 0 and not model.cifar_stem else 1)
    return [entry for conv, norm in zip(convs, norms)
            for entry in _conv(new, "resnet", f"encoder/{conv}") + _norm(new, "resnet", f"encoder/{norm}")]


def _block_names(new, scope: str, path: str, bottleneck: bool, project: bool, sk: bool, se: bool) -> list:
    """One block's names. Layers are numbered in the order the official block
    creates them (the projection first, SE last) but listed in the order of
    its trainable variables: a residual block tracks its projection after
    its main convolutions, a bottleneck block before."""
    scope = f"{scope}/{new('bottleneck_block' if bottleneck else 'residual_block')}"
    projection = (_conv(new, scope, f"{path}/proj_conv") + _norm(new, scope, f"{path}/proj_bn")) if project else []
    main = _conv(new, scope, f"{path}/conv1") + _norm(new, scope, f"{path}/bn1")
    if bottleneck and sk:
        sk_scope = f"{scope}/{new('sk__conv2d')}"
        main += (_conv(new, sk_scope, f"{path}/sk/conv") + _norm(new, sk_scope, f"{path}/sk/bn")
                 + _conv(new, sk_scope, f"{path}/sk/fc1", fixed_padding=False)
                 + _norm(new, sk_scope, f"{path}/sk/fc1_bn")
                 + _conv(new, sk_scope, f"{path}/sk/fc2", fixed_padding=False))
    else:
        main += _conv(new, scope, f"{path}/conv2") + _norm(new, scope, f"{path}/bn2")
    if bottleneck:
        main += _conv(new, scope, f"{path}/conv3") + _norm(new, scope, f"{path}/bn3")
    squeeze = []
    if se:
        se_scope = f"{scope}/{new('se__layer')}"
        squeeze = (_conv(new, se_scope, f"{path}/se/reduce", fixed_padding=False, bias=True)
                   + _conv(new, se_scope, f"{path}/se/expand", fixed_padding=False, bias=True))
    return projection + main + squeeze if bottleneck else main + projection + squeeze


def official_names(model_config, supervised_classes: int = 0) -> dict[str, str]:
    """{our 'params/...' or 'batch_stats/...' path: the official variable name}
    of the model ``model_config`` describes, as the official Keras code names
    it, with the supervised head's kernel and bias under
    'supervised_head/kernel' and '.../bias' when ``supervised_classes > 0``.
    The order is that of the official model's trainable variables (moving
    statistics beside their BatchNorm's gamma and beta)."""
    new, model = _KerasNames(), model_config
    kind, _ = resnet.RESNET_STAGES[int(model.depth)]
    sk, se = kind == "bottleneck" and model.sk_ratio > 0, model.se_ratio > 0
    entries = _stem_names(new, model)
    projections = resnet.block_projections(int(model.depth), float(model.width_multiplier), str(model.variant))
    for group, projects in enumerate(projections):
        for index, project in enumerate(projects):
            entries += _block_names(new, f"resnet/block_group{group + 1}", f"encoder/stage{group + 1}_block{index + 1}",
                                    kind == "bottleneck", project, sk, se)
    for j in range(int(model.head_layers)):
        scope, dense = f"projection_head/nl_{j}", new("dense")
        last = j == model.head_layers - 1
        entries += _norm(new, scope, f"head/bn{j + 1}", center=not last)
        entries.append((f"params/head/dense{j + 1}/kernel", f"{scope}/{dense}/kernel"))
    if supervised_classes > 0:
        dense = new("dense")
        entries += [(f"{SUPERVISED_HEAD}/{field}", f"head_supervised/linear_layer/{dense}/{field}")
                    for field in ("kernel", "bias")]
    return dict(entries)
