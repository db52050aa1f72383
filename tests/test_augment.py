"""Tests for the SimCLR augmentations: shapes, ranges, probabilities, params."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.data import augment

N = 800  # samples per probability test


def _random_image(h, w, seed=0, dtype=np.uint8):
    image = np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)
    if dtype == np.uint8:
        return image
    return (image / 255.0).astype(dtype)


def _over_seeds(fn, n=N):
    """Stacks fn(seed) for n distinct seeds, evaluated in one tf.data pass."""
    ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([i, 12345 + 7 * i])))
    return tf.nest.map_structure(lambda t: t.numpy(), ds.batch(n).get_single_element())


def _assert_rate(hits, p, n=N):
    # Binomial tolerance of 4 standard deviations.
    rate = np.mean(hits)
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), (rate, p)


@pytest.mark.parametrize("in_shape,out_hw", [
    ((32, 32), (32, 32)), ((40, 56), (24, 24)), ((20, 30), (48, 40)), ((64, 48), (224, 224)),
])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_views_shape_dtype_range(in_shape, out_hw, dtype):
    image = _random_image(*in_shape, dtype=dtype)
    views = [augment.train_view(image, *out_hw, seed=tf.constant([s, 1])) for s in range(3)]
    views.append(augment.train_view(image, *out_hw))  # fresh random seed
    views.append(augment.eval_view(image, *out_hw))
    for view in views:
        assert view.shape == (*out_hw, 3)
        assert view.dtype == tf.float32
        v = view.numpy()
        assert v.min() >= 0.0 and v.max() <= 1.0


def test_uint8_and_float_inputs_agree():
    image = _random_image(40, 40)
    seed = tf.constant([3, 4])
    a = augment.train_view(image, 32, 32, seed=seed)
    b = augment.train_view(image / 255.0, 32, 32, seed=seed)
    np.testing.assert_allclose(a, b, atol=1e-5)


def _bicubic(image, height, width):
    """Reference resize of a float [0, 1] numpy image: TF's bicubic, clipped."""
    resized = tf.image.resize(tf.constant(image, tf.float32), [height, width], method="bicubic")
    return np.clip(resized.numpy(), 0.0, 1.0)


def test_eval_view_is_identity_on_32x32_and_crops_larger():
    image = _random_image(32, 32)
    np.testing.assert_allclose(augment.eval_view(image, 32, 32), image / 255.0, atol=1e-6)
    # 64x80 -> centre 56x56 window (87.5% of 64), then identity resize.
    big = _random_image(64, 80)
    expected = big[4:60, 12:68] / 255.0
    np.testing.assert_allclose(augment.eval_view(big, 56, 56), expected, atol=1e-6)
    # The same window, bicubic-resized to 24x24.
    np.testing.assert_allclose(augment.eval_view(big, 24, 24), _bicubic(expected, 24, 24), atol=1e-6)
    # A 1:2 output: the largest centred 1:2 window of 64x80 is 40x80; 87.5% of it
    # is 35x70, at rows 15:50 and columns 5:75.
    np.testing.assert_allclose(augment.eval_view(big, 24, 48),
                               _bicubic(big[15:50, 5:75] / 255.0, 24, 48), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_bad_sizes_and_strength_raise(bad):
    image = _random_image(8, 8)
    with pytest.raises(ValueError, match="height must be a positive int"):
        augment.train_view(image, bad, 8)
    with pytest.raises(ValueError, match="width must be a positive int"):
        augment.eval_view(image, 8, bad)


def test_negative_strength_raises():
    with pytest.raises(ValueError, match="color_jitter_strength must be >= 0"):
        augment.train_view(_random_image(8, 8), 8, 8, color_jitter_strength=-0.1)


def test_same_seed_reproduces_and_seeds_differ():
    image = _random_image(32, 32)
    a = augment.train_view(image, 32, 32, seed=tf.constant([1, 2]), color_jitter_strength=0.5)
    b = augment.train_view(image, 32, 32, seed=tf.constant([1, 2]), color_jitter_strength=0.5)
    c = augment.train_view(image, 32, 32, seed=tf.constant([1, 3]), color_jitter_strength=0.5)
    np.testing.assert_array_equal(a.numpy(), b.numpy())  # bitwise
    assert np.abs(a.numpy() - c.numpy()).mean() > 1e-2
    # Unseeded views draw fresh seeds.
    assert not np.array_equal(augment.train_view(image, 32, 32), augment.train_view(image, 32, 32))


def _composed_view(image, size, seed, *, order, strength=0.5):
    """A training view built from the public pieces, applied in ``order``,
    with train_view's derived seeds: crop 0, flip 1, colour 2, blur 3."""
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    steps = {
        "crop": lambda x: augment.random_resized_crop(x, size, size, seeds[0]),
        "flip": lambda x: augment.random_flip(x, seeds[1]),
        "colour": lambda x: augment.color_distortion(x, seeds[2], strength),
        "blur": lambda x: augment.random_blur(x, seeds[3], augment.blur_radius(size, size)),
    }
    x = augment.to_float(image)
    for step in order:
        x = steps[step](x)
    return x.numpy()


TRAIN_ORDER = ("crop", "flip", "colour", "blur")
OTHER_ORDERS = {
    "flip before crop": ("flip", "crop", "colour", "blur"),
    "blur before colour": ("crop", "flip", "blur", "colour"),
    "blur before crop": ("blur", "crop", "flip", "colour"),
}


def test_train_view_is_crop_then_flip_then_colour_then_blur():
    image = _random_image(80, 96)
    size, seeds = 64, [tf.constant([s, 11], tf.int64) for s in range(8)]
    views = [augment.train_view(image, size, size, seed=s, color_jitter_strength=0.5).numpy()
             for s in seeds]
    for seed, view in zip(seeds, views):
        np.testing.assert_allclose(view, _composed_view(image, size, seed, order=TRAIN_ORDER),
                                   atol=1e-6)
    # The pieces do not commute on these seeds, so the comparison above pins the order.
    for name, order in OTHER_ORDERS.items():
        gaps = [np.abs(view - _composed_view(image, size, seed, order=order)).max()
                for seed, view in zip(seeds, views)]
        assert max(gaps) > 0.05, (name, gaps)


@pytest.mark.parametrize("shape", [(32, 32), (224, 224), (48, 96)])
def test_crop_box_area_and_aspect(shape):
    h, w = shape
    boxes = _over_seeds(lambda s: augment.sample_crop_box([h, w, 3], s))
    offset, size = boxes
    ch, cw = size[:, 0].astype(float), size[:, 1].astype(float)
    assert (offset >= 0).all() and (offset + size <= [h, w]).all()
    area = ch * cw / (h * w)
    assert area.min() >= 0.08 and area.max() <= 1.0
    # TF rounds the width to whole pixels, so allow half a pixel of slack.
    aspect = cw / ch
    assert (aspect >= 3 / 4 - 0.5 / ch - 1e-6).all()
    assert (aspect <= 4 / 3 + 0.5 / ch + 1e-6).all()
    # The reference's min_object_covered=0.1 on the whole-image box lifts the
    # effective floor from 0.08 to 0.1.
    assert area.min() >= augment.CROP_MIN_OBJECT_COVERED
    assert area.min() < 0.15  # spread over the range, not stuck at a bound
    if h == w:
        # TF draws the crop height uniformly, so the mean area is ~0.42, not
        # the 0.54 of an area drawn uniformly from [0.08, 1].
        assert 0.35 < area.mean() < 0.5
        assert area.max() > 0.9


def test_flip_probability():
    # Left half dark, right half bright: a flip swaps them.
    image = np.zeros((8, 8, 3), np.float32)
    image[:, 4:] = 1.0
    out = _over_seeds(lambda s: augment.random_flip(image, s))
    same = (out == image).all(axis=(1, 2, 3))
    flipped = (out == image[:, ::-1]).all(axis=(1, 2, 3))
    assert (same != flipped).all()
    _assert_rate(flipped, 0.5)


def test_color_jitter_and_grayscale_probabilities():
    image = _random_image(8, 8, dtype=np.float32)
    out = _over_seeds(lambda s: augment.color_distortion(image, s, strength=1.0))
    gray = np.abs(out - out[..., :1]).max(axis=(1, 2, 3)) < 1e-6
    _assert_rate(gray, 0.2)
    # Grayscale is independent of jitter, so among colour outputs p(jitter) = 0.8.
    changed = np.abs(out - image).max(axis=(1, 2, 3)) > 1e-4
    _assert_rate(changed[~gray], 0.8, n=int((~gray).sum()))


def test_blur_probability():
    image = _random_image(40, 40, dtype=np.float32)
    out = _over_seeds(lambda s: augment.random_blur(image, s, radius=2))
    # A blur with sigma near 0.1 is an exact no-op in float32, which biases
    # the observed rate down by about 2%, well inside the tolerance.
    blurred = (out != image).any(axis=(1, 2, 3))
    _assert_rate(blurred, 0.5)
    assert (out.std(axis=(1, 2, 3))[blurred] <= image.std() + 1e-6).all()  # blur smooths


def test_random_apply_probability():
    out = _over_seeds(lambda s: augment.random_apply(lambda x: x + 1.0, 0.3, tf.zeros([]), s))
    _assert_rate(out == 1.0, 0.3)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_jitter_factor_ranges(strength):
    f = _over_seeds(lambda s: augment.jitter_factors(s, strength))
    low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    for k in range(3):
        assert f[:, k].min() >= low and f[:, k].max() <= high
        assert f[:, k].min() < low + 0.05 and f[:, k].max() > high - 0.05
    hue = f[:, 3]
    assert hue.min() >= -0.2 * strength and hue.max() <= 0.2 * strength
    assert hue.min() < -0.18 * strength and hue.max() > 0.18 * strength
    assert abs(hue.mean()) < 0.02


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_brightness_is_multiplicative(strength):
    # On a flat grey image contrast, saturation and hue are no-ops, so the
    # jitter output over its input is exactly the brightness factor.
    image = tf.fill([4, 4, 3], 0.5)
    out = _over_seeds(lambda s: augment.color_jitter(image, s, strength))
    ratio = out / 0.5
    np.testing.assert_allclose(ratio, ratio[:, :1, :1, :1] * np.ones_like(ratio), atol=1e-5)
    factors = _over_seeds(lambda s: augment.jitter_factors(
        tf.random.experimental.stateless_split(s, num=2)[0], strength))
    np.testing.assert_allclose(ratio[:, 0, 0, 0], factors[:, 0], atol=1e-5)
    low, high = 1 - 0.8 * strength, 1 + 0.8 * strength
    assert ratio.min() >= low - 1e-5 and ratio.max() <= high + 1e-5


def test_jitter_order_is_a_uniform_permutation():
    orders = _over_seeds(augment.jitter_order, n=960)
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    counts = {}
    for o in map(tuple, orders):
        counts[o] = counts.get(o, 0) + 1
    assert len(counts) == 24  # every order of the four ops occurs
    assert max(counts.values()) < 40 * 2.5  # expected 40 each


def test_grayscale_keeps_three_channels():
    image = _random_image(5, 7, dtype=np.float32)
    gray = augment.to_grayscale(image).numpy()
    assert gray.shape == (5, 7, 3)
    luma = image @ np.array([0.2989, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(gray[..., 1], luma, atol=1e-3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize("sigma,radius", [(0.1, 1), (1.0, 3), (2.0, 11)])
def test_blur_kernel_matches_numpy_gaussian(sigma, radius):
    kernel = augment.blur_kernel(sigma, radius).numpy()
    x = np.arange(-radius, radius + 1)
    expected = np.exp(-x**2 / (2 * sigma**2))
    expected /= expected.sum()
    assert kernel.shape == (2 * radius + 1,)
    np.testing.assert_allclose(kernel.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kernel, kernel[::-1], rtol=1e-6)
    np.testing.assert_allclose(kernel, expected, atol=1e-6)


def test_gaussian_blur_is_separable_convolution():
    image = _random_image(12, 10, dtype=np.float32)
    sigma, radius = 1.3, 2
    k = augment.blur_kernel(sigma, radius).numpy()
    padded = np.pad(image, [(radius, radius), (radius, radius), (0, 0)], mode="reflect")
    k2 = np.outer(k, k)
    expected = np.zeros_like(image)
    for y in range(12):
        for x in range(10):
            window = padded[y:y + 2 * radius + 1, x:x + 2 * radius + 1]
            expected[y, x] = np.einsum("ijc,ij->c", window, k2)
    np.testing.assert_allclose(augment.gaussian_blur(image, sigma, radius), expected, atol=1e-5)
    flat = tf.fill([9, 9, 3], 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(flat, 2.0, 4), flat, atol=1e-6)


def test_blur_radius_is_ten_percent_of_height():
    assert augment.blur_radius(224, 224) == 11  # 23-tap kernel, as the reference
    assert augment.blur_radius(32, 32) == 1
    assert augment.blur_radius(16, 16) == 0


@pytest.mark.parametrize("h,w,radius", [(224, 224, 11), (100, 60, 7), (33, 47, 5), (40, 30, 4)])
def test_gaussian_blur_matches_reflect_padded_numpy(h, w, radius):
    # Covers both implementations: shifted adds (radius <= 6) and the banded
    # matmul (wider kernels, blocks of 32 rows with a ragged last block).
    image = _random_image(h, w, seed=h, dtype=np.float32)
    sigma = 1.7
    k = augment.blur_kernel(sigma, radius).numpy().astype(np.float64)
    padded = np.pad(image.astype(np.float64), [(radius, radius), (0, 0), (0, 0)], mode="reflect")
    vertical = sum(k[t] * padded[t:t + h] for t in range(2 * radius + 1))
    padded = np.pad(vertical, [(0, 0), (radius, radius), (0, 0)], mode="reflect")
    expected = sum(k[t] * padded[:, t:t + w] for t in range(2 * radius + 1))
    np.testing.assert_allclose(augment.gaussian_blur(image, sigma, radius), expected, atol=1e-5)


def _jpeg(h=70, w=90, seed=0):
    """A smooth (photo-like) image as JPEG bytes, and its full decode."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (7, 9, 3)).astype(np.float32)
    image = tf.cast(tf.image.resize(small, [h, w], method="bicubic"), tf.float32)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    encoded = tf.io.encode_jpeg(image, quality=90)
    return encoded, tf.io.decode_jpeg(encoded, channels=3)


def _crop_seeds(seeds):
    return [tf.random.experimental.stateless_split(s, num=4)[0] for s in seeds]


@pytest.mark.parametrize("aspect", [1.0, 1.5])
def test_decode_crops_matches_decode_then_crop(aspect):
    encoded, decoded = _jpeg()
    for k in range(10):
        seeds = _crop_seeds([tf.constant([k, 1]), tf.constant([k, 2])])
        crops = augment.decode_crops(encoded, seeds, aspect=aspect)
        for seed, crop in zip(seeds, crops):
            offset, size = augment.sample_crop_box(tf.shape(decoded), seed, aspect=aspect)
            expected = tf.slice(decoded, tf.concat([offset, [0]], 0), tf.concat([size, [-1]], 0))
            assert crop.dtype == tf.uint8
            assert crop.shape == expected.shape  # the very same box
            # Decoding only a window can move the pixels on its far edges by a
            # few levels (chroma upsampling lacks their outer neighbours).
            diff = np.abs(crop.numpy().astype(int) - expected.numpy().astype(int))
            np.testing.assert_array_equal(diff[:-1, :-1], 0)
            assert diff.max() <= 32  # this test image has strong colour edges


def test_decode_crops_decodes_png_whole_and_exactly():
    image = _random_image(30, 50)
    encoded = tf.io.encode_png(image)
    seeds = _crop_seeds([tf.constant([5, 6])])
    (crop,) = augment.decode_crops(encoded, seeds)
    offset, size = augment.sample_crop_box([30, 50, 3], seeds[0])
    expected = image[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]
    np.testing.assert_array_equal(crop, expected)


@pytest.mark.parametrize("size,blur", [(32, False), (64, True)])
def test_train_views_from_encoded_match_train_view(size, blur):
    encoded, decoded = _jpeg()
    seeds = tf.constant([[3, 4], [5, 6]], tf.int64)
    views = augment.train_views_from_encoded(encoded, size, size, seeds=seeds,
                                             color_jitter_strength=0.5, blur=blur)
    assert len(views) == 2
    for seed, view in zip(seeds, views):
        assert view.shape == (size, size, 3) and view.dtype == tf.float32
        expected = augment.train_view(decoded, size, size, seed=seed,
                                      color_jitter_strength=0.5, blur=blur)
        diff = np.abs(view.numpy() - expected.numpy())
        assert diff.max() < 0.05 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    # PNG input takes the decode-whole path: bitwise the same as train_view.
    png = tf.io.encode_png(decoded)
    views = augment.train_views_from_encoded(png, size, size, seeds=[seeds[0]], blur=blur)
    np.testing.assert_array_equal(views[0], augment.train_view(decoded, size, size,
                                                               seed=seeds[0], blur=blur))
