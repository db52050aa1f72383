"""SimCLR v2 on ImageNet: ResNet-50 1x with selective kernels, 3-layer head.

The official ResNet (google-research/simclr: a projection shortcut on every
block group's first block) with selective kernels (sk_ratio 1/16) and the
ResNet-D stem and shortcuts they switch on; a 3-layer projection head (fine-
tuning then reads its first layer: --config.head_layer=1). Hyperparameters
of the v2 paper: batch 4096, 800 epochs, LARS with learning rate
0.1 x sqrt(batch) (6.4) and weight decay 1e-4, temperature 0.1; the
warm-up is the v1 recipe's 10 epochs. The v2 paper's memory (a queue of
65,536 negatives from a moving-average network, worth about 1 point there)
is off, as in the official code: --config.memory.size=65536 turns it on.
"""
from simclr_jax import recipes


def get_config():
    config = recipes.load("imagenet")
    config.model.variant = "official"
    config.model.sk_ratio = 0.0625
    config.model.head_layers = 3
    config.num_epochs = 800
    config.optimizer.base_learning_rate = 0.1
    config.optimizer.lr_scaling = "sqrt"
    config.optimizer.weight_decay = 1e-4
    return config
