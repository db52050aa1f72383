"""The ResNet encoder f of SimCLR: x -> h, the global-average-pooled features.

Blocks receive ``conv`` and ``norm`` partials (as the Flax ImageNet example
builds them), so precision, padding and BatchNorm settings are decided once,
in ``ResNet``. Parameters are always float32; ``dtype`` only sets the compute
precision, and h is returned in float32.

BatchNorm takes ``axis_name``: inside ``jax.shard_map`` over the 'data' mesh
axis its batch statistics are averaged over all devices (global BN, as SimCLR
needs; otherwise each device's positives can be told apart by their local
statistics).
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# depth -> (block kind, blocks per stage).
RESNET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
VALID_DEPTHS = tuple(sorted(RESNET_STAGES))


def _pad(kernel_size: int) -> Sequence[tuple[int, int]]:
    """Symmetric padding of (k-1)//2, as torchvision and SimCLR's TF code do.

    'SAME' would pad stride-2 convolutions asymmetrically (0 before, 1 after).
    """
    p = (kernel_size - 1) // 2
    return ((p, p), (p, p))


def conv_def(dtype: Dtype) -> ModuleDef:
    """``conv(features, kernel_size, strides, name)``: bias-free (BN follows)."""

    def conv(features: int, kernel_size: int, strides: int, name: str) -> nn.Conv:
        return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                       padding=_pad(kernel_size), use_bias=False, dtype=dtype,
                       param_dtype=jnp.float32, name=name)

    return conv


def norm_def(train: bool, axis_name: str | None, dtype: Dtype) -> ModuleDef:
    """BatchNorm as SimCLR's reference code sets it (momentum 0.9, epsilon
    1e-5), global over ``axis_name``, with the two-pass variance: with global
    statistics E[x^2] - E[x]^2 cancels badly in float32."""
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             axis_name=axis_name, dtype=dtype, param_dtype=jnp.float32,
                             use_fast_variance=False)


def stage_widths(width_multiplier: float) -> tuple[int, ...]:
    """Base channel count of each of the four stages (before bottleneck expansion)."""
    base = max(1, int(round(64 * width_multiplier)))
    return tuple(base * m for m in (1, 2, 4, 8))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). The last BN starts at gamma = 0, so at
    init the block is relu(shortcut): the deep network starts as a shallow one."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, 3, self.strides, "conv1")(x)))
        y = self.norm(name="bn2", scale_init=nn.initializers.zeros)(self.conv(self.features, 3, 1, "conv2")(y))
        return nn.relu(y + _shortcut(self, x, self.features))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) block (ResNet-50+). The stride sits on the
    3x3 convolution ("ResNet v1.5", torchvision); the last BN starts at gamma = 0."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    expansion: int = 4

    @nn.compact
    def __call__(self, x):
        out_features = self.features * self.expansion
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, 1, 1, "conv1")(x)))
        y = nn.relu(self.norm(name="bn2")(self.conv(self.features, 3, self.strides, "conv2")(y)))
        y = self.norm(name="bn3", scale_init=nn.initializers.zeros)(self.conv(out_features, 1, 1, "conv3")(y))
        return nn.relu(y + _shortcut(self, x, out_features))


def _shortcut(block: nn.Module, x, out_features: int):
    """Identity, or a strided 1x1 projection + BN where the shape changes."""
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    return block.norm(name="proj_bn")(block.conv(out_features, 1, block.strides, "proj_conv")(x))


class ResNet(nn.Module):
    """ResNet v1.5 encoder returning h, the global-average-pooled features [B, C].

    ``cifar_stem`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv so 32x32
    images keep their resolution. No classifier: SimCLR only needs h.
    """

    depth: int
    width_multiplier: float = 1.0
    cifar_stem: bool = False
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.depth not in RESNET_STAGES:
            raise ValueError(f"Unsupported ResNet depth {self.depth}; valid depths: {VALID_DEPTHS}")
        kind, blocks_per_stage = RESNET_STAGES[self.depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        widths = stage_widths(self.width_multiplier)
        conv, norm = conv_def(self.dtype), norm_def(train, self.axis_name, self.dtype)

        x = jnp.asarray(x, self.dtype)
        if self.cifar_stem:
            x = nn.relu(norm(name="stem_bn")(conv(widths[0], 3, 1, "stem_conv")(x)))
        else:
            x = nn.relu(norm(name="stem_bn")(conv(widths[0], 7, 2, "stem_conv")(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

        for stage, (width, num_blocks) in enumerate(zip(widths, blocks_per_stage)):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = block_cls(features=width, strides=strides, conv=conv, norm=norm,
                              name=f"stage{stage + 1}_block{block + 1}")(x)

        # Average in float32: a bfloat16 mean over 49+ positions loses precision.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
