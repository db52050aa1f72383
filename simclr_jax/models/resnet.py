"""The ResNet encoder f of SimCLR: x -> h, the global-average-pooled features.

Two variants: 'torchvision' (a projection shortcut only where the shape
changes) and 'official', google-research/simclr's ResNet (a projection on
the first block of every block group, so its ResNet-18/34 differ from
torchvision's). With ``sk_ratio > 0`` the official code's SimCLR v2 changes
apply: selective-kernel 3x3 convolutions in bottleneck blocks and ResNet-D
(a three-convolution ImageNet stem, average-pooled projection shortcuts);
``se_ratio > 0`` adds squeeze-excitation to every block.

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
VARIANTS = ("torchvision", "official")
# How the ImageNet stem's 3x3/2 max-pool pads: 'same' as TensorFlow's SAME (on an
# even-sized map 0 before, 1 after: the official SimCLR's, and ours by default),
# 'symmetric' 1 on each side (torchvision's). They pick different windows.
STEM_POOL_PADDINGS = ("same", "symmetric")
SK_MIN_DIM = 32  # the official selective kernel's smallest mixing width


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


def block_projections(depth: int, width_multiplier: float, variant: str) -> list[list[bool]]:
    """Per stage, whether each block has a projection shortcut: in the official
    variant every stage's first block, in torchvision's where the shape changes
    (so not ResNet-18/34's first block). The official export names by it too."""
    kind, blocks_per_stage = RESNET_STAGES[depth]
    expansion = 1 if kind == "basic" else 4
    widths = stage_widths(width_multiplier)
    projections, channels = [], widths[0]  # every stem ends with widths[0] channels
    for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
        first = variant == "official" or stage > 0 or channels != width * expansion
        projections.append([first] + [False] * (blocks - 1))
        channels = width * expansion
    return projections


class SelectiveKernel(nn.Module):
    """Selective-kernel 3x3 convolution (Li et al. 2019) as SimCLR v2 builds it:
    one convolution makes two streams of ``features`` channels, and a softmax
    over the streams, computed from their pooled sum, mixes them per channel."""

    features: int
    strides: int
    sk_ratio: float
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm(name="bn")(self.conv(2 * self.features, 3, self.strides, "conv")(x)))
        streams = jnp.stack(jnp.split(y, 2, axis=-1))  # [2, B, H, W, features]
        pooled = jnp.mean(streams.sum(0), axis=(1, 2), keepdims=True)
        mid = max(int(self.features * self.sk_ratio), SK_MIN_DIM)
        pooled = nn.relu(self.norm(name="fc1_bn")(self.conv(mid, 1, 1, "fc1")(pooled)))
        mixing = jnp.stack(jnp.split(self.conv(2 * self.features, 1, 1, "fc2")(pooled), 2, axis=-1))
        return jnp.sum(streams * nn.softmax(mixing, axis=0), axis=0)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation (Hu et al. 2018): channels rescaled by a sigmoid gate
    computed from their spatial mean, through ``features * se_ratio`` units."""

    features: int
    se_ratio: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Conv, kernel_size=(1, 1), dtype=self.dtype, param_dtype=jnp.float32)
        gate = jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = nn.relu(dense(max(1, int(self.features * self.se_ratio)), name="reduce")(gate))
        return nn.sigmoid(dense(x.shape[-1], name="expand")(gate)) * x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). The last BN starts at gamma = 0, so at
    init the block is relu(shortcut): the deep network starts as a shallow one."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    project: bool = False  # a projection shortcut (else identity)
    resnet_d: bool = False  # ResNet-D: average-pool, then a stride-1 projection
    se_ratio: float = 0.0
    sk_ratio: float = 0.0  # unused: the official basic block has no selective kernel
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, 3, self.strides, "conv1")(x)))
        y = self.norm(name="bn2", scale_init=nn.initializers.zeros)(self.conv(self.features, 3, 1, "conv2")(y))
        if self.se_ratio > 0:
            y = SqueezeExcite(self.features, self.se_ratio, self.dtype, name="se")(y)
        return nn.relu(y + _shortcut(self, x, self.features))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) block (ResNet-50+). The stride sits on the
    3x3 convolution ("ResNet v1.5", torchvision and the official code), which is
    a selective kernel when ``sk_ratio > 0``; the last BN starts at gamma = 0."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    project: bool = False
    resnet_d: bool = False
    se_ratio: float = 0.0
    sk_ratio: float = 0.0
    dtype: Dtype = jnp.float32
    expansion: int = 4

    @nn.compact
    def __call__(self, x):
        out_features = self.features * self.expansion
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, 1, 1, "conv1")(x)))
        if self.sk_ratio > 0:
            y = SelectiveKernel(self.features, self.strides, self.sk_ratio, self.conv, self.norm, name="sk")(y)
        else:
            y = nn.relu(self.norm(name="bn2")(self.conv(self.features, 3, self.strides, "conv2")(y)))
        y = self.norm(name="bn3", scale_init=nn.initializers.zeros)(self.conv(out_features, 1, 1, "conv3")(y))
        if self.se_ratio > 0:
            y = SqueezeExcite(self.features, self.se_ratio, self.dtype, name="se")(y)
        return nn.relu(y + _shortcut(self, x, out_features))


def _shortcut(block: nn.Module, x, out_features: int):
    """Identity, or a 1x1 projection + BN: strided, or (ResNet-D) after a 2x2
    average pool, padded as the official code pads it."""
    if not block.project:
        return x
    strides = block.strides
    if block.resnet_d:
        if strides > 1:  # zero padding after, then a valid pool: the zeros count
            x = nn.avg_pool(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), (2, 2), strides=(strides, strides))
        else:  # 'SAME' pooling: the padding does not count
            x = nn.avg_pool(x, (2, 2), strides=(1, 1), padding=((0, 1), (0, 1)), count_include_pad=False)
        strides = 1
    return block.norm(name="proj_bn")(block.conv(out_features, 1, strides, "proj_conv")(x))


class ResNet(nn.Module):
    """ResNet v1.5 encoder returning h, the global-average-pooled features [B, C].

    ``cifar_stem`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv so 32x32
    images keep their resolution. No classifier: SimCLR only needs h.
    ``variant``, ``sk_ratio`` and ``se_ratio``: see the module docstring.
    ``stem_pool_padding``: see STEM_POOL_PADDINGS (no effect with the CIFAR stem).
    ``remat``: each residual block's activations are recomputed in the
    backward pass instead of stored (``nn.remat``), trading compute for the
    memory of a larger batch; parameters, outputs and gradients are the same.

    The feature maps the official SavedModel returns (``initial_conv``,
    ``initial_max_pool``, ``block_group1..4``) are sown into 'intermediates':
    ``apply(..., mutable=["intermediates"])`` returns them; otherwise sowing
    does nothing.
    """

    depth: int
    width_multiplier: float = 1.0
    cifar_stem: bool = False
    variant: str = "torchvision"
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    stem_pool_padding: str = "same"
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        if (self.depth not in RESNET_STAGES or self.variant not in VARIANTS
                or self.stem_pool_padding not in STEM_POOL_PADDINGS):
            raise ValueError(f"Unsupported ResNet depth {self.depth}, variant {self.variant!r} or stem_pool_padding "
                             f"{self.stem_pool_padding!r}; valid: {VALID_DEPTHS}, {VARIANTS}, {STEM_POOL_PADDINGS}")
        kind, _ = RESNET_STAGES[self.depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        if self.remat:
            block_cls = nn.remat(block_cls)
        widths = stage_widths(self.width_multiplier)
        conv, norm = conv_def(self.dtype), norm_def(train, self.axis_name, self.dtype)

        x = self._stem(jnp.asarray(x, self.dtype), widths[0], conv, norm)
        projections = block_projections(self.depth, self.width_multiplier, self.variant)
        for stage, (width, projects) in enumerate(zip(widths, projections)):
            for block, project in enumerate(projects):
                strides = 2 if stage > 0 and block == 0 else 1
                x = block_cls(features=width, strides=strides, conv=conv, norm=norm, project=project,
                              resnet_d=self.sk_ratio > 0, se_ratio=self.se_ratio, sk_ratio=self.sk_ratio,
                              dtype=self.dtype, name=f"stage{stage + 1}_block{block + 1}")(x)
            self.sow("intermediates", f"block_group{stage + 1}", x)

        # Average in float32: a bfloat16 mean over 49+ positions loses precision.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def _stem(self, x, width: int, conv, norm):
        """The stem. Sows what the official SavedModel calls ``initial_conv`` (the
        last stem convolution's output, before its BN) and ``initial_max_pool``
        (after the max pool; the CIFAR stem has none: there, after BN and ReLU)."""
        resnet_d = self.sk_ratio > 0 and not self.cifar_stem
        if resnet_d:  # three 3x3 convolutions instead of one 7x7
            x = nn.relu(norm(name="stem_bn1")(conv(width // 2, 3, 2, "stem_conv1")(x)))
            x = nn.relu(norm(name="stem_bn2")(conv(width // 2, 3, 1, "stem_conv2")(x)))
        plain = not (self.cifar_stem or resnet_d)
        x = conv(width, 7 if plain else 3, 2 if plain else 1, "stem_conv")(x)
        self.sow("intermediates", "initial_conv", x)
        x = nn.relu(norm(name="stem_bn")(x))
        if not self.cifar_stem:
            padding = "SAME" if self.stem_pool_padding == "same" else ((1, 1), (1, 1))  # padded with -inf
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)
        self.sow("intermediates", "initial_max_pool", x)
        return x
