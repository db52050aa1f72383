"""Weighted kNN (k=200, T=0.1, cosine on h) of a pretrained encoder.

    python main.py --config=configs/knn.py --config.pretrained=PRETRAIN_WORKDIR \
        --workdir=PRETRAIN_WORKDIR/eval

The train split is the memory bank and the test split the queries, as
InstDisc, solo-learn and lightly do. No training: the quickest read of an
encoder, and the same evaluator as pretraining's kNN monitor.
"""
from simclr_jax import config_schema


def get_config():
    return config_schema.build("knn")
