"""SimCLR on CIFAR-10: ResNet-18 with the CIFAR stem, the paper's CIFAR recipe.

Batch 512, 1000 epochs, LARS with base learning rate 1.0 (linear scaling:
1.0 * 512/256 = 2.0 peak), 10 warm-up epochs, temperature 0.5, colour
strength 0.5 and no blur, as in the paper's appendix B.9 and the official
repository's CIFAR-10 command (which also sets weight decay 1e-4).
Expected: ~91% linear-evaluation top-1 after 1000 epochs on the lossless data.
"""
from simclr_jax import config_schema


def get_config():
    # The schema's pretraining defaults are this recipe but for the compute dtype:
    # simclr_jax/config_schema.py declares every field with its default, its rule and
    # what it means.
    config = config_schema.build("pretrain")
    # A GPU/TPU recipe: bfloat16 compute, float32 parameters, BatchNorm statistics and
    # loss; its first update matches float32's (tests/test_pretrain.py). The schema's
    # default stays float32, which CPUs (bfloat16 emulated, slower) run.
    config.dtype = "bfloat16"
    return config
