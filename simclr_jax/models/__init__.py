"""The networks: ResNet encoders (resnet.py) and SimCLR's head and model (simclr.py)."""
from simclr_jax.models.resnet import STEM_POOL_PADDINGS, VALID_DEPTHS, VARIANTS, ResNet, stage_widths
from simclr_jax.models.simclr import ProjectionHead, SimCLR, model_from_config

__all__ = ["STEM_POOL_PADDINGS", "VALID_DEPTHS", "VARIANTS", "ProjectionHead", "ResNet", "SimCLR", "model_from_config",
           "stage_widths"]
