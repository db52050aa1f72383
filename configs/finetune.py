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
import ml_collections
from ml_collections.config_dict import placeholder

from configs import evaluation


def get_config():
    config = evaluation.base("finetune")
    config.shuffle_buffer_size = 50_000
    config.finetune = ml_collections.ConfigDict()
    config.finetune.label_fraction = 0.1  # in (0, 1]; 0.01 and 0.1 in the paper, 1.0 = all
    config.finetune.subset_seed = 0  # which examples make the subset
    config.finetune.subset_split = placeholder(str)  # a TFDS dataset whose train split is the subset
    config.finetune.epochs = 30.0  # over the labelled subset
    config.finetune.batch_size = 256  # a multiple of the device count
    config.finetune.learning_rate = 0.05  # peak = learning_rate * batch_size / 256
    config.finetune.weight_decay = 0.0
    config.finetune.schedule = "cosine"  # or 'constant'
    evaluation.add_loop_fields(config, log_every_steps=50, checkpoint_every_steps=500)
    return config
