"""Semi-supervised fine-tuning of a pretrained encoder on CIFAR-10 labels.

    python main.py --config=configs/finetune.py --config.pretrained=PRETRAIN_WORKDIR \
        --workdir=PRETRAIN_WORKDIR/eval

As the paper (appendix B.5): the whole encoder, the projection-head layers up
to head_layer (SimCLR v2 fine-tunes from the middle of a 3-layer head:
--config.head_layer=1) and a new linear classifier train together on a
class-balanced label_fraction of the train split, drawn with subset_seed.
BatchNorm runs in train mode with global statistics; SGD with Nesterov
momentum 0.9 at learning_rate * batch_size / 256 (0.05 x B/256), no weight
decay, no warm-up, cosine decay (or schedule='constant'); only random resized
crop + flip augment. The paper trains 60 epochs on 1% and 30 on 10% of
ImageNet; this recipe trains 30 epochs on 10% of CIFAR-10 (5000 images).

ImageNet with the paper's fixed subsets: --config.dataset=imagenet2012
--config.test_split=validation --config.finetune.subset_split=imagenet2012_subset/1pct
(its train split replaces sampling; label_fraction is then ignored).
"""
from simclr_jax import config_schema


def get_config():
    config = config_schema.build("finetune")
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2
    return config
