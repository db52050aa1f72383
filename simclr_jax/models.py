"""SimCLR networks: the ResNet encoder f, the projection head g, and both together.

Everything is flax.linen. Parameters are always float32; ``dtype`` only sets the
compute precision (bfloat16 on TPU/GPU), and every module returns float32 so the
loss and the optimiser never see low-precision values.

BatchNorm takes ``axis_name``: inside ``jax.shard_map`` over the 'data' mesh axis
its batch statistics are averaged over all devices (global BN, as SimCLR needs,
otherwise each device's positives can be told apart by their local statistics).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# depth -> (block kind, blocks per stage).
_RESNET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
VALID_DEPTHS = tuple(sorted(_RESNET_STAGES))

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _pad(kernel_size: int) -> Sequence[tuple[int, int]]:
    """Symmetric padding of (k-1)//2, as torchvision and SimCLR's TF code do.

    'SAME' would pad stride-2 convolutions asymmetrically (0 before, 1 after).
    """
    p = (kernel_size - 1) // 2
    return ((p, p), (p, p))


def stage_widths(width_multiplier: float) -> tuple[int, ...]:
    """Base channel count of each of the four stages (before bottleneck expansion)."""
    base = max(1, int(round(64 * width_multiplier)))
    return tuple(base * m for m in (1, 2, 4, 8))


def _conv(module, features, kernel_size, strides, name):
    """Bias-free convolution (BN follows) computing in the module's dtype."""
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=(strides, strides),
        padding=_pad(kernel_size), use_bias=False, dtype=module.dtype,
        param_dtype=jnp.float32, name=name)


def _bn(module, train, name, zero_scale=False):
    """BatchNorm with the module's settings; zero_scale for a block's last BN."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=module.bn_momentum,
        epsilon=module.bn_epsilon, axis_name=module.axis_name, dtype=module.dtype,
        param_dtype=jnp.float32, use_fast_variance=False,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). The last BN starts at gamma = 0, so at
    init the block is relu(shortcut): the deep network starts as a shallow one."""

    features: int
    strides: int = 1
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x, train: bool):
        shortcut = x
        y = _conv(self, self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(_bn(self, train, "bn1")(y))
        y = _conv(self, self.features, 3, 1, "conv2")(y)
        y = _bn(self, train, "bn2", zero_scale=True)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self, self.features, 1, self.strides, "proj_conv")(x)
            shortcut = _bn(self, train, "proj_bn")(shortcut)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) block (ResNet-50+). The stride sits on the
    3x3 convolution ("ResNet v1.5", torchvision); the last BN starts at gamma = 0."""

    features: int
    strides: int = 1
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON
    expansion: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        out_features = self.features * self.expansion
        shortcut = x
        y = _conv(self, self.features, 1, 1, "conv1")(x)
        y = nn.relu(_bn(self, train, "bn1")(y))
        y = _conv(self, self.features, 3, self.strides, "conv2")(y)
        y = nn.relu(_bn(self, train, "bn2")(y))
        y = _conv(self, out_features, 1, 1, "conv3")(y)
        y = _bn(self, train, "bn3", zero_scale=True)(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = _conv(self, out_features, 1, self.strides, "proj_conv")(x)
            shortcut = _bn(self, train, "proj_bn")(shortcut)
        return nn.relu(y + shortcut)


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
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x, train: bool):
        if self.depth not in _RESNET_STAGES:
            raise ValueError(
                f"Unsupported ResNet depth {self.depth}; valid depths: {VALID_DEPTHS}")
        kind, blocks_per_stage = _RESNET_STAGES[self.depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        widths = stage_widths(self.width_multiplier)

        x = jnp.asarray(x, self.dtype)
        if self.cifar_stem:
            x = _conv(self, widths[0], 3, 1, "stem_conv")(x)
            x = nn.relu(_bn(self, train, "stem_bn")(x))
        else:
            x = _conv(self, widths[0], 7, 2, "stem_conv")(x)
            x = nn.relu(_bn(self, train, "stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

        for stage, (width, num_blocks) in enumerate(zip(widths, blocks_per_stage)):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = block_cls(
                    features=width, strides=strides, dtype=self.dtype,
                    axis_name=self.axis_name, bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    name=f"stage{stage + 1}_block{block + 1}")(x, train)

        # Average in float32: a bfloat16 mean over 49+ positions loses precision.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class ProjectionHead(nn.Module):
    """The projection head g, as SimCLR's reference code builds it.

    Every layer is Dense (no bias: BN follows) -> BatchNorm. Hidden layers keep
    the width of h and end in ReLU; the last maps to ``out_dim`` and its BN has
    no beta and no ReLU. num_layers=2 is SimCLR v1's head, 3 is v2's. Dense
    kernels start from N(0, 0.01^2) as in the reference code.
    """

    num_layers: int = 2
    out_dim: int = 128
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool, return_all: bool = False):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        hidden_dim = h.shape[-1]
        outputs = [h]
        x = jnp.asarray(h, self.dtype)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(
                self.out_dim if last else hidden_dim, use_bias=False,
                kernel_init=nn.initializers.normal(stddev=0.01), dtype=self.dtype,
                param_dtype=jnp.float32, name=f"dense{i + 1}")(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON, axis_name=self.axis_name, dtype=self.dtype,
                param_dtype=jnp.float32, use_fast_variance=False,
                use_bias=not last, use_scale=True,
                name=f"bn{i + 1}")(x)
            if not last:
                x = nn.relu(x)
            outputs.append(x)
        outputs = [jnp.asarray(o, jnp.float32) for o in outputs]
        return outputs if return_all else outputs[-1]


class SimCLR(nn.Module):
    """Encoder f and projection head g: x -> (h, z).

    The caller must concatenate both augmented views into ONE batch before
    calling, so BatchNorm's statistics cover both views together (with
    axis_name, across all devices too) instead of being computed per view.
    """

    depth: int
    width_multiplier: float = 1.0
    cifar_stem: bool = False
    head_layers: int = 2
    proj_dim: int = 128
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = ResNet(
            depth=self.depth, width_multiplier=self.width_multiplier,
            cifar_stem=self.cifar_stem, axis_name=self.axis_name, dtype=self.dtype)
        self.head = ProjectionHead(
            num_layers=self.head_layers, out_dim=self.proj_dim,
            axis_name=self.axis_name, dtype=self.dtype)

    def __call__(self, x, train: bool):
        h = self.encoder(x, train)
        z = self.head(h, train)
        return h, z

    def features(self, x, train: bool, head_layer: int = 0):
        """Output of projection-head layer ``head_layer`` (0 = the encoder's h).

        Evaluation reads h; SimCLR v2 fine-tunes from the head's first layer.
        """
        h = self.encoder(x, train)
        return h if head_layer == 0 else self.head(h, train, return_all=True)[head_layer]


def model_from_config(model_config, axis_name: str | None = None,
                      dtype: Dtype = jnp.float32) -> SimCLR:
    """Builds SimCLR from a config's ``model`` section (depth, width_multiplier,
    cifar_stem, head_layers, proj_dim)."""
    return SimCLR(
        depth=int(model_config.depth),
        width_multiplier=float(model_config.width_multiplier),
        cifar_stem=bool(model_config.cifar_stem),
        head_layers=int(model_config.head_layers),
        proj_dim=int(model_config.proj_dim),
        axis_name=axis_name,
        dtype=dtype)
