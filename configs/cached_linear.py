"""A linear classifier on features extracted once from a pretrained encoder.

    python main.py --config=configs/cached_linear.py --config.pretrained=PRETRAIN_WORKDIR \
        --workdir=PRETRAIN_WORKDIR/eval

h of every train and test image (eval views: no augmentation) is computed
once; each dimension is standardised with the train features' statistics and
a linear classifier trained on them with the paper's optimiser (Nesterov SGD,
peak 0.1 x B/256, cosine, no weight decay) in one compiled program: seconds,
where the paper's protocol (configs/linear_eval.py) sends augmented images
through the encoder at every step.
"""
from simclr_jax import config_schema


def get_config():
    return config_schema.build("cached_linear")
