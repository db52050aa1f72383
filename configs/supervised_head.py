"""The checkpoint's own supervised head, scored as it is: nothing trains.

    python main.py --config=configs/supervised_head.py --config.pretrained=PATH --workdir=PATH_eval

The released SimCLR models carry the linear classifier trained on h beside
pretraining (1000 ImageNet classes), fine-tuned ones their classifier (v2's
read head layer 1: --config.head_layer=1), and our runs the online probe.
Their top-1/top-5 on eval views of the test split: on ImageNet's validation
split with a released model, the number in the paper's tables, without
retraining anything.
"""
from simclr_jax import config_schema


def get_config():
    return config_schema.build("supervised_head")
