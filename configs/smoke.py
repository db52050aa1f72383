"""A few minutes of SimCLR on real CIFAR-10 on a laptop CPU.

A ResNet-18 at 1/8 width (8-64 channels) with the CIFAR stem: small enough
for a 2-core CPU, big enough to learn visibly (loss falls, contrastive
accuracy climbs far above chance). Everything else is the CIFAR-10 recipe.
"""
from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.model.width_multiplier = 0.125
    config.batch_size = 128
    config.num_train_steps = 300
    config.shuffle_buffer_size = 10_000
    config.optimizer.warmup_epochs = 0.5  # 195 steps: half the run
    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
    return config
