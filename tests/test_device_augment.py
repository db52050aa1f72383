"""Tests for the on-device colour distortion and blur (simclr_jax/data/device_augment.py).

Each op against a numpy reference (and the host's TensorFlow op) for given
parameters; the laws of the random parameters; the host and device views of
the same crops against each other, statistic by statistic, within sampling
noise; the same views on 1 and 8 devices; the same views from the same keys.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simclr_jax.data import augment, device_augment, distortion, input_pipeline

ATOL = 2e-6  # float32 rounding of [0, 1] values


def _images(n, size, seed=0, detail=6):
    """Smooth random colour images: detail x detail random colours upscaled (bicubic, clipped)."""
    small = np.random.default_rng(seed).uniform(size=(n, detail, detail, 3)).astype(np.float32)
    return np.clip(tf.image.resize(small, [size, size], method="bicubic").numpy(), 0.0, 1.0)


# ------------------------------------------------------------ numpy references


def _rgb_to_hsv(x):
    """colorsys.rgb_to_hsv, vectorised, in float64."""
    x = x.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = x.max(-1), x.min(-1)
    d = maxc - minc
    safe = np.where(d > 0, d, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(d > 0, (h / 6.0) % 1.0, 0.0)
    s = np.where(maxc > 0, d / np.where(maxc > 0, maxc, 1.0), 0.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    """colorsys.hsv_to_rgb, vectorised: the sector formulas."""
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(int) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.select([i == k for k in range(6)], [c[ch] for c in choices]) for ch in range(3)], -1)


def np_saturation(x, f):
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(h, np.clip(s * f, 0.0, 1.0), v)


def np_hue(x, delta):
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + delta) % 1.0, s, v)


def np_contrast(x, f):
    mean = x.astype(np.float64).mean(axis=(0, 1), keepdims=True)
    return (x - mean) * f + mean


def np_blur(x, sigma, radius):
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-taps ** 2 / (2.0 * sigma ** 2))
    kernel /= kernel.sum()
    y = x.astype(np.float64)
    for axis in (0, 1):
        n = y.shape[axis]
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(y, pad, mode="reflect")
        y = sum(k * np.take(padded, np.arange(t, t + n), axis=axis) for t, k in enumerate(kernel))
    return np.clip(y, 0.0, 1.0)


NP_OPS = {
    "brightness": lambda x, f: x * f, "contrast": np_contrast, "saturation": np_saturation, "hue": np_hue,
}
TF_OPS = {
    "brightness": tf.multiply, "contrast": tf.image.adjust_contrast, "saturation": tf.image.adjust_saturation,
    "hue": tf.image.adjust_hue,
}


@pytest.mark.parametrize("name,factors", [
    ("brightness", (0.2, 0.9, 1.7)), ("contrast", (0.2, 0.9, 1.8)), ("saturation", (0.0, 0.3, 1.0, 1.8)),
    ("hue", (-0.2, -0.05, 0.13, 0.2)),
])
def test_jitter_op_matches_numpy_and_tensorflow(name, factors):
    images = _images(3, 16)
    images[0, :4] = images[0, :4, :, :1]  # grey pixels: hue and saturation are 0 there
    op = jax.jit(getattr(device_augment, name))
    errors = []
    for image, factor in itertools.product(images, factors):
        out = np.asarray(op(image, np.float32(factor)))
        want, host = NP_OPS[name](image, factor), TF_OPS[name](image, np.float32(factor)).numpy()
        errors.append((np.abs(out - want).max(), np.abs(out - host).max()))
        np.testing.assert_allclose(out, want, atol=ATOL, rtol=0)
        np.testing.assert_allclose(out, host, atol=ATOL, rtol=0)
    print(name, "max |error| vs numpy, vs TF:", np.max(errors, axis=0))


def test_grayscale_matches_numpy_and_tensorflow():
    image = _images(1, 16)[0]
    out = np.asarray(device_augment.to_grayscale(image))
    luma = image.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140])
    print("grayscale max |error| vs numpy, vs TF:", np.abs(out - luma[..., None]).max(),
          np.abs(out - augment.to_grayscale(image).numpy()).max())
    np.testing.assert_allclose(out, np.repeat(luma[..., None], 3, -1), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out, augment.to_grayscale(image).numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("radius,sigma", [(1, 0.1), (2, 1.0), (11, 2.0)])
def test_blur_matches_numpy_and_tensorflow(radius, sigma):
    # Radius 11 is 224 px's (the host's banded-matmul path), 1 and 2: 20-49 px.
    image = _images(1, 32)[0]
    out = np.asarray(jax.jit(device_augment.gaussian_blur, static_argnums=2)(image, sigma, radius))
    print(f"blur r={radius} sigma={sigma} max |error| vs numpy, vs TF:",
          np.abs(out - np_blur(image, sigma, radius)).max(),
          np.abs(out - augment.gaussian_blur(image, sigma, radius).numpy()).max())
    np.testing.assert_allclose(out, np_blur(image, sigma, radius), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out, augment.gaussian_blur(image, sigma, radius).numpy(), atol=ATOL, rtol=0)
    assert device_augment.gaussian_blur(image, sigma, 0) is image  # under 20 px: no blur, as on the host


def test_color_jitter_applies_the_ops_in_order():
    image = _images(1, 16)[0]
    factors = np.array([1.5, 0.6, 1.7, 0.15], np.float32)
    names = ("brightness", "contrast", "saturation", "hue")
    jitter = jax.jit(device_augment.color_jitter)
    for order in ((0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)):
        expected = image.astype(np.float64)
        for i in order:
            expected = np.clip(NP_OPS[names[i]](expected, factors[i]), 0.0, 1.0)
        out = np.asarray(jitter(image, factors, np.array(order, np.int32)))
        print("jitter order", order, "max |error| vs numpy:", np.abs(out - expected).max())
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------ random parameters

N_KEYS = 4000


def _sigmas(p, n=N_KEYS):
    return 4 * np.sqrt(p * (1 - p) / n)  # 4 binomial standard deviations


def test_parameter_laws():
    strength = 0.5
    keys = jax.random.split(jax.random.key(0, impl=device_augment.KEY_IMPL), N_KEYS)
    params = jax.tree.map(np.asarray, jax.jit(jax.vmap(lambda k: device_augment.view_parameters(k, strength)))(keys))
    for name, p in (("jitter", distortion.JITTER_P), ("gray", distortion.GRAY_P), ("blur", distortion.BLUR_P)):
        assert abs(params[name].mean() - p) < _sigmas(p), (name, params[name].mean())
    low, high = distortion.jitter_factor_range(strength)
    factors = params["factors"]
    assert factors[:, :3].min() >= low and factors[:, :3].max() <= high
    assert abs(factors[:, 3]).max() <= 0.2 * strength
    np.testing.assert_allclose(factors.mean(0), [(low + high) / 2] * 3 + [0.0], atol=0.02)
    assert params["sigma"].min() >= 0.1 and params["sigma"].max() <= 2.0
    orders = {tuple(o) for o in params["order"]}
    assert len(orders) == 24  # every permutation of the four ops occurs


# ------------------------------------------------------------ host vs device views

SIZE, NUM_SOURCES, NUM_VIEWS, STRENGTH = 40, 64, 2048, 1.0  # 40 px: blur radius 2


def _host_views(sources, colour_and_blur):
    """View j: train_view of source j % NUM_SOURCES with seed [j, 777], and its device key."""
    images = tf.constant(sources)

    def view(j):
        seed = tf.stack([j, tf.constant(777, tf.int64)])
        image = augment.train_view(tf.gather(images, j % NUM_SOURCES), SIZE, SIZE, seed=seed,
                                   color_jitter_strength=STRENGTH, blur=True, colour_and_blur=colour_and_blur)
        return image, augment.device_key_data(seed)

    ds = tf.data.Dataset.range(NUM_VIEWS).map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return tuple(t.numpy() for t in ds.batch(NUM_VIEWS).get_single_element())


def _statistics(views, crops):
    """Per-view statistics [n, k] and their names: channel means, mean saturation,
    the fraction of its pixels in each of 6 hue bins (chromatic pixels only),
    the gradient energy, the blur response (gradient energy over the view's
    standard deviation, which the colour ops scale alike), whether it is grey,
    and how far the view moved from its crop."""
    h, s, _ = _rgb_to_hsv(views)
    chromatic = s > 0.1
    bins = np.minimum((h * 6).astype(int), 5)
    hue_hist = np.stack([(chromatic & (bins == k)).mean(axis=(1, 2)) for k in range(6)], -1)
    gradient = np.abs(np.diff(views, axis=2)).mean(axis=(1, 2, 3))
    sharpness = gradient / (views.std(axis=(1, 2, 3)) + 1e-3)
    grey = (views.max(-1) - views.min(-1)).max(axis=(1, 2)) < 1e-4
    moved = np.abs(views - crops).mean(axis=(1, 2, 3))
    stats = np.concatenate([views.mean(axis=(1, 2)), s.mean(axis=(1, 2))[:, None], hue_hist, gradient[:, None],
                            sharpness[:, None], grey[:, None], moved[:, None]], axis=1)
    names = ["mean_r", "mean_g", "mean_b", "saturation"] + [f"hue_bin{k}" for k in range(6)] + [
        "gradient", "blur_response", "grey", "distortion"]
    return stats, names


@pytest.fixture(scope="module")
def host_and_device_views():
    sources = _images(NUM_SOURCES, 48, seed=1, detail=16)  # fine detail, for blur to remove
    host, _ = _host_views(sources, colour_and_blur=True)
    crops, keys = _host_views(sources, colour_and_blur=False)  # the same crops and flips
    augment_fn = jax.jit(functools.partial(device_augment.augment_views, strength=STRENGTH, blur=True))
    device = np.asarray(augment_fn(crops[:, None], keys[:, None]))[:, 0]
    return host, device, crops


def test_host_and_device_views_agree_in_distribution(host_and_device_views):
    host, device, crops = host_and_device_views
    assert device.shape == host.shape and device.min() >= 0.0 and device.max() <= 1.0
    host_stats, names = _statistics(host, crops)
    device_stats, _ = _statistics(device, crops)
    # Paired by crop: view i of both sets is the same crop, distorted independently, so
    # the differences are i.i.d. and their mean's standard error is the noise.
    differences = host_stats - device_stats
    gap, noise = differences.mean(0), differences.std(0) / np.sqrt(len(host))
    report = {name: (round(float(g), 5), round(float(4 * s), 5)) for name, g, s in zip(names, gap, noise)}
    print("host - device mean, 4 sigma:", report)
    assert (np.abs(gap) < 4 * noise).all(), report
    assert device_stats[:, names.index("distortion")].mean() > 0.05  # not vacuous: the views are distorted


# ------------------------------------------------------------ devices, keys, resume


def _sharded_augment(devices, views, keys):
    mesh = Mesh(np.array(devices), ("data",))
    fn = jax.shard_map(functools.partial(device_augment.augment_views, strength=STRENGTH, blur=True), mesh=mesh,
                       in_specs=(P("data"), P("data")), out_specs=P("data"))
    return np.asarray(jax.jit(fn)(views, keys))


def test_one_and_eight_devices_give_the_same_views(host_and_device_views):
    _, _, crops = host_and_device_views
    views = crops[:32].reshape(16, 2, SIZE, SIZE, 3)
    keys = np.random.default_rng(2).integers(0, 2**32, (16, 2, 2), dtype=np.uint32)
    one, eight = _sharded_augment(jax.devices()[:1], views, keys), _sharded_augment(jax.devices()[:8], views, keys)
    print("1 vs 8 devices, max |difference|:", np.abs(one - eight).max())
    np.testing.assert_allclose(one, eight, atol=1e-6, rtol=0)
    assert np.abs(one - views).max() > 0.1


def test_views_follow_their_keys():
    # The same key gives the same view (a resume sees what the run saw); another key, another view.
    views = np.repeat(_images(1, 24)[:, None], 2, axis=1)  # one crop as both views
    keys_at = input_pipeline.example_seeds(5, 2, process_index=0)
    keys = tf.stack([tf.stack([augment.device_key_data(s) for s in tf.unstack(keys_at(p))]) for p in (7, 7, 8)])
    keys = keys.numpy()
    np.testing.assert_array_equal(keys[0], keys[1])
    assert not np.array_equal(keys[0, 0], keys[0, 1]) and not np.array_equal(keys[0], keys[2])
    out = np.asarray(jax.jit(functools.partial(device_augment.augment_views, strength=STRENGTH, blur=True))(
        np.concatenate([views] * 3), keys))
    np.testing.assert_array_equal(out[0], out[1])
    assert np.abs(out[0, 0] - out[0, 1]).max() > 1e-3  # the views of an example differ
    assert np.abs(out[0] - out[2]).max() > 1e-3


def test_no_gradient_flows_through_the_augmentation():
    views = _images(2, 16).reshape(1, 2, 16, 16, 3)
    keys = np.arange(4, dtype=np.uint32).reshape(1, 2, 2)
    augment_fn = functools.partial(device_augment.augment_views, strength=STRENGTH, blur=True)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(augment_fn(v, keys))))(views)
    assert not np.asarray(grad).any()
