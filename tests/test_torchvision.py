"""torchvision ResNet state_dicts in and out (weights/torchvision.py): the
state_dicts torchvision itself wrote (../shared/fixtures/torchvision) give
its outputs through load_encoder and export back to the same tensors; our
encoders and official checkpoints export, or are refused with one message.
No PyTorch: its side is the fixture."""
import json
import re
import tarfile

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from absl import flags
from flax import traverse_util

import simclr_jax
from simclr_jax import config_validation, export, models, sharding
from simclr_jax.errors import CheckpointError, UserError
from simclr_jax.weights import checkpoint, official_tf2, pretrained, torchvision
from tests.conftest import OFFICIAL_FIXTURES

FIXTURES = OFFICIAL_FIXTURES.parent / "torchvision"
NAMES = ("r18_cifar", "r50")


@pytest.fixture(scope="module")
def state_dicts(tmp_path_factory):
    """{name: path of the fixture's state_dict.safetensors}, unpacked once."""
    if not FIXTURES.is_dir():
        pytest.skip(f"torchvision fixtures not found under {FIXTURES}")
    root = tmp_path_factory.mktemp("torchvision")
    for name in NAMES:
        with tarfile.open(FIXTURES / f"{name}.safetensors.tar.gz") as tar:
            tar.extractall(root, filter="data")
    return {name: str(root / name / "state_dict.safetensors") for name in NAMES}


@pytest.fixture(scope="module")
def imported(state_dicts):
    """{name: load_encoder of the fixture state_dict} on one device, loaded once."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    return {name: simclr_jax.load_encoder(path, batch_size=8, mesh=mesh) for name, path in state_dicts.items()}


@pytest.fixture(scope="module")
def outputs(imported):
    """outputs(name, stem_pool_padding=None): our outputs on the fixture's
    images under its names (layer1..4, features, logits) plus the stem's
    (initial_conv, initial_max_pool), each network compiled once; a padding
    swaps the model's stem pooling."""
    cache = {}

    def get(name, padding=None):
        if (name, padding) not in cache:
            encoder = imported[name]
            model = encoder.model.clone(stem_pool_padding=padding or encoder.model.stem_pool_padding)

            @jax.jit
            def run(variables, images):
                h, state = model.apply(variables, images, False, method=models.SimCLR.features,
                                       mutable=["intermediates"])
                maps = state["intermediates"]["encoder"]
                return h, {k: maps[k][0] for k in ("initial_conv", "initial_max_pool")}, {
                    f"layer{i}": maps[f"block_group{i}"][0] for i in range(1, 5)}

            images = np.load(FIXTURES / f"{name}_outputs.npz")["images_nhwc"]
            h, stem, layers = jax.device_get(run(encoder.variables, images))
            head = jax.device_get(encoder.supervised_head)
            cache[name, padding] = dict(layers, features=h, logits=h @ head["kernel"] + head["bias"], stem=stem)
        return cache[name, padding]
    return get


def _fixture_outputs(name: str) -> dict:
    return dict(np.load(FIXTURES / f"{name}_outputs.npz"))


def _relative(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def _read(path) -> tuple[dict, dict]:
    return torchvision.read(str(path))


def _assert_same_tensors(got: dict, want: dict) -> None:
    """Same keys, and per tensor the same dtype, shape and bytes."""
    assert sorted(got) == sorted(want)
    different = [k for k in want if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
                 or got[k].tobytes() != want[k].tobytes()]
    assert not different, different[:5]


def _cli(*args) -> None:
    """``python -m simclr_jax.export ARGS``, run in this process."""
    argv = ["simclr_jax.export", *args]
    flags.FLAGS(argv)
    try:
        export.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()


# --------------------------------------------------------------------------- torchvision -> ours

@pytest.mark.parametrize("name", NAMES)
def test_imported_state_dict_gives_torchvisions_outputs(imported, outputs, name):
    fixture = _fixture_outputs(name)
    encoder = imported[name]
    meta = json.loads((FIXTURES / "meta.json").read_text())["models"][name]
    assert (encoder.model.depth, encoder.model.cifar_stem, encoder.step) == (
        {"r18_cifar": 18, "r50": 50}[name], name == "r18_cifar", 1000)  # step: num_batches_tracked
    assert encoder.model.stem_pool_padding == ("same" if name == "r18_cifar" else "symmetric")  # CIFAR: no pool
    params = sum(np.size(x) for x in jax.tree.leaves(encoder.variables["params"]["encoder"]))
    assert params + sum(np.size(x) for x in encoder.supervised_head.values()) == meta["parameters"]
    got = outputs(name)
    errors = {key: _relative(got[key], fixture[key]) for key in ("layer1", "layer2", "layer3", "layer4",
                                                                 "features", "logits")}
    print(f"{name}: max|diff| / max|torchvision| per output:", {k: f"{e:.1e}" for k, e in errors.items()})
    assert max(errors.values()) <= 1e-4, errors


def test_pooling_the_stem_the_other_way_is_a_large_difference(outputs):
    """torchvision pads its stem max-pool 1 on each side; TensorFlow's SAME (the
    official SimCLR's, our default) 0 before and 1 after: other windows. The
    fixture's ResNet-50 pooled 'same' is what a PyTorch user gets who loads an
    exported 'same' encoder without docs/pytorch.md's recipe (and the reverse)."""
    fixture, got = _fixture_outputs("r50"), outputs("r50", "same")
    errors = {key: _relative(got[key], fixture[key]) for key in ("layer1", "layer4", "features", "logits")}
    print("r50 pooled 'same' instead of torchvision's, max|diff| / max|torchvision|:",
          {k: f"{e:.3f}" for k, e in errors.items()})
    assert min(errors.values()) > 1e-2, errors  # 100x the tolerance


def test_the_pytorch_recipe_pools_as_tensorflow_same(imported, outputs):
    """docs/pytorch.md's nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2)),
    written out in numpy on the stem's post-ReLU (>= 0) map of even size
    (32x32 here), gives our 'same' pooling; torchvision's padding=1 ours
    'symmetric'. The maps are the fixture ResNet-50's own."""
    bn = jax.device_get({c: imported["r50"].variables[c]["encoder"]["stem_bn"] for c in ("params", "batch_stats")})

    def relu_bn(conv):
        stats, params = bn["batch_stats"], bn["params"]
        return np.maximum((conv - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"], 0)

    def zero_padded_max_pool(x, before, after):  # NHWC, then a 3x3/2 max-pool without padding
        x = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
        size = (x.shape[1] - 3) // 2 + 1
        return np.stack([np.stack([x[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(size)], 1)
                         for i in range(size)], axis=1)

    for padding, (before, after) in (("same", (0, 1)), ("symmetric", (1, 1))):
        stem = outputs("r50", None if padding == "symmetric" else padding)["stem"]
        relu = relu_bn(stem["initial_conv"])
        assert relu.shape[1:3] == (32, 32) and relu.min() == 0
        want = zero_padded_max_pool(relu, before, after)
        np.testing.assert_allclose(stem["initial_max_pool"], want, atol=1e-5 * np.max(want), err_msg=padding)
    assert not np.allclose(outputs("r50", "same")["stem"]["initial_max_pool"],
                           outputs("r50")["stem"]["initial_max_pool"])


# --------------------------------------------------------------------------- ours -> torchvision

@pytest.mark.parametrize("name", NAMES)
def test_import_then_export_gives_back_every_tensor(state_dicts, imported, tmp_path, name):
    """Every tensor, num_batches_tracked included (the count is kept as the
    encoder's step), comes back with its dtype, shape and bytes."""
    out = tmp_path / f"{name}.safetensors"
    assert simclr_jax.export_torchvision(imported[name], str(out)) == str(out)
    (got, metadata), (want, _) = _read(out), _read(state_dicts[name])
    _assert_same_tensors(got, want)
    assert metadata == {}  # torchvision's own pooling: nothing to say
    print(f"{name}: whole file identical: {out.read_bytes() == open(state_dicts[name], 'rb').read()}")


def test_our_workdir_exports_on_the_command_line(imported, state_dicts, tmp_path, capsys):
    """One of our pretraining workdirs (ResNet-18, CIFAR stem, width 1, with an
    online probe) -> ``python -m simclr_jax.export --format=torchvision``:
    torchvision's resnet18 state_dict, the probe as fc. The weights are the
    fixture's, so the file must hold exactly the fixture's tensors."""
    from simclr_jax import config_schema

    encoder, workdir, out = imported["r18_cifar"], str(tmp_path / "run"), tmp_path / "r18.safetensors"
    config = config_schema.build("pretrain")  # ResNet-18, width 1, CIFAR stem, 32 px
    checkpoint.save_network(workdir, config=config, variables=encoder.variables, head=encoder.supervised_head,
                            step=1000, head_key=checkpoint.PROBE)
    _cli(f"--pretrained={workdir}", "--format=torchvision", f"--out={out}")
    assert capsys.readouterr().out.startswith(f"wrote {out} from Encoder(depth=18")
    _assert_same_tensors(_read(out)[0], _read(state_dicts["r18_cifar"])[0])


def test_official_v1_checkpoint_converts_with_its_pooling(imported, state_dicts, tmp_path, capsys):
    """An official TF2 checkpoint of SimCLR v1's architecture (ResNet-50, no
    selective kernels), here holding the fixture's weights under the official
    names: the command writes torchvision's resnet50 tensors, and says (in
    the file's metadata and on the console) that it pools as TensorFlow's
    SAME, which the import reads back."""
    import tensorflow as tf

    encoder = imported["r50"]
    config = ml_collections.ConfigDict(dict(encoder.model_config, variant="official", stem_pool_padding="same"))
    values = traverse_util.flatten_dict(jax.device_get(dict(encoder.variables)), sep="/")
    values.update({f"{official_tf2.SUPERVISED_HEAD}/{k}": v for k, v in encoder.supervised_head.items()})
    names = official_tf2.official_names(config, 10)
    prefix = tf.train.Checkpoint(variables=[tf.Variable(values[path], name=name) for path, name in names.items()]) \
        .write(str(tmp_path / "official" / "ckpt-1000"))
    out = tmp_path / "v1.safetensors"
    _cli(f"--pretrained={prefix}", "--format=torchvision", f"--out={out}")
    printed = capsys.readouterr().out
    assert "nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2))" in printed
    got, metadata = _read(out)
    _assert_same_tensors(got, _read(state_dicts["r50"])[0])
    assert metadata == {torchvision.POOL_METADATA: "same"}
    assert pretrained.architecture(str(out)).model.stem_pool_padding == "same"


@pytest.mark.parametrize("name, message", [
    ("r18_cifar", "variant='official' at depth 18 (a projection shortcut on the first block of layer1, which "
                  "torchvision's ResNet-18/34 has not)"),
    ("r50_1x_sk1", "sk_ratio=0.0625 (selective kernels and the ResNet-D stem and shortcuts of SimCLR v2)"),
], ids=["r18_cifar", "r50_1x_sk1"])
def test_official_fixtures_torchvision_cannot_hold_are_refused(official_files, tmp_path, capsys, name, message):
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"--pretrained={official_files[name, 'saved_model']}", "--format=torchvision", f"--out={out}")
    assert exit_info.value.code == 1
    printed = capsys.readouterr().err.strip()
    print(printed)
    assert printed == ("simclr_jax.export: torchvision's ResNet cannot hold this encoder: " + message + ". Instead, "
                       + torchvision._INSTEAD)
    assert not out.exists()


# --------------------------------------------------------------------------- pretraining from a state_dict

def test_init_from_a_state_dict(state_dicts, imported):
    """--config.init_from=FILE.safetensors: the architecture must agree (the
    head fields are the config's own: torchvision has no projection head),
    and the restored variables are the file's encoder plus a fresh head."""
    from simclr_jax import config_schema

    config = config_schema.build("pretrain")
    config.init_from, config.model.head_layers = state_dicts["r18_cifar"], 3
    pretrained.resolve(config.init_from, config.model, field="init_from")
    variables, head, step = pretrained.restore(config.init_from, models.model_from_config(config.model), 32,
                                               sharding.make_mesh(jax.devices()[:1]))
    assert step == 1000 and head["kernel"].shape == (512, 10) and "dense3" in variables["params"]["head"]
    same = jax.tree.map(np.array_equal, jax.device_get(variables["params"]["encoder"]),
                        jax.device_get(imported["r18_cifar"].variables["params"]["encoder"]))
    assert all(jax.tree.leaves(same))
    config.init_from = state_dicts["r50"]
    with pytest.raises(config_validation.ConfigError, match=re.escape(
            f"config.init_from={state_dicts['r50']!r} holds another architecture: set --config.model.depth=50 (the "
            "config has 18), --config.model.cifar_stem=False (the config has True), "
            "--config.model.stem_pool_padding='symmetric' (the config has 'same')")):
        pretrained.resolve(config.init_from, config.model, field="init_from")


# --------------------------------------------------------------------------- bad inputs

def _write(path, tensors: dict) -> str:
    safetensors.numpy.save_file(tensors, str(path))
    return str(path)


def _r18_with(state_dicts, change) -> dict:
    tensors = dict(_read(state_dicts["r18_cifar"])[0])
    change(tensors)
    return tensors


def _zeros(*shape):
    return np.zeros(shape, np.float32)


BAD_STATE_DICTS = {  # name: (tensors from the fixture's r18 dict, the message after the file's path)
    "vit": (lambda sd: {"class_token": _zeros(1, 1, 8), "conv_proj.weight": _zeros(8, 3, 16, 16),
                        "encoder.layers.encoder_layer_0.ln_1.weight": _zeros(8)},
            " is not a torchvision ResNet state_dict (no conv1.weight and layer1..4; its keys begin ['class_token', "
            "'conv_proj.weight', 'encoder.layers.encoder_layer_0.ln_1.weight']): only "
            "torchvision.models.resnet18/34/50/101/152 (conv1, bn1, layer1..4, fc) convert"),
    "mobilenet": (lambda sd: {"features.0.0.weight": _zeros(32, 3, 3, 3), "classifier.1.weight": _zeros(10, 1280)},
                  " is not a torchvision ResNet state_dict (no conv1.weight and layer1..4; its keys begin "
                  "['classifier.1.weight', 'features.0.0.weight']): only torchvision.models.resnet18/34/50/101/152 "
                  "(conv1, bn1, layer1..4, fc) convert"),
    "wrapped": (lambda sd: _r18_with(sd, lambda t: [t.__setitem__(f"module.{k}", t.pop(k)) for k in list(t)]),
                " is not a torchvision ResNet state_dict (no conv1.weight and layer1..4; its keys begin "
                "['module.bn1.bias', 'module.bn1.num_batches_tracked', 'module.bn1.running_mean']): its keys start "
                "with 'module.' (a ResNet inside another module): save that module's own state_dict, e.g. "
                "model.module.state_dict()"),
    "missing": (lambda sd: _r18_with(sd, lambda t: [t.pop("layer2.0.downsample.0.weight"), t.pop("fc.bias")]),
                " does not hold torchvision's ResNet-18 (CIFAR stem): missing 2 keys ['layer2.0.downsample.0.weight', "
                "'fc.bias']. Save the whole resnetNN() state_dict (fc may be left out)"),
    "extra": (lambda sd: _r18_with(sd, lambda t: t.update({"layer1.0.downsample.0.weight": _zeros(64, 64, 1, 1),
                                                           "layer1.0.se.fc1.weight": _zeros(4, 64)})),
              " does not hold torchvision's ResNet-18 (CIFAR stem): unexpected 2 keys ['layer1.0.downsample.0.weight', "
              "'layer1.0.se.fc1.weight']. Save the whole resnetNN() state_dict (fc may be left out)"),
    "wider": (lambda sd: _r18_with(sd, lambda t: t.update({"layer1.0.conv1.weight": _zeros(128, 64, 3, 3)})),
              " has the keys of torchvision's ResNet-18 (CIFAR stem) but other shapes: ['layer1.0.conv1.weight "
              "(128, 64, 3, 3) (expected (64, 64, 3, 3))'] (1 in all). Only width 1 converts (not wide_resnet or "
              "resnext); the CIFAR stem is conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)"),
    "depth": (lambda sd: _r18_with(sd, lambda t: [t.pop(k) for k in list(t) if k.startswith("layer4.1.")]),
              ": basic blocks (2, 2, 2, 1) per layer are no ResNet depth of (18, 34, 50, 101, 152, 200); export a "
              "torchvision resnet18/34/50/101/152"),
}


@pytest.mark.parametrize("name", sorted(BAD_STATE_DICTS))
def test_a_state_dict_of_another_network_is_one_clear_error(state_dicts, tmp_path, name):
    make, message = BAD_STATE_DICTS[name]
    path = _write(tmp_path / f"{name}.safetensors", make(state_dicts))
    with pytest.raises(CheckpointError) as error:
        simclr_jax.load_encoder(path)
    print(error.value)
    assert str(error.value) == path + message


def test_unreadable_files_are_one_clear_error(state_dicts, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"PK\x03\x04 a torch.save zip")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'model.safetensors'}: cannot read it as safetensors (")) as error:
        simclr_jax.load_encoder(str(tmp_path / "model.safetensors"))
    assert str(error.value).endswith("); is it complete? A torch.save() pickle (.pt, .pth) is not: in PyTorch, "
                                     "safetensors.torch.save_file(model.state_dict(), path) writes one")
    with pytest.raises(CheckpointError, match=re.escape(f"no such file: '{tmp_path / 'gone.safetensors'}'; pass a "
                                                        "torchvision state_dict saved with")):
        simclr_jax.load_encoder(str(tmp_path / "gone.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(
            "head_layer=1: " + state_dicts["r18_cifar"] + " is a torchvision ResNet, which has no projection head; "
            "load it with head_layer=0 (its features h)")):
        simclr_jax.load_encoder(state_dicts["r18_cifar"], head_layer=1)


@pytest.mark.parametrize("model, message", [
    (dict(width_multiplier=0.0625), "width_multiplier=0.0625 (torchvision's resnetNN() has width 1; its "
                                    "wide_resnet50_2 widens only the 3x3 convolutions)"),
    (dict(width_multiplier=1.0, variant="official", se_ratio=0.25),
     "se_ratio=0.25 (squeeze-excitation); variant='official' at depth 18 (a projection shortcut on the first block "
     "of layer1, which torchvision's ResNet-18/34 has not)"),
], ids=["width", "official-se"])
def test_what_torchvision_cannot_hold_is_refused_before_reading_weights(tmp_path, model, message):
    """Only the workdir's config.json exists: the refusal comes from the architecture alone."""
    from tests.helpers import tiny_workdir

    workdir, out = tiny_workdir(tmp_path / "run", **model), tmp_path / "out.safetensors"
    with pytest.raises(UserError) as error:
        export.export(workdir, str(out), format="torchvision")
    assert str(error.value) == ("torchvision's ResNet cannot hold this encoder: " + message + ". Instead, "
                                + torchvision._INSTEAD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_targets_are_checked(imported, tmp_path):
    encoder = imported["r18_cifar"]
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'r18.pt'}: a torchvision state_dict is written as a "
                                                  "safetensors file; name it *.safetensors")):
        simclr_jax.export_torchvision(encoder, str(tmp_path / "r18.pt"))
    (tmp_path / "taken.safetensors").write_text("mine")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'taken.safetensors'} exists: export writes a new "
                                                  "file; choose another --out, or delete that one first")):
        simclr_jax.export_torchvision(encoder, str(tmp_path / "taken.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]
    assert (tmp_path / "taken.safetensors").read_text() == "mine"


def test_the_official_format_refuses_torchvisions_pooling(imported, tmp_path):
    """An imported ImageNet-stem ResNet pools as torchvision does, which the
    official SavedModel (TensorFlow's SAME) cannot say: refused, nothing written."""
    with pytest.raises(ValueError, match=re.escape("this encoder's stem max-pool pads symmetrically (torchvision's)")):
        simclr_jax.export_saved_model(imported["r50"], str(tmp_path / "saved_model"))
    assert list(tmp_path.iterdir()) == []
