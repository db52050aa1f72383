"""A few minutes of SimCLR on real CIFAR-10 on a laptop CPU.

A ResNet-18 at 1/8 width (8-64 channels) with the CIFAR stem, batch 128,
500 steps (1.3 epochs), then a kNN evaluation. Short runs want a hotter
recipe than the 1000-epoch one: base learning rate 8.0 (peak 4.0 at batch
128) and temperature 0.2 (docs/results.md gives its wall time and
accuracy, and what the CIFAR recipe's 1.0 / 0.5 reached instead).
"""
from simclr_jax import recipes


def get_config():
    config = recipes.load("cifar10")
    config.model.width_multiplier = 0.125
    config.batch_size = 128
    config.num_train_steps = 500
    config.temperature = 0.2
    config.shuffle_buffer_size = 10_000
    config.optimizer.base_learning_rate = 8.0
    config.optimizer.warmup_epochs = 0.5  # 195 steps
    config.eval_every_epochs = 0.0  # kNN monitor only at the end
    config.log_every_steps = 25
    config.checkpoint_every_steps = 250
    config.dtype = "float32"  # a CPU recipe: bfloat16 is emulated on CPUs, and slower
    return config
