"""SimCLR's colour distortion and Gaussian blur in JAX, run on the accelerator.

With ``config.augment_on = 'device'`` the host only decodes, crops and flips
(augment.py); ``augment_views`` finishes every view inside the jitted train
step: colour jitter (p = 0.8: brightness, contrast, saturation and hue in a
random order), grayscale (p = 0.2), then the optional Gaussian blur (p = 0.5).
The operations and distributions are augment.py's (the official SimCLR's:
brightness multiplies, contrast and saturation scale about the channel mean
and in HSV, hue rotates), so host and device views are drawn from the same
law; tests/test_device_augment.py checks each op against numpy and the two
pipelines' statistics against each other.

Each view's parameters come from its own key, which the batch carries
(``'augment_keys'``, made on the host from (seed, process, position, view) by
``augment.device_key_data``): a view depends on neither the device count nor
the device holding it, and a resumed run sees the same views. The ops are
written for one [H, W, 3] image and vmapped, so every image draws its own
parameters. They act on the step's inputs, before the forward pass, so no
gradient is ever taken through them. No TensorFlow here.
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from simclr_jax.data import distortion

KEY_IMPL = "threefry2x32"  # named, not the default impl: the views must not change with a JAX flag
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale's luma weights
_NUM_UNIFORMS = 12  # one draw per view: see view_parameters


# ------------------------------------------------------------------ jitter ops


def brightness(image, factor):
    """Multiplies every pixel (SimCLR v2's multiplicative brightness)."""
    return image * factor


def contrast(image, factor):
    """tf.image.adjust_contrast: each channel scaled about its mean over the image."""
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)
    return (image - mean) * factor + mean


def saturation(image, factor):
    """tf.image.adjust_saturation: HSV saturation times ``factor``, capped at 1.

    Hue and value stay, so each channel moves away from the value v (the
    channels' max) by the ratio of the new saturation to the old,
    min(factor, 1 / s): no HSV round trip is needed.
    """
    value = jnp.max(image, axis=-1, keepdims=True)
    spread = value - jnp.min(image, axis=-1, keepdims=True)  # v * s
    grey = spread <= 0
    ratio = jnp.minimum(factor, value / jnp.where(grey, 1.0, spread))
    return jnp.where(grey, image, value - (value - image) * ratio)


def hue(image, delta):
    """tf.image.adjust_hue: the HSV hue rotated by ``delta`` turns (value and
    saturation kept), through the hexcone formulas."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    value = jnp.max(image, axis=-1)
    spread = value - jnp.min(image, axis=-1)
    safe = jnp.where(spread > 0, spread, 1.0)
    sector = jnp.where(value == r, (g - b) / safe,
                       jnp.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = jnp.mod(jnp.where(spread > 0, sector, 0.0) + 6.0 * delta, 6.0)  # in sixths of a turn
    channels = []
    for n in (5.0, 3.0, 1.0):  # r, g, b
        k = jnp.mod(n + h, 6.0)
        channels.append(value - spread * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.stack(channels, axis=-1)


def color_jitter(image, factors, order):
    """The four ops in ``order`` (indices into brightness, contrast, saturation,
    hue), each with its entry of ``factors`` and clipped to [0, 1], as augment.color_jitter."""
    ops = (brightness, contrast, saturation, hue)
    branches = [lambda x, op=op, f=factors[i]: op(x, f) for i, op in enumerate(ops)]
    for i in range(4):
        image = jnp.clip(jax.lax.switch(order[i], branches, image), 0.0, 1.0)
    return image


def to_grayscale(image):
    """tf.image.rgb_to_grayscale's luma, tiled back to 3 channels."""
    gray = image @ jnp.asarray(GRAY_WEIGHTS, image.dtype)
    return jnp.repeat(gray[..., None], 3, axis=-1)


# ------------------------------------------------------------------------ blur


def blur_kernel(sigma, radius: int):
    """Normalised 1-D Gaussian taps at -radius..radius (augment.blur_kernel)."""
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-jnp.square(x) / (2.0 * jnp.square(sigma)))
    return kernel / jnp.sum(kernel)


def _blur_pass(image, kernel, radius: int, axis: int):
    """One separable pass: 2r + 1 weighted slices of the reflect-padded image
    (elementwise work that XLA fuses into one loop)."""
    n = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode="reflect")
    out = kernel[0] * jax.lax.slice_in_dim(padded, 0, n, axis=axis)
    for t in range(1, 2 * radius + 1):
        out = out + kernel[t] * jax.lax.slice_in_dim(padded, t, t + n, axis=axis)
    return out


def gaussian_blur(image, sigma, radius: int):
    """augment.gaussian_blur: separable, reflect-padded, clipped to [0, 1];
    radius 0 (images under 20 px) leaves the image as it is."""
    if radius == 0:
        return image
    kernel = blur_kernel(sigma, radius)
    blurred = _blur_pass(_blur_pass(image, kernel, radius, axis=0), kernel, radius, axis=1)
    return jnp.clip(blurred, 0.0, 1.0)


# ----------------------------------------------------------------------- views


def view_parameters(key, strength: float) -> dict:
    """One view's random choices, from one draw of uniforms under ``key``.

    The laws are augment.py's: jitter with p = 0.8, its brightness, contrast
    and saturation factors U[max(0, 1 - 0.8 s), 1 + 0.8 s], hue delta
    U[-0.2 s, 0.2 s], its order a uniform permutation (argsort of i.i.d.
    uniforms); grayscale with p = 0.2; blur with p = 0.5 and sigma U[0.1, 2].
    """
    u = jax.random.uniform(key, (_NUM_UNIFORMS,))
    low, high = distortion.jitter_factor_range(strength)
    hue_max = distortion.hue_max(strength)
    sigma_low, sigma_high = distortion.BLUR_SIGMA_RANGE
    return {
        "jitter": u[0] < distortion.JITTER_P,
        "factors": jnp.concatenate([low + (high - low) * u[1:4], hue_max * (2.0 * u[4:5] - 1.0)]),
        "order": jnp.argsort(u[5:9]),
        "gray": u[9] < distortion.GRAY_P,
        "blur": u[10] < distortion.BLUR_P,
        "sigma": sigma_low + (sigma_high - sigma_low) * u[11],
    }


def distort(image, params: dict, radius: int, blur: bool):
    """One view's colour distortion, then (with ``blur``) its blur, as
    augment._finish_view after the flip. Each random op is computed and
    selected, as vmap turns a branch on a per-image coin into anyway."""
    image = jnp.where(params["jitter"], color_jitter(image, params["factors"], params["order"]), image)
    image = jnp.where(params["gray"], to_grayscale(image), image)
    if blur:
        image = jnp.where(params["blur"], gaussian_blur(image, params["sigma"], radius), image)
    return image


def augment_views(views, key_data, *, strength: float, blur: bool):
    """Colour (and blur) of a batch of cropped, flipped views, each from its key.

    views: float32 [n, V, H, W, 3] in [0, 1]; key_data: uint32 [n, V, 2]
    (``augment.device_key_data``), view (i, v)'s threefry key. Returns the
    views' shape. Works on any shard of the batch: each view needs only its key.
    """
    n, num_views, height, width, channels = views.shape
    keys = jax.random.wrap_key_data(key_data.reshape(n * num_views, 2), impl=KEY_IMPL)
    radius = distortion.blur_radius(height, width)

    def one(image, key):
        return distort(image, view_parameters(key, strength), radius, blur)

    flat = views.reshape(n * num_views, height, width, channels)
    return jax.lax.stop_gradient(jax.vmap(one)(flat, keys).reshape(views.shape))


def from_config(config) -> Optional[Callable]:
    """``augment_views`` with the config's strength and blur when
    ``config.augment_on == 'device'``; None when the host does it all."""
    if config.augment_on == "host":
        return None
    return functools.partial(augment_views, strength=config.color_jitter_strength, blur=config.blur)
