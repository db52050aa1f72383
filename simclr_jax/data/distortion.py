"""The laws of SimCLR's colour distortion and blur, shared by both pipelines.

augment.py (TensorFlow, on the host) and device_augment.py (JAX, in the train
step) draw every view's colour and blur from these numbers, the official
SimCLR's; keeping them here, free of either framework, means the two cannot
drift apart.
"""
JITTER_P = 0.8  # colour jitter's probability
GRAY_P = 0.2  # grayscale's, drawn independently after the jitter
BLUR_P = 0.5  # Gaussian blur's
BLUR_SIGMA_RANGE = (0.1, 2.0)  # sigma ~ U[0.1, 2.0] pixels


def jitter_factor_range(strength: float) -> tuple[float, float]:
    """Brightness, contrast and saturation factors ~ U[max(0, 1 - 0.8 s), 1 + 0.8 s]."""
    return max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength


def hue_max(strength: float) -> float:
    """The hue delta ~ U[-0.2 s, 0.2 s] (in turns)."""
    return 0.2 * strength


def blur_radius(height: int, width: int) -> int:
    """Kernel side is 10% of the height (made odd: 2 * radius + 1).

    The radius is capped below the width so reflect padding stays valid for
    very narrow outputs; it is 0 (no-op blur) for images under 20 pixels.
    """
    return min((height // 10) // 2, width - 1)
