"""How long a pretraining recipe would take here, said before anything compiles.

The recipe's FLOPs come from XLA's cost analysis of its network's forward pass
(lowered, not compiled: about a second); this machine's speed from a timed
convolution at the network's own width. Training an image costs about three
forwards (forward and backward) for each of its two views. The result is a
rough figure (a factor of ~2 either way), meant to tell hours from months.
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.loop import duration
from simclr_jax.models import resnet
from simclr_jax.models.simclr import model_from_config

PASSES_PER_IMAGE = 2 * 3  # two views, each forward + backward (~2 forwards)


@dataclasses.dataclass(frozen=True)
class Estimate:
    flops_per_image: float  # training FLOPs of one image (both views), 2 per multiply-add
    flops_per_second: float  # what this machine reached on the timed convolution
    images: int | None  # images the recipe trains on in all, None when the split's size is unknown

    @property
    def images_per_second(self) -> float:
        return self.flops_per_second / self.flops_per_image

    @property
    def seconds(self) -> float | None:
        return None if self.images is None else self.images / self.images_per_second

    def took(self, epochs: float) -> str:
        """'~26d 07:00:00', or per 1,000 training images when the split's size is unknown."""
        if self.seconds is not None:
            return f"~{duration(self.seconds)}"
        return f"~{duration(1000 * epochs / self.images_per_second)} per 1,000 training images"


def forward_flops(model_config, image_size: int) -> float:
    """FLOPs of one image's forward pass through the encoder and head (XLA's count)."""
    model = model_from_config(model_config)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    lowered = jax.jit(lambda v, images: model.apply(v, images, train=False)).lower(variables, x)
    return float(lowered.cost_analysis()["flops"])


def measured_flops_per_second(width_multiplier: float, image_size: int, repeats: int = 5) -> float:
    """FLOP/s of a 3x3 convolution at the network's second-stage width, timed here."""
    channels = resnet.stage_widths(width_multiplier)[1]
    side = max(8, image_size // 2)
    x = jnp.ones((16, side, side, channels), jnp.float32)
    kernel = jnp.ones((3, 3, channels, channels), jnp.float32) / (9 * channels)
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    conv(x, kernel).block_until_ready()  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = conv(x, kernel)
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * 9 * channels * channels * side * side * x.shape[0] / seconds


def training_images(config, train_examples: int | None) -> int | None:
    """Images the recipe trains on: steps x batch, or epochs x the split's size."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps) * int(config.batch_size)
    return None if train_examples is None else int(np.ceil(config.num_epochs * train_examples))


def estimate(config, train_examples: int | None) -> Estimate:
    """The recipe's training time on this machine (see the module docstring)."""
    return Estimate(flops_per_image=PASSES_PER_IMAGE * forward_flops(config.model, int(config.image_size)),
                    flops_per_second=measured_flops_per_second(float(config.model.width_multiplier),
                                                               int(config.image_size)),
                    images=training_images(config, train_examples))
