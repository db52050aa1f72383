"""The sharded train step against a one-device run of the same step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import models, optim, sharding
from simclr_jax import step as train
from simclr_jax.losses import nt_xent

IMAGE_SIZE = 16
GLOBAL_BATCH = 16


def _setup(num_devices, bn_axis_name=sharding.DATA_AXIS):
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    model = models.SimCLR(depth=18, width_multiplier=1 / 16, cifar_stem=True, proj_dim=16,
                          axis_name=bn_axis_name)
    tx = optim.lars(learning_rate=0.5, weight_decay=1e-4)
    state = train.create_train_state(model, tx, IMAGE_SIZE, seed=0, mesh=mesh)
    step = train.make_train_step(model, tx, lambda s: 0.5, temperature=0.5, mesh=mesh)
    return mesh, state, step


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"views": rng.uniform(size=(GLOBAL_BATCH, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)}


def _run(num_devices, num_steps=2):
    """Final state, per-step metrics and the state after the first step."""
    mesh, state, step = _setup(num_devices)
    init_params = jax.device_get(state.params)
    history = []
    for i in range(num_steps):
        state, metrics = step(state, sharding.put_batch(_batch(i), mesh))
        history.append((jax.device_get(metrics), jax.device_get(state.batch_stats)))
    return init_params, jax.device_get(state), history


def _max_abs_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.fixture(scope="module")
def one_device_run():
    return _run(1)


@pytest.fixture(scope="module")
def eight_device_run():
    return _run(8)


def test_eight_devices_match_one_device(one_device_run, eight_device_run):
    init_params, want_state, want_history = one_device_run
    _, got_state, got_history = eight_device_run
    for (got, _), (want, _) in zip(got_history, want_history):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert int(got_state.step) == 2
    assert _max_abs_diff(got_state.params, want_state.params) < 1e-5
    assert _max_abs_diff(got_state.batch_stats, want_state.batch_stats) < 1e-5
    # The steps really moved the parameters, so the comparison is not vacuous.
    assert _max_abs_diff(want_state.params, init_params) > 1e-3


def test_control_per_device_batchnorm_is_caught(one_device_run):
    # What 8 devices with per-device BatchNorm would compute: each device
    # normalises its 2 images (4 views) with their own moments. The loss and
    # device 0's statistics must differ from the global-BN run by far more
    # than the tolerance used above, so that comparison would catch it.
    # (shard_map itself also refuses it: per-device statistics are not
    # replicated, which its out_specs check reports.)
    init_params, _, want_history = one_device_run
    want_metrics, want_batch_stats = want_history[0]
    model = models.SimCLR(depth=18, width_multiplier=1 / 16, cifar_stem=True, proj_dim=16)
    init_stats = model.init(jax.random.PRNGKey(0), jnp.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3)),
                            train=False)["batch_stats"]
    views = _batch(0)["views"]
    z1, z2, device0_stats = [], [], None
    for chunk in np.split(views, 8):
        images = np.concatenate([chunk[:, 0], chunk[:, 1]])
        (_, z), updates = model.apply({"params": init_params, "batch_stats": init_stats},
                                      images, train=True, mutable=["batch_stats"])
        z1.append(z[: len(chunk)])
        z2.append(z[len(chunk):])
        device0_stats = device0_stats or updates["batch_stats"]
    local_bn_loss, _ = nt_xent(jnp.concatenate(z1), jnp.concatenate(z2), 0.5)
    assert abs(float(local_bn_loss) - float(want_metrics["loss"])) > 1e-3
    assert _max_abs_diff(device0_stats, want_batch_stats) > 1e-3


def test_metrics_are_global_and_sane(eight_device_run):
    metrics, _ = eight_device_run[2][0]
    assert set(metrics) >= {"loss", "contrastive_acc", "contrastive_entropy", "learning_rate"}
    assert 0.0 <= float(metrics["contrastive_acc"]) <= 1.0
    # The entropy of a softmax over 2N - 1 candidates is at most log(2N - 1).
    assert 0.0 < float(metrics["contrastive_entropy"]) <= np.log(2 * GLOBAL_BATCH - 1) + 1e-5
    assert float(metrics["learning_rate"]) == 0.5
