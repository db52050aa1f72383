"""Export to the official SimCLR TF2 SavedModel format (official_export.py): the
official names, signature and outputs, and a round trip through load_encoder.

The official ResNet-50 fixture is checked for names only: exporting it takes
about 20 s on two CPU cores (its outputs were checked by hand, within 7.1e-7);
the ResNet-18 fixture is exported and compared output by output."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from flax import traverse_util
from tensorflow.core.protobuf import trackable_object_graph_pb2

import simclr_jax
from simclr_jax import encoder as encoder_lib
from simclr_jax import models, sharding, storage
from simclr_jax.weights import official_export, official_tf2
from tests.conftest import OFFICIAL_FIXTURES
from tests.helpers import relative_error, tiny_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("name, form", [("r18_cifar", "saved_model"), ("r18_cifar", "ckpt_prefix"),
                                        ("r50_1x_sk1", "saved_model")])
def test_official_names_are_the_official_codes(official_files, name, form):
    """The names official_names generates for the fixture's architecture are
    exactly the fixture's, each on the path the import maps it to, and (in
    the SavedModel) the trainable ones in the official order."""
    official = official_tf2.read_variables(official_tf2.variables_prefix(official_files[name, form]), shapes_only=True)
    config, classes, _ = official_tf2.infer(official)
    names = official_tf2.official_names(config, classes)
    by_name = {official_name: path for path, official_name in names.items()}
    assert set(by_name) == set(official)
    head = official_tf2.SUPERVISED_HEAD
    assert {path for path in names if path.startswith(head)} == {f"{head}/kernel", f"{head}/bias"}
    assert official_tf2.flax_names(official, models.model_from_config(config)) == {
        n: path for n, path in by_name.items() if not path.startswith(head)}
    if form == "saved_model":
        want = _trainable_variables_list(official_tf2.variables_prefix(official_files[name, form]))
        assert [n for path, n in names.items() if not path.startswith("batch_stats/")] == want


def _trainable_variables_list(prefix: str) -> list[str]:
    """The names in a SavedModel's ``trainable_variables_list``, in order, read
    from its object graph (as loading it would give, without loading it)."""
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    listed = next(c.node_id for c in graph.nodes[0].children if c.local_name == "trainable_variables_list")
    children = sorted(graph.nodes[listed].children, key=lambda c: int(c.local_name))
    return [graph.nodes[c.node_id].attributes[0].full_name.split(":")[0] for c in children]


ARCHITECTURES = [  # what we can train, at small widths: every layout official_names knows
    dict(depth=18, width_multiplier=1 / 16, cifar_stem=True, variant="torchvision"),
    dict(depth=18, width_multiplier=0.125, cifar_stem=False, variant="official", se_ratio=0.25),
    dict(depth=34, width_multiplier=1 / 16, cifar_stem=False, variant="torchvision", sk_ratio=0.0625),
    dict(depth=50, width_multiplier=1 / 16, cifar_stem=True, variant="official", sk_ratio=0.0625, se_ratio=0.25,
         head_layers=3),
    dict(depth=50, width_multiplier=0.125, cifar_stem=False, variant="torchvision", proj_dim=64),
    dict(depth=50, width_multiplier=2.0, cifar_stem=False, variant="official", sk_ratio=0.125, se_ratio=0.1),
]


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: "-".join(f"{v}" for v in a.values()))
def test_import_reads_back_the_names_export_writes(architecture):
    """Variables named by official_names (shapes only) give back the
    architecture through infer, and fill every leaf through to_flax."""
    config = ml_collections.ConfigDict({"head_layers": 2, "proj_dim": 128, "sk_ratio": 0.0, "se_ratio": 0.0,
                                        "stem_pool_padding": "same", **architecture})
    model = models.model_from_config(config)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(dict(abstract), sep="/").items()}
    h = shapes["params/head/dense1/kernel"][0]
    shapes.update({f"{official_tf2.SUPERVISED_HEAD}/kernel": (h, 7), f"{official_tf2.SUPERVISED_HEAD}/bias": (7,)})
    names = official_tf2.official_names(config, 7)
    assert set(names) == set(shapes)
    official = {names[path]: np.broadcast_to(np.float32(0), shape) for path, shape in shapes.items()}
    inferred, classes, _ = official_tf2.infer(official)
    same = ("depth", "width_multiplier", "cifar_stem", "head_layers", "proj_dim")
    assert [inferred[k] for k in same] == [config[k] for k in same] and classes == 7
    # A bottleneck ResNet is the same network in both variants; ratios may come back rounded (0.1 -> 0.0996).
    assert inferred.variant == ("official" if config.depth >= 50 else config.variant)
    assert (inferred.sk_ratio > 0, inferred.se_ratio > 0) == (config.sk_ratio > 0, config.se_ratio > 0)
    tree, head = official_tf2.to_flax(official, models.model_from_config(inferred), abstract)
    assert head["kernel"].shape == (h, 7)


# --------------------------------------------------------------------------- the exported fixture

@pytest.fixture(scope="module")
def exported_r18(official_files, tmp_path_factory):
    """The official ResNet-18 checkpoint imported and exported again, through
    the command line."""
    out = str(tmp_path_factory.mktemp("export") / "r18")
    command = [sys.executable, "-m", "simclr_jax.export",
               f"--pretrained={official_files['r18_cifar', 'ckpt_prefix']}", f"--out={out}"]
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out


def test_exported_fixture_gives_every_official_output(official_files, exported_r18):
    official = dict(np.load(OFFICIAL_FIXTURES / "r18_cifar" / "outputs.npz"))
    images = tf.constant(official["images"])
    ours = tf.saved_model.load(exported_r18)
    theirs = tf.saved_model.load(official_files["r18_cifar", "saved_model"])
    got = ours(images, trainable=False)
    assert set(got) == set(theirs(images, trainable=False)) == set(official_export.OUTPUTS)
    official["proj_head_input"] = official["final_avg_pool"]
    errors = {key: relative_error(value, official[key]) for key, value in got.items()}
    print("exported r18_cifar, max|diff| / max|official| per output:", {k: f"{e:.1e}" for k, e in errors.items()})
    assert max(errors.values()) <= 1e-4, errors
    # The official signature: __call__ traced for trainable=True and False, the
    # same output specs, and the trainable variables by name, in order.
    assert _signatures(ours) == _signatures(theirs)
    assert [v.name for v in ours.trainable_variables_list] == [v.name for v in theirs.trainable_variables_list]


def _signatures(saved_model) -> list:
    """(inputs, outputs as {key: (shape, dtype)}) of each trace of ``__call__``."""
    return sorted(((str(f.structured_input_signature),
                    {k: (spec.shape.as_list(), spec.dtype) for k, spec in f.structured_outputs.items()})
                   for f in saved_model.__call__.concrete_functions), key=lambda s: s[0])


def test_exported_fixture_reads_back_bitwise(official_files, exported_r18):
    before = simclr_jax.load_encoder(official_files["r18_cifar", "ckpt_prefix"], batch_size=8)
    after = simclr_jax.load_encoder(exported_r18, batch_size=8)
    assert after.model_config.to_dict() == before.model_config.to_dict()
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                        (before.variables, before.supervised_head), (after.variables, after.supervised_head))
    assert all(jax.tree.leaves(same))


# --------------------------------------------------------------------------- round trip of our own model

CLASSES = 5


def _randomised(encoder, seed: int = 0) -> encoder_lib.Encoder:
    """``encoder`` with every variable drawn at random and a supervised head:
    unlike an initialisation (zero gammas, unit variances, zero biases), every
    leaf differs, so a swapped name or a skipped layer shows."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        field = path[-1].key
        if field == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        return rng.uniform(0.5, 1.5, leaf.shape) if field in ("scale", "var") else rng.uniform(-0.1, 0.1, leaf.shape)

    variables = jax.tree_util.tree_map_with_path(draw, jax.device_get(dict(encoder.variables)))
    head = {"kernel": rng.normal(0, 0.2, (encoder.feature_dim, CLASSES)), "bias": rng.uniform(-0.1, 0.1, CLASSES)}
    variables, head = jax.tree.map(np.float32, (variables, head))
    return encoder_lib.Encoder(encoder.model_config, sharding.put_replicated(variables, encoder.mesh),
                               encoder.image_size, mesh=encoder.mesh, batch_size=8, supervised_head=head)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny test architecture (torchvision ResNet-18 at width 1/16, 16 px)
    with random variables and supervised head, and its export: (encoder, directory)."""
    root = tmp_path_factory.mktemp("tiny")
    encoder = _randomised(simclr_jax.load_encoder(tiny_workdir(root / "run"), random_init_seed=0))
    return encoder, official_export.export_saved_model(encoder, str(root / "export"))


def _ours(encoder, views, train: bool) -> dict:
    """Our model's outputs under the official dict's keys."""
    (h, z), state = encoder.model.apply(encoder.variables, views, train=train,
                                        mutable=["batch_stats", "intermediates"] if train else ["intermediates"])
    outputs = {name: maps[0] for name, maps in state["intermediates"]["encoder"].items()}
    head = encoder.supervised_head
    outputs.update(final_avg_pool=h, proj_head_input=h, proj_head_output=z,
                   logits_sup=h @ head["kernel"] + head["bias"])
    return outputs


def test_round_trip_gives_the_same_variables_and_features(tiny):
    encoder, exported = tiny
    back = simclr_jax.load_encoder(exported, batch_size=8)
    assert back.model_config.to_dict() == encoder.model_config.to_dict()  # torchvision, width 1/16
    flat, flat_back = (traverse_util.flatten_dict(jax.device_get({**e.variables, "head": e.supervised_head}), sep="/")
                       for e in (encoder, back))
    assert set(flat) == set(flat_back) and all(np.array_equal(flat[k], flat_back[k]) for k in flat)
    views = np.random.default_rng(0).random((5, 16, 16, 3), np.float32)
    assert np.array_equal(back.embed_views(views), encoder.embed_views(views))


@pytest.mark.parametrize("train", [False, True])
def test_saved_model_computes_our_model(tiny, train):
    """Both traces equal our model; trainable=True runs BatchNorm on the batch's
    statistics and leaves the moving statistics as they were."""
    encoder, exported = tiny
    views = np.random.default_rng(1).random((6, 16, 16, 3), np.float32)
    m = tf.saved_model.load(exported)
    got = {k: v.numpy() for k, v in m(tf.constant(views), trainable=train).items()}
    want = _ours(encoder, views, train)
    assert set(got) == set(want) == set(official_export.OUTPUTS)
    errors = {key: relative_error(got[key], want[key]) for key in want}
    print(f"trainable={train}, max|diff| / max|ours|:", {k: f"{e:.1e}" for k, e in errors.items()})
    assert max(errors.values()) <= 1e-4, errors
    paths = {name: path for path, name in official_tf2.official_names(encoder.model_config, CLASSES).items()}
    stats = traverse_util.flatten_dict(jax.device_get(dict(encoder.variables)), sep="/")
    assert m.non_trainable_variables_list and all(
        np.array_equal(v.numpy(), stats[paths[v.name.split(":")[0]]]) for v in m.non_trainable_variables_list)


def test_saved_model_gradients_are_ours(tiny):
    """A TF user can fine-tune: the gradients of the SavedModel's trainable
    variables (supervised head included) equal JAX's. Tolerance 2e-3 of each
    variable's largest gradient: the head's are mostly cancelled by its
    batch-statistics BatchNorm, and there JAX's own float32 gradients differ
    from float64 ones by up to 5e-4."""
    encoder, exported = tiny
    views = np.random.default_rng(2).random((4, 16, 16, 3), np.float32)
    m = tf.saved_model.load(exported)
    with tf.GradientTape() as tape:
        out = m(tf.constant(views), trainable=True)
        loss = tf.reduce_sum(out["proj_head_output"] ** 2) + tf.reduce_sum(out["logits_sup"] ** 2)
    got = dict(zip((v.name.split(":")[0] for v in m.trainable_variables_list),
                   tape.gradient(loss, m.trainable_variables_list)))

    @jax.jit
    def grad(params, head):
        def loss(params, head):
            (h, z), _ = encoder.model.apply({**encoder.variables, "params": params}, views, train=True,
                                            mutable=["batch_stats"])
            return jnp.sum(z ** 2) + jnp.sum((h @ head["kernel"] + head["bias"]) ** 2)
        return jax.grad(loss, argnums=(0, 1))(params, head)

    params, head = jax.device_get(grad(encoder.variables["params"], encoder.supervised_head))
    want = {f"params/{k}": v for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    want.update({f"{official_tf2.SUPERVISED_HEAD}/{k}": v for k, v in head.items()})
    names = official_tf2.official_names(encoder.model_config, CLASSES)
    assert len(got) == len(want) and all(np.max(np.abs(g)) > 0 for g in want.values())
    errors = {path: relative_error(got[names[path]], g) for path, g in want.items()}
    worst = max(errors, key=errors.get)
    print(f"gradients of {len(errors)} variables: largest max|diff| / max|jax| {errors[worst]:.1e} ({worst})")
    assert errors[worst] <= 2e-3


# --------------------------------------------------------------------------- bad inputs

def test_export_never_overwrites(tiny, tmp_path):
    encoder, _ = tiny
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        official_export.export_saved_model(encoder, str(target))
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        official_export.export_saved_model(encoder, str(tmp_path / "file"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]  # nothing half-written


def test_export_into_a_bucket_uploads_the_same_files(tiny, gcs_bucket, tmp_path):
    """--out=gs://...: the SavedModel is uploaded, the files a local export
    has; read back, it holds the encoder's variables; a second export there
    is refused."""
    encoder, exported = tiny
    out = f"{gcs_bucket}/exports/tiny"
    assert official_export.export_saved_model(encoder, out) == out
    names = sorted(os.path.relpath(os.path.join(d, n), exported) for d, _, files in os.walk(exported) for n in files)
    copy = tmp_path / "copy"  # TensorFlow cannot read from the test server: copy it back through storage
    for name in names:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(storage.read_bytes(storage.join(out, *name.split(os.sep))))
    back = simclr_jax.load_encoder(str(copy))
    flat, flat_back = (traverse_util.flatten_dict(jax.device_get({**e.variables, "head": e.supervised_head}), sep="/")
                       for e in (encoder, back))
    assert set(flat) == set(flat_back) and all(np.array_equal(flat[k], flat_back[k]) for k in flat)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        official_export.export_saved_model(encoder, out)


def test_a_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    encoder, _ = tiny

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        official_export.export_saved_model(encoder, str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_ambiguous_architecture_is_refused(tmp_path):
    """ResNet-D shortcuts without selective kernels (a basic-block ResNet with
    the CIFAR stem and sk_ratio > 0) leave no trace in the variables."""
    encoder = simclr_jax.load_encoder(tiny_workdir(tmp_path / "run", sk_ratio=0.0625), random_init_seed=0)
    with pytest.raises(ValueError, match="cannot say which"):
        official_export.export_saved_model(encoder, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
