"""SimCLR's networks: the projection head g, and encoder and head together."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.models.resnet import ResNet, norm_def

Dtype = Any


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
        norm = norm_def(train, self.axis_name, self.dtype)
        outputs = [h]
        x = jnp.asarray(h, self.dtype)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.out_dim if last else h.shape[-1], use_bias=False,
                         kernel_init=nn.initializers.normal(stddev=0.01), dtype=self.dtype,
                         param_dtype=jnp.float32, name=f"dense{i + 1}")(x)
            x = norm(use_bias=not last, name=f"bn{i + 1}")(x)
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
    variant: str = "torchvision"
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    stem_pool_padding: str = "same"
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    remat: bool = False  # recompute residual blocks in the backward pass (see ResNet)

    def setup(self):
        self.encoder = ResNet(depth=self.depth, width_multiplier=self.width_multiplier,
                              cifar_stem=self.cifar_stem, variant=self.variant, sk_ratio=self.sk_ratio,
                              se_ratio=self.se_ratio, stem_pool_padding=self.stem_pool_padding,
                              axis_name=self.axis_name, dtype=self.dtype, remat=self.remat)
        self.head = ProjectionHead(num_layers=self.head_layers, out_dim=self.proj_dim,
                                   axis_name=self.axis_name, dtype=self.dtype)

    def __call__(self, x, train: bool):
        h = self.encoder(x, train)
        return h, self.head(h, train)

    def features(self, x, train: bool, head_layer: int = 0):
        """Output of projection-head layer ``head_layer`` (0 = the encoder's h).

        Evaluation reads h; SimCLR v2 fine-tunes from the head's first layer.
        """
        h = self.encoder(x, train)
        return h if head_layer == 0 else self.head(h, train, return_all=True)[head_layer]


def model_from_config(model_config, axis_name: str | None = None, dtype: Dtype = jnp.float32,
                      remat: bool = False) -> SimCLR:
    """SimCLR from a config's ``model`` section (depth, width_multiplier,
    cifar_stem, head_layers, proj_dim, variant, sk_ratio, se_ratio,
    stem_pool_padding). How it computes (``axis_name``, ``dtype``, ``remat``)
    is the caller's choice, not part of the architecture a checkpoint records."""
    return SimCLR(depth=int(model_config.depth), width_multiplier=float(model_config.width_multiplier),
                  cifar_stem=bool(model_config.cifar_stem), head_layers=int(model_config.head_layers),
                  proj_dim=int(model_config.proj_dim), variant=str(model_config.variant),
                  sk_ratio=float(model_config.sk_ratio), se_ratio=float(model_config.se_ratio),
                  stem_pool_padding=str(model_config.stem_pool_padding), axis_name=axis_name,
                  dtype=dtype, remat=remat)
