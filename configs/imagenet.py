"""SimCLR on ImageNet: ResNet-50, 224 px, batch 4096, 100 epochs.

LARS with base learning rate 0.3 and linear scaling (0.3 * 4096/256 = 4.8),
weight decay 1e-6, temperature 0.1, colour strength 1.0 and Gaussian blur,
as in the paper (section B.1). The paper reports ~64.5% linear-evaluation top-1
for this 100-epoch setting and 69.3% after 1000 epochs.
Needs `imagenet2012` prepared for TFDS under config.data_dir (manual download).
"""
from simclr_jax import recipes


def get_config():
    config = recipes.load("cifar10")
    config.dataset = "imagenet2012"
    config.image_size = 224
    config.color_jitter_strength = 1.0
    config.blur = True
    # Colour and blur in the train step: at 224 px they are most of a view's host cost, and the host
    # then makes 3.3x more views per core (benchmarks/input_pipeline.py); same distributions (tests/
    # test_device_augment.py). On a CPU-only run the step pays more than tf.data would: use 'host' there.
    config.augment_on = "device"
    config.shuffle_buffer_size = 10_000
    config.cache_dataset = False  # 140 GB of JPEGs: decode on the fly

    config.model.depth = 50
    config.model.cifar_stem = False

    config.batch_size = 4096
    config.num_epochs = 100
    config.temperature = 0.1
    config.optimizer.base_learning_rate = 0.3
    config.optimizer.weight_decay = 1e-6

    config.test_split = "validation"
    config.eval_every_epochs = 0.0  # kNN over 1.28M images: only at the end
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    return config
