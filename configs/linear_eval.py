"""The paper's linear evaluation of a pretrained encoder on CIFAR-10.

    python main.py --config=configs/linear_eval.py --config.pretrained=PRETRAIN_WORKDIR \
        --workdir=PRETRAIN_WORKDIR/eval

The encoder is frozen (BatchNorm in inference mode); every step sends freshly
augmented training images (random resized crop + flip, no colour, no blur)
through it and trains a linear classifier on h (head_layer=0) with SGD,
Nesterov momentum 0.9, peak learning rate 0.1 x B/256, cosine decay, no
weight decay; top-1/top-5 on the test split. With linear.standardize (the
default) each dimension of h is first standardised with fixed statistics of
10,000 augmented training views, so the classifier stays linear in h and one
learning rate suits any encoder; False trains on raw h, as the paper. Needs
an accelerator for the full 100 epochs; configs/cached_linear.py is the
quick version.

Transfer: --config.dataset=NAME (any TFDS image classification dataset;
images are resized to the checkpoint's image size) or folder:ROOT with
ROOT/<split>/<class>/*.jpg|png.
"""
from simclr_jax import config_schema


def get_config():
    config = config_schema.build("linear_eval")
    config.log_every_steps = 100
    config.keep_checkpoints = 2
    return config
