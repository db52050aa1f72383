"""Weighted kNN monitor (k=200, T=0.1, cosine on h) of a pretrained encoder.

    python main.py --config=configs/knn.py --config.pretrained=PRETRAIN_WORKDIR \
        --workdir=PRETRAIN_WORKDIR/eval

The train split is the memory bank and the test split the queries, as
InstDisc, solo-learn and lightly do.
"""
from configs import linear_eval


def get_config():
    config = linear_eval.get_config()
    config.protocol = "knn"
    return config
