"""The sharded train step against a one-device run of the same step."""
import functools

import jax
import numpy as np
import pytest

from simclr_jax import optim, sharding
from simclr_jax.data import device_augment
from simclr_jax.pretraining import step as train
from simclr_jax.weights.checkpoint import PROBE
from tests.helpers import numpy_nt_xent, tiny_simclr

IMAGE_SIZE = 16
GLOBAL_BATCH = 16
# Peak 8 * 16 / 256 = 0.5 at step 0, then cosine to 0 at step 4: 0.5 * cos^2(pi * step / 8).
SCHEDULE = optim.schedule(optim.peak_learning_rate(8.0, GLOBAL_BATCH, "linear"), warmup_steps=0, total_steps=4)


@functools.cache
def _step(num_devices, augment_views=None):
    """The step on the first ``num_devices`` devices, built (and so compiled) once per module."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    model, tx = tiny_simclr(sharding.DATA_AXIS), optim.lars(learning_rate=SCHEDULE, weight_decay=1e-4)
    return mesh, model, tx, train.make_train_step(model, tx, learning_rate=SCHEDULE, temperature=0.5, mesh=mesh,
                                                  augment_views=augment_views)


def _setup(num_devices):
    mesh, model, tx, step = _step(num_devices, None)
    state = train.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh)
    return mesh, state, step


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"views": rng.uniform(size=(GLOBAL_BATCH, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)}


def _run(num_devices, num_steps=2):
    """Initial params, final state, (metrics, batch_stats, params) of each step, initial batch_stats."""
    mesh, state, step = _setup(num_devices)
    init_params, init_stats = jax.device_get((state.params, state.batch_stats))
    history = []
    for i in range(num_steps):
        state, metrics = step(state, sharding.put_batch(_batch(i), mesh))
        history.append(jax.device_get((metrics, state.batch_stats, state.params)))
    return init_params, jax.device_get(state), history, init_stats


def _max_abs_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.fixture(scope="module")
def one_device_run():
    return _run(1)


@pytest.fixture(scope="module")
def eight_device_run():
    return _run(8)


def test_eight_devices_match_one_device(one_device_run, eight_device_run):
    init_params, want_state, want_history, _ = one_device_run
    _, got_state, got_history, _ = eight_device_run
    for got, want in zip(got_history, want_history):
        for key in want[0]:
            np.testing.assert_allclose(got[0][key], want[0][key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert _max_abs_diff(got[1], want[1]) < 1e-5  # BatchNorm statistics after each step
    # Parameters after the first step. (After more steps, float rounding that
    # differs between one and eight devices can flip a ReLU in this tiny
    # network's 2x2 last stage, and the parameters drift apart by ~1e-2.)
    assert _max_abs_diff(got_history[0][2], want_history[0][2]) < 1e-5
    assert int(got_state.step) == 2
    # The steps really moved the parameters, so the comparison is not vacuous.
    assert _max_abs_diff(want_state.params, init_params) > 1e-3


def test_control_per_device_batchnorm_is_caught(one_device_run):
    # What 8 devices with per-device BatchNorm would compute: each device
    # normalises its 2 images (4 views) with their own moments. The loss and
    # device 0's statistics must differ from the global-BN run by far more
    # than the tolerance used above, so that comparison would catch it.
    # (shard_map itself also refuses it: per-device statistics are not
    # replicated, which its out_specs check reports.)
    init_params, _, want_history, init_stats = one_device_run
    want_metrics, want_batch_stats, _ = want_history[0]
    model = tiny_simclr()
    views = _batch(0)["views"]
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))  # compiled once, run 8 times
    z1, z2, device0_stats = [], [], None
    for chunk in np.split(views, 8):
        images = np.concatenate([chunk[:, 0], chunk[:, 1]])
        (_, z), updates = apply({"params": init_params, "batch_stats": init_stats}, images)
        z1.append(z[: len(chunk)])
        z2.append(z[len(chunk):])
        device0_stats = device0_stats or updates["batch_stats"]
    local_bn_loss = numpy_nt_xent(np.concatenate(z1), np.concatenate(z2), 0.5)[0]
    assert abs(float(local_bn_loss) - float(want_metrics["loss"])) > 1e-3
    assert _max_abs_diff(device0_stats, want_batch_stats) > 1e-3


def test_metrics_are_those_of_the_global_batch(one_device_run, eight_device_run):
    """The first step's loss, contrastive accuracy and entropy on 8 devices are
    the numpy NT-Xent of all 16 images' projections (train-mode BatchNorm over
    the whole batch, computed here on one device without the step), not the
    values of one device's 2 images, which differ from them by far more than
    the tolerance here."""
    init_params, _, _, stats = one_device_run
    history = eight_device_run[2]
    metrics = history[0][0]
    assert set(metrics) >= {"loss", "contrastive_acc", "contrastive_entropy", "learning_rate"}
    model = tiny_simclr()
    views = _batch(0)["views"]
    (_, z), _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        {"params": init_params, "batch_stats": stats}, np.concatenate([views[:, 0], views[:, 1]]))
    z = np.asarray(z)
    z1, z2 = z[:GLOBAL_BATCH], z[GLOBAL_BATCH:]
    names = ("loss", "contrastive_acc", "contrastive_entropy")
    want = dict(zip(names, numpy_nt_xent(z1, z2, 0.5)))
    per_device = GLOBAL_BATCH // 8
    local = [dict(zip(names, numpy_nt_xent(z1, z2, 0.5, images=range(d * per_device, (d + 1) * per_device))))
             for d in range(8)]
    print({"global": want, "device 0": local[0]})
    for name in names:
        np.testing.assert_allclose(float(metrics[name]), want[name], rtol=1e-5, atol=1e-6, err_msg=name)
        # What one device alone would report, device 0's above all (what the host reads
        # of an unreduced value), is far off: the comparison can tell the two apart.
        assert abs(local[0][name] - want[name]) > 1e-3, (name, local[0][name], want[name])
        np.testing.assert_allclose(np.mean([l[name] for l in local]), want[name], rtol=1e-6)  # the mean of the 8
    assert 0.0 < want["contrastive_acc"] < 1.0  # neither extreme, where every device would agree
    # Each step logs the schedule at its own index (that it is also the applied
    # one, skipped steps included, is tested in test_step_counter.py).
    logged = [float(m["learning_rate"]) for m, _, _ in history]
    np.testing.assert_allclose(logged, [0.5 * np.cos(np.pi * i / 8) ** 2 for i in range(len(history))],
                               rtol=1e-6)


def test_online_probe_learns_without_touching_the_encoder_gradient(eight_device_run):
    # One step with the probe against the same first step without it (eight_device_run:
    # the same initial parameters, batch, devices and schedule, 0.5 at step 0): LARS
    # updates each tensor from its own gradient only, so identical encoder and head
    # parameters afterwards mean identical gradients.
    plain_metrics, plain_batch_stats, plain_params = eight_device_run[2][0]
    mesh = sharding.make_mesh(jax.devices()[:8])
    model = tiny_simclr(sharding.DATA_AXIS)
    tx = optim.with_adam_for(PROBE, optim.lars(learning_rate=SCHEDULE, weight_decay=1e-4), 1e-3)
    state = train.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh, num_classes=10)
    step = train.make_train_step(model, tx, learning_rate=SCHEDULE, temperature=0.5, mesh=mesh, num_classes=10)
    batch = dict(_batch(0), label=np.arange(GLOBAL_BATCH, dtype=np.int32) % 10)
    probed, probed_metrics = jax.device_get(step(state, sharding.put_batch(batch, mesh)))
    assert set(probed.params) == {"encoder", "head", train.PROBE}
    assert _max_abs_diff(train.model_params(probed.params), plain_params) == 0.0
    assert _max_abs_diff(probed.batch_stats, plain_batch_stats) == 0.0
    assert float(probed_metrics["loss"]) == float(plain_metrics["loss"])
    # The zero-initialised probe starts at chance (log 10) and did move.
    np.testing.assert_allclose(float(probed_metrics["probe_loss"]), np.log(10), rtol=1e-5)
    assert np.abs(probed.params[train.PROBE]["kernel"]).max() > 0


def test_device_augmentation_runs_once_on_each_devices_views():
    # augment_on='device': the step given crops and keys is the plain step given the views
    # device_augment makes of them, on 8 devices (each augments its shard from the keys).
    # (The plain step is eight_device_run's, compiled once per module.)
    augment_views = functools.partial(device_augment.augment_views, strength=0.5, blur=True)
    crops = _batch(0)["views"]
    keys = np.random.default_rng(1).integers(0, 2**32, (GLOBAL_BATCH, 2, 2), dtype=np.uint32)
    results = []
    for augment, batch in ((augment_views, {"views": crops, "augment_keys": keys}),
                           (None, {"views": np.asarray(jax.jit(augment_views)(crops, keys))})):
        mesh, model, tx, step = _step(8, augment)
        state = train.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh)
        results.append(jax.device_get(step(state, sharding.put_batch(batch, mesh))))
    (on_device, metrics), (reference, want) = results
    np.testing.assert_allclose(metrics["loss"], want["loss"], rtol=1e-5)
    assert _max_abs_diff(on_device.params, reference.params) < 1e-5
    assert np.abs(np.asarray(batch["views"]) - crops).max() > 0.1  # the augmentation did change the views
