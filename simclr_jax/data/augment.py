"""SimCLR data augmentation as TensorFlow ops, run on the host inside tf.data.

One training view is: random resized crop -> horizontal flip -> colour
distortion (jitter with p=0.8, then grayscale with p=0.2) -> Gaussian blur
(p=0.5, optional), following the order and parameters of the SimCLR reference
code. Every random choice comes from TF's *stateless* random ops keyed by an
explicit shape-[2] seed, so a view is a pure function of (image, seed): the
input pipeline is reproducible and each piece can be tested on its own.

Images are float32 in [0, 1] throughout; no mean/std normalisation.
"""
import numpy as np
import tensorflow as tf

from simclr_jax.data import distortion

# The reference crops with min_object_covered=0.1 against a whole-image box,
# which on top of area_range=(0.08, 1) makes the effective area floor 0.1.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 100
EVAL_CROP_PROPORTION = 0.875
EVAL_CROP_MIN_SIDE = 32  # centre-crop only images whose shorter side exceeds this
_WHOLE_IMAGE_BOX = [[[0.0, 0.0, 1.0, 1.0]]]  # [1, 1, 4]: ymin, xmin, ymax, xmax

# The views branch with tf.cond / tf.switch_case, and in Python only on static values
# (dtypes, sizes, flags), so tf.data need not run AutoGraph over them: marking the
# entry points spares the conversion (~2.5 s of each pretraining pipeline's build).
_no_autograph = tf.autograph.experimental.do_not_convert


def _check_size(height, width):
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_image(image):
    image = tf.convert_to_tensor(image)
    if image.shape.rank is not None and image.shape.rank != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    if image.shape[-1] is not None and image.shape[-1] != 3:
        raise ValueError(f"image must have 3 channels, got shape {image.shape}")
    return image


def _check_strength(strength):
    if strength < 0:
        raise ValueError(f"color_jitter_strength must be >= 0, got {strength!r}")


def to_float(image):
    """uint8 [0, 255] -> float32 [0, 1]; float images are assumed in [0, 1]."""
    image = _check_image(image)
    if image.dtype == tf.uint8:
        return tf.image.convert_image_dtype(image, tf.float32)
    return tf.cast(image, tf.float32)


def random_apply(fn, p, image, seed):
    """fn(image) with probability p, else image; the coin is keyed by seed."""
    coin = tf.random.stateless_uniform([], seed=seed)
    return tf.cond(coin < p, lambda: fn(image), lambda: image)


# ---------------------------------------------------------------- crop / flip


def sample_crop_box(image_shape, seed, aspect=1.0):
    """Samples a crop box -> (offset [y, x], size [h, w]), int32.

    ``aspect`` (output width / height) scales the aspect-ratio range, as the
    reference does, so the crop has the target's shape before resizing. After
    CROP_MAX_ATTEMPTS failures TF falls back to the whole image.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant(_WHOLE_IMAGE_BOX, tf.float32),
        seed=seed,
        min_object_covered=CROP_MIN_OBJECT_COVERED,
        aspect_ratio_range=(CROP_ASPECT_RANGE[0] * aspect, CROP_ASPECT_RANGE[1] * aspect),
        area_range=CROP_AREA_RANGE,
        max_attempts=CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[:2], size[:2]


def _resize(image, height, width):
    # Bicubic overshoots, so clip back into [0, 1].
    image = tf.image.resize(image, [height, width], method="bicubic")
    return tf.clip_by_value(image, 0.0, 1.0)


def _crop(image, offset, size):
    crop = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [-1]], 0))
    crop.set_shape([None, None, image.shape[-1]])  # slice forgets the channels
    return crop


def random_resized_crop(image, height, width, seed):
    """Random area/aspect crop resized to [height, width] (always applied).

    Crops before converting to float (the conversion is elementwise, so the
    result is the same), which spares converting the pixels outside the box.
    """
    offset, size = sample_crop_box(tf.shape(image), seed, aspect=width / height)
    return _resize(to_float(_crop(image, offset, size)), height, width)


def random_flip(image, seed):
    """Left-right flip with p = 0.5."""
    return random_apply(tf.image.flip_left_right, 0.5, image, seed)


# -------------------------------------------------------------------- colour


def jitter_factors(seed, strength):
    """Draws [brightness, contrast, saturation, hue] for one colour jitter.

    The first three are multiplicative factors U[max(0, 1 - 0.8 s), 1 + 0.8 s]
    (brightness multiplies, as in SimCLR v2); hue is a delta U[-0.2 s, 0.2 s].
    """
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    low, high = distortion.jitter_factor_range(strength)
    factors = tf.random.stateless_uniform([3], seed=seeds[0], minval=low, maxval=high)
    hue_max = distortion.hue_max(strength)
    hue = tf.random.stateless_uniform([1], seed=seeds[1], minval=-hue_max, maxval=hue_max)
    return tf.concat([factors, hue], 0)


def jitter_order(seed):
    """A uniformly random permutation of the four jitter ops, int32 [4].

    argsort of i.i.d. uniforms is uniform over the 24 orders.
    """
    return tf.argsort(tf.random.stateless_uniform([4], seed=seed))


def color_jitter(image, seed, strength=1.0):
    """Brightness, contrast, saturation and hue, in a random order per call.

    The factors are drawn up front so the result does not depend on which op
    runs first except through the order itself; each op is clipped to [0, 1].
    """
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    factors = jitter_factors(seeds[0], strength)
    order = jitter_order(seeds[1])
    branches = [
        lambda x: x * factors[0],
        lambda x: tf.image.adjust_contrast(x, factors[1]),
        lambda x: tf.image.adjust_saturation(x, factors[2]),
        lambda x: tf.image.adjust_hue(x, factors[3]),
    ]
    for i in range(4):
        image = tf.switch_case(order[i], [lambda f=f: f(image) for f in branches])
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image


def to_grayscale(image):
    """Luma grayscale, tiled back to 3 channels so shapes stay fixed."""
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def color_distortion(image, seed, strength=1.0):
    """Jitter with p = 0.8, then (independently) grayscale with p = 0.2."""
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    image = random_apply(
        lambda x: color_jitter(x, seeds[1], strength), distortion.JITTER_P, image, seeds[0])
    return random_apply(to_grayscale, distortion.GRAY_P, image, seeds[2])


# ---------------------------------------------------------------------- blur


blur_radius = distortion.blur_radius  # shared with device_augment.py


def blur_kernel(sigma, radius):
    """Normalised 1-D Gaussian taps at -radius..radius, float32."""
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
    return kernel / tf.reduce_sum(kernel)


# Kernels up to this radius run as shifted adds, wider ones as banded matmuls:
# each is the faster at its sizes and no slower than a depthwise convolution
# (their effect on the pipeline: benchmarks/input_pipeline.py --blur, docs/results.md).
_SHIFT_ADD_MAX_RADIUS = 6
_BAND_BLOCK = 32  # output rows per block of the banded matmul


def _blur_shift_add(x, kernel, radius, axis):
    """One pass as 2r + 1 shifted, weighted slices of the reflect-padded image.

    For small kernels this is a handful of cheap ops, where a depthwise
    convolution pays a large fixed cost per call.
    """
    n = tf.shape(x)[axis]
    paddings = [[0, 0]] * 3
    paddings[axis] = [radius, radius]
    x = tf.pad(x, paddings, mode="REFLECT")
    window = (lambda t: x[t:t + n]) if axis == 0 else (lambda t: x[:, t:t + n])
    out = kernel[0] * window(0)
    for t in range(1, 2 * radius + 1):
        out += kernel[t] * window(t)
    return out


def _band_plan(n, radius, block):
    """Static indices of the banded, reflect-folded blur matrix, cut in row blocks.

    Block i maps the window of input rows [start_i, start_i + length) to the
    output rows [i * block, (i + 1) * block); the taps that fall outside the
    image are folded back onto their reflected rows, as REFLECT padding does.
    """
    block = min(block, n)
    length = min(block + 2 * radius, n)
    num = -(-n // block)
    starts = np.clip(np.arange(num) * block - radius, 0, n - length)
    rows = np.arange(num * block)
    taps = rows[:, None] + np.arange(-radius, radius + 1)[None, :]
    taps = np.abs(taps)
    taps = np.where(taps > n - 1, 2 * (n - 1) - taps, taps)
    valid = rows < n  # rows past n (last block) stay zero and are cut off
    blocks = np.repeat(rows // block, 2 * radius + 1)
    indices = np.stack([blocks, np.repeat(rows % block, 2 * radius + 1),
                        (taps - starts[rows // block, None]).reshape(-1)], axis=1)
    indices = indices[np.repeat(valid, 2 * radius + 1)]
    windows = starts[:, None] + np.arange(length)[None, :]
    return indices.astype(np.int32), windows.astype(np.int32), (num, block, length)


def _blur_rows_banded(x, kernel, radius):
    """Vertical pass as one batched matmul with the band of the blur matrix.

    A [n, n] matrix with the reflect-folded taps multiplies the image seen
    as [n, W * C]; cutting it into 32-row blocks skips most of its zeros, so
    this does ~1/4 of the dense matmul's work.
    """
    n = x.shape[0]
    indices, windows, shape = _band_plan(n, radius, _BAND_BLOCK)
    band = tf.scatter_nd(indices, tf.tile(kernel, [len(indices) // (2 * radius + 1)]), shape)
    flat = tf.reshape(x, [n, -1])
    out = tf.matmul(band, tf.gather(flat, windows))
    return tf.reshape(tf.reshape(out, [shape[0] * shape[1], -1])[:n], tf.shape(x))


def gaussian_blur(image, sigma, radius):
    """Separable Gaussian blur of an [H, W, C] image.

    Uses reflect padding where the reference pads with zeros ('SAME'), so
    borders are not darkened. Narrow kernels use shifted adds, wide ones
    (with static H and W) a banded matmul on the rows, then on the
    transposed image: the same sums in another order, so equal to float
    rounding (~1e-7).
    """
    if radius == 0:
        return image
    image = tf.convert_to_tensor(image, tf.float32)
    kernel = blur_kernel(sigma, radius)
    static = image.shape[0] is not None and image.shape[1] is not None
    if static and radius > _SHIFT_ADD_MAX_RADIUS:
        x = _blur_rows_banded(image, kernel, radius)
        x = tf.transpose(_blur_rows_banded(tf.transpose(x, [1, 0, 2]), kernel, radius),
                         [1, 0, 2])
    else:
        x = _blur_shift_add(image, kernel, radius, axis=0)
        x = _blur_shift_add(x, kernel, radius, axis=1)
    return tf.clip_by_value(x, 0.0, 1.0)


def random_blur(image, seed, radius, p=distortion.BLUR_P):
    """Gaussian blur with probability p and sigma U[0.1, 2.0]."""
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    sigma_low, sigma_high = distortion.BLUR_SIGMA_RANGE
    sigma = tf.random.stateless_uniform([], seed=seeds[1], minval=sigma_low, maxval=sigma_high)
    return random_apply(lambda x: gaussian_blur(x, sigma, radius), p, image, seeds[0])


# --------------------------------------------------------------------- views


def _finish_view(image, height, width, seeds, strength, blur, colour_and_blur):
    """Flip, colour and blur of a resized crop, keyed by train_view's seeds 1-3
    (without ``colour_and_blur``, the flip alone: device_augment does the rest)."""
    image = random_flip(image, seeds[1])
    if colour_and_blur:
        image = color_distortion(image, seeds[2], strength)
        if blur:
            image = random_blur(image, seeds[3], blur_radius(height, width))
    return tf.ensure_shape(image, [height, width, 3])


def device_key_data(seed):
    """uint32 [2]: the threefry key device_augment draws a view's colour and
    blur from, in place of the host's, when ``augment_on == 'device'``.

    Bits drawn from the view's colour seed (``seed`` split as train_view
    splits it), so the key follows (seed, process, position, view) as every
    host augmentation does: resume stays exact and no device count enters.
    """
    colour_seed = tf.random.experimental.stateless_split(seed, num=4)[2]
    bits = tf.random.stateless_uniform([2], seed=colour_seed, minval=None, maxval=None, dtype=tf.int32)
    return tf.bitcast(bits, tf.uint32)


@_no_autograph
def train_view(image, height, width, *, seed=None, color_jitter_strength=1.0, blur=True,
               colour_and_blur=True):
    """One SimCLR training view: float32 [height, width, 3] in [0, 1].

    With ``seed`` (shape-[2] int tensor) the view is a deterministic function
    of (image, seed); without it a fresh seed is drawn from TF's global RNG.
    ``colour_and_blur=False`` stops after the crop and flip (the same ones),
    for device_augment to finish the view.
    """
    _check_size(height, width)
    _check_strength(color_jitter_strength)
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    image = random_resized_crop(_check_image(image), height, width, seeds[0])
    return _finish_view(image, height, width, seeds, color_jitter_strength, blur, colour_and_blur)


def decode_crops(encoded, crop_seeds, aspect=1.0):
    """Decodes an encoded image's crop boxes, one per seed -> list of uint8 crops.

    The boxes are ``sample_crop_box(image shape, seed, aspect)``: the same as
    cropping the decoded image. A JPEG's shape comes from its header and it
    is decoded once, only within the union of the boxes
    (``decode_and_crop_jpeg``), skipping the IDCT and colour conversion
    outside it; two separate partial decodes would each redo the entropy
    decoding and cost more than one full decode. Other formats (PNG, ...)
    are decoded whole. Always 3 channels.
    """
    def boxes(shape):
        return [sample_crop_box(shape, s, aspect) for s in crop_seeds]

    def from_jpeg():
        bxs = boxes(tf.image.extract_jpeg_shape(encoded))
        low = tf.reduce_min(tf.stack([o for o, _ in bxs]), 0)
        high = tf.reduce_max(tf.stack([o + z for o, z in bxs]), 0)
        window = tf.image.decode_and_crop_jpeg(encoded, tf.concat([low, high - low], 0),
                                               channels=3)
        return window, tf.stack([o - low for o, _ in bxs]), tf.stack([z for _, z in bxs])

    def from_other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        bxs = boxes(tf.shape(image))
        return image, tf.stack([o for o, _ in bxs]), tf.stack([z for _, z in bxs])

    window, offsets, sizes = tf.cond(tf.io.is_jpeg(encoded), from_jpeg, from_other)
    window = tf.ensure_shape(window, [None, None, 3])
    return [_crop(window, offsets[i], sizes[i]) for i in range(len(crop_seeds))]


@_no_autograph
def train_views_from_encoded(encoded, height, width, *, seeds, color_jitter_strength=1.0,
                             blur=True, colour_and_blur=True):
    """SimCLR views of one encoded (JPEG, PNG...) image, one per seed in ``seeds``.

    View i is ``train_view(decoded, height, width, seed=seeds[i], ...)``: the
    same crop box, flip, colours and blur, with the JPEG decoded once and
    only within the views' boxes (``decode_crops``). Decoding a window can
    change pixels next to its edges by a few levels (JPEG's chroma
    upsampling sees other neighbours), so the views match to that, not bitwise.
    ``colour_and_blur`` as in train_view.
    Only the pretraining pipeline calls it, with validated config values, so
    the arguments are not checked again here.
    """
    seeds = list(seeds) if isinstance(seeds, (list, tuple)) else tf.unstack(seeds)
    splits = [tf.random.experimental.stateless_split(seed, num=4) for seed in seeds]
    crops = decode_crops(encoded, [s[0] for s in splits], aspect=width / height)
    return [_finish_view(_resize(to_float(crop), height, width), height, width, s,
                         color_jitter_strength, blur, colour_and_blur)
            for crop, s in zip(crops, splits)]


@_no_autograph
def eval_view(image, height, width):
    """Deterministic evaluation view: float32 [height, width, 3] in [0, 1].

    Images whose shorter side exceeds EVAL_CROP_MIN_SIDE (i.e. not CIFAR's
    32x32) are first centre-cropped to 87.5% of the largest centred window
    with the output's aspect ratio (87.5% of the shorter side when square).
    """
    _check_size(height, width)
    image = to_float(image)
    shape = tf.shape(image)
    img_h = tf.cast(shape[0], tf.float32)
    img_w = tf.cast(shape[1], tf.float32)
    aspect = width / height
    # Largest centred window of the target aspect, scaled by the proportion.
    window_h = tf.minimum(img_h, img_w / aspect)
    crop_h = tf.cast(tf.math.rint(EVAL_CROP_PROPORTION * window_h), tf.int32)
    crop_w = tf.cast(tf.math.rint(EVAL_CROP_PROPORTION * window_h * aspect), tf.int32)
    crop_h = tf.clip_by_value(crop_h, 1, shape[0])
    crop_w = tf.clip_by_value(crop_w, 1, shape[1])

    def centre_crop():
        top = (shape[0] - crop_h + 1) // 2
        left = (shape[1] - crop_w + 1) // 2
        crop = tf.slice(image, [top, left, 0], [crop_h, crop_w, -1])
        crop.set_shape([None, None, image.shape[-1]])
        return crop

    do_crop = tf.minimum(shape[0], shape[1]) > EVAL_CROP_MIN_SIDE
    image = tf.cond(do_crop, centre_crop, lambda: image)
    return tf.ensure_shape(_resize(image, height, width), [height, width, 3])
