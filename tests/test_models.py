"""Tests for simclr_jax.models: shapes, parameter counts, init and BatchNorm."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simclr_jax import models
from simclr_jax.models import resnet


def _abstract_variables(module, input_shape):
    """Variables as ShapeDtypeStructs: no real init, so ResNet-50 stays cheap."""
    return jax.eval_shape(
        functools.partial(module.init, train=False),
        jax.random.key(0), jnp.zeros(input_shape, jnp.float32))


def _init(module, x):
    """Real init, jitted with the 'rbg' PRNG: threefry makes XLA:CPU compile the
    init of even a tiny ResNet for ~10 s, rbg for ~2 s."""
    init = jax.jit(functools.partial(module.init, train=False))
    return init(jax.random.key(0, impl="rbg"), x)


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


TINY = dict(depth=18, width_multiplier=0.125, cifar_stem=True)


@pytest.fixture(scope="module")
def tiny():
    """One tiny SimCLR (ResNet-18 x0.125, CIFAR stem) initialised once for the module."""
    model = models.SimCLR(**TINY, head_layers=2, proj_dim=8)
    return model, _init(model, jnp.zeros((2, 8, 8, 3)))


def _encoder_variables(variables):
    return {"params": variables["params"]["encoder"],
            "batch_stats": variables["batch_stats"]["encoder"]}


# torchvision's totals minus the 1000-way fc layer.
@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (50, 23_508_032)])
def test_resnet_param_count_matches_torchvision(depth, expected):
    variables = _abstract_variables(models.ResNet(depth), (1, 224, 224, 3))
    assert _count(variables["params"]) == expected


@pytest.mark.parametrize("depth,width,dim", [
    (18, 1.0, 512), (34, 1.0, 512), (50, 1.0, 2048), (50, 2.0, 4096), (18, 2.0, 1024)])
def test_resnet_feature_dim(depth, width, dim):
    model = models.ResNet(depth, width_multiplier=width)
    out = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=False)[0])
    assert out.shape == (2, dim)
    assert out.dtype == jnp.float32


def test_fractional_width_gives_int_channels():
    assert models.stage_widths(0.25) == (16, 32, 64, 128)
    assert models.stage_widths(0.001) == (1, 2, 4, 8)
    for w in models.stage_widths(0.3):
        assert isinstance(w, int)


def test_unknown_depth_lists_valid_ones():
    with pytest.raises(ValueError, match="18, 34, 50, 101, 152, 200"):
        _abstract_variables(models.ResNet(42), (1, 32, 32, 3))


def test_tiny_forward_zero_init_and_batch_stats(tiny):
    model = models.ResNet(**TINY)
    variables = _encoder_variables(tiny[1])
    blocks = {k: v for k, v in variables["params"].items() if k.startswith("stage")}
    assert len(blocks) == 8
    for name, block in blocks.items():
        np.testing.assert_array_equal(block["bn2"]["scale"], 0.0, err_msg=name)
        np.testing.assert_array_equal(block["bn1"]["scale"], 1.0, err_msg=name)

    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3)) + 3.0
    h, frozen = apply(variables, x, train=False, mutable=("batch_stats",))
    assert h.shape == (4, 64)  # 8 * 8 channels in the last stage
    assert h.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(h)))
    jax.tree.map(np.testing.assert_array_equal, frozen["batch_stats"],
                 variables["batch_stats"])

    _, updated = apply(variables, x, train=True, mutable=("batch_stats",))
    before = variables["batch_stats"]["stem_bn"]["mean"]
    after = updated["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(before, after)
    # Momentum 0.9: running mean = 0.9 * 0 + 0.1 * batch mean.
    stem = jax.lax.conv_general_dilated(
        x, variables["params"]["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(after, 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def _block(block_cls, features, strides=1, train=False, project=False):
    """A block with the conv and norm partials ResNet would hand it."""
    return block_cls(features=features, strides=strides, conv=resnet.conv_def(jnp.float32),
                     norm=resnet.norm_def(train, None, jnp.float32), project=project)


@pytest.mark.parametrize("block_cls,features", [
    (resnet.BasicBlock, 8), (resnet.Bottleneck, 2)])
def test_block_at_init_is_relu_of_shortcut(block_cls, features):
    # Identity shortcut: 8 input channels = features * expansion.
    x = jax.random.normal(jax.random.key(2), (2, 4, 4, 8))
    variables = jax.jit(_block(block_cls, features).init)(jax.random.key(0, impl="rbg"), x)
    assert "proj_conv" not in variables["params"]
    for train in (False, True):
        apply = jax.jit(functools.partial(_block(block_cls, features, train=train).apply,
                                          mutable=("batch_stats",)))
        y, _ = apply(variables, x)
        np.testing.assert_allclose(y, jax.nn.relu(x), atol=1e-6)


def test_bottleneck_stride_on_3x3_and_projection():
    block = _block(resnet.Bottleneck, features=4, strides=2, project=True)
    x = jnp.zeros((1, 8, 8, 8))
    out, variables = jax.eval_shape(lambda: block.init_with_output(jax.random.key(0), x))
    params = variables["params"]
    assert params["conv1"]["kernel"].shape == (1, 1, 8, 4)
    assert params["conv2"]["kernel"].shape == (3, 3, 4, 4)
    assert params["proj_conv"]["kernel"].shape == (1, 1, 8, 16)
    assert out.shape == (1, 4, 4, 16)


def test_norm_def_is_simclr_batchnorm():
    """momentum 0.9, epsilon 1e-5 and the two-pass variance, against float64 numpy.

    The input's mean (100) is large next to its spread (0.01): float32
    E[x^2] - E[x]^2 would lose the variance entirely, and epsilon is a tenth
    of it, so a different epsilon moves the output by percents.
    """
    rng = np.random.default_rng(5)
    x = (100.0 + 0.01 * rng.normal(size=(64, 3))).astype(np.float32)
    bn = resnet.norm_def(train=True, axis_name=None, dtype=jnp.float32)()
    variables = bn.init(jax.random.key(0), x)
    y, updated = bn.apply(variables, x, mutable=["batch_stats"])

    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=0), x64.var(axis=0)
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5), rtol=1e-3, atol=1e-3)
    stats = updated["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-6)


def _expected_param_paths(depth):
    """Every parameter path of SimCLR(depth, head_layers=2), written out from
    the architecture: checkpoints saved under these names must keep loading."""
    kind, blocks_per_stage = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}[depth]
    convs = ("conv1", "conv2") if kind == "basic" else ("conv1", "conv2", "conv3")
    paths = {"encoder/stem_conv/kernel", "encoder/stem_bn/scale", "encoder/stem_bn/bias"}
    for stage, num_blocks in enumerate(blocks_per_stage):
        for b in range(num_blocks):
            prefix = f"encoder/stage{stage + 1}_block{b + 1}"
            # The first block of each stage changes shape (stride 2, or the
            # bottleneck's x4 channels) and so has a projection shortcut.
            layers = [(c, f"bn{c[-1]}") for c in convs]
            if b == 0 and (stage > 0 or kind == "bottleneck"):
                layers.append(("proj_conv", "proj_bn"))
            for conv, bn in layers:
                paths |= {f"{prefix}/{conv}/kernel", f"{prefix}/{bn}/scale", f"{prefix}/{bn}/bias"}
    paths |= {"head/dense1/kernel", "head/bn1/scale", "head/bn1/bias", "head/dense2/kernel", "head/bn2/scale"}
    return paths


@pytest.mark.parametrize("depth", [18, 50])
def test_parameter_names_are_checkpoint_compatible(depth):
    variables = _abstract_variables(models.SimCLR(depth, head_layers=2), (1, 32, 32, 3))
    paths = {"/".join(k.key for k in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])}
    assert paths == _expected_param_paths(depth)
    stats = {"/".join(k.key for k in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])}
    bn_layers = {p.rsplit("/", 1)[0] for p in paths if p.endswith("/scale")}
    assert stats == {f"{layer}/{s}" for layer in bn_layers for s in ("mean", "var")}


def test_projection_head_structure():
    head = models.ProjectionHead(num_layers=3, out_dim=16)
    h = jax.random.normal(jax.random.key(3), (4, 32))
    variables = _init(head, h)
    params = variables["params"]
    assert params["dense1"]["kernel"].shape == (32, 32)
    assert params["dense2"]["kernel"].shape == (32, 32)
    assert params["dense3"]["kernel"].shape == (32, 16)
    for i in (1, 2, 3):
        assert set(params[f"dense{i}"]) == {"kernel"}
    assert set(params["bn1"]) == {"scale", "bias"}
    assert set(params["bn3"]) == {"scale"}

    outs = head.apply(variables, h, train=False, return_all=True)
    assert len(outs) == 4
    np.testing.assert_array_equal(outs[0], h)
    assert [o.shape for o in outs] == [(4, 32), (4, 32), (4, 32), (4, 16)]
    assert np.all(np.asarray(outs[1]) >= 0) and np.all(np.asarray(outs[2]) >= 0)
    z = head.apply(variables, h, train=False)
    np.testing.assert_array_equal(z, outs[-1])
    assert np.any(np.asarray(z) < 0)  # no ReLU on the output


def test_projection_head_param_count_and_validation():
    variables = _abstract_variables(models.ProjectionHead(2, 128), (2, 512))
    assert _count(variables["params"]) == 512 * 512 + 2 * 512 + 512 * 128 + 128
    with pytest.raises(ValueError, match="num_layers"):
        _abstract_variables(models.ProjectionHead(0), (2, 8))


def test_simclr_from_config_and_bfloat16(tiny):
    config = ml_collections.ConfigDict(dict(**TINY, head_layers=2, proj_dim=8, variant="torchvision", sk_ratio=0.0,
                                            se_ratio=0.0, stem_pool_padding="same"))
    model = models.model_from_config(config, dtype=jnp.bfloat16)
    assert isinstance(model, models.SimCLR)
    assert model.dtype == jnp.bfloat16 and model.head_layers == 2
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    abstract = _abstract_variables(model, x.shape)
    assert set(abstract["params"]) == {"encoder", "head"}
    for leaf in jax.tree.leaves(abstract):
        assert leaf.dtype == jnp.float32
    # The float32 variables of the same architecture run in bfloat16 compute.
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    (h, z), _ = apply(tiny[1], x)
    assert h.shape == (4, 64) and z.shape == (4, 8)
    assert h.dtype == jnp.float32 and z.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(z)))


def test_global_batchnorm_under_shard_map(tiny):
    """BN with axis_name over 4 devices gives the same stats as 1 device on the batch."""
    model, variables = tiny
    sharded_model = model.clone(axis_name="data")
    # A different offset per shard, so per-device statistics would be far off.
    offsets = jnp.repeat(jnp.arange(4.0), 2)[:, None, None, None]
    x = jax.random.normal(jax.random.key(4), (8, 8, 8, 3)) + offsets

    def step(m, variables, x):
        (h, z), updated = m.apply(variables, x, train=True, mutable=["batch_stats"])
        return h, z, updated["batch_stats"]

    h_ref, z_ref, stats_ref = jax.jit(functools.partial(step, model))(variables, x)

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded_step = jax.jit(jax.shard_map(
        functools.partial(step, sharded_model), mesh=mesh,
        in_specs=(P(), P("data")), out_specs=(P("data"), P("data"), P())))
    h, z, stats = sharded_step(variables, x)

    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                 stats, stats_ref)
    np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
