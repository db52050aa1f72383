"""An official SimCLR checkpoint's own classifier, scored on CIFAR-10 test images.

The official TF2 code writes a SavedModel (or a training checkpoint) that
carries a supervised head on h; ``load_encoder`` reads either with TensorFlow
alone and ``Encoder.logits`` runs that head. For ImageNet's released models
use the supervised_head recipe instead (it makes ImageNet's evaluation views):

    python main.py --config=configs/supervised_head.py --config.pretrained=PATH ...

    python examples/evaluate_official.py --checkpoint=r18_cifar/saved_model/1 --data_dir=DIR --images=1000
"""
import argparse

import numpy as np
import tensorflow_datasets as tfds

import simclr_jax


def main(checkpoint: str, data_dir: str | None, images: int) -> tuple[np.ndarray, float]:
    encoder = simclr_jax.load_encoder(checkpoint)  # a SavedModel, checkpoint folder or ckpt-N prefix
    test = tfds.as_numpy(tfds.load("cifar10", split=f"test[:{images}]", data_dir=data_dir, batch_size=-1))
    logits = encoder.logits(test["image"].astype(np.float32) / 255.0)  # 32 px views, as the official code
    top1 = float((logits.argmax(axis=1) == test["label"]).mean())
    print(f"{encoder!r}\nreleased head, top-1 on the first {images} CIFAR-10 test images: {top1:.2%}")
    return logits, top1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an official SavedModel, checkpoint folder or ckpt-N")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir holding cifar10 (default: TFDS's)")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    main(args.checkpoint, args.data_dir, args.images)
