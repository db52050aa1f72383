"""Image retrieval with a pretrained encoder: the nearest neighbours of a few
CIFAR-10 test images among the others, by cosine similarity of h.

Any encoder ``load_encoder`` reads works: our pretraining workdir, an official
SimCLR checkpoint or SavedModel, a torchvision state_dict. Images go in as
[0, 1] float views at the encoder's size (CIFAR-10's 32 px as they are).

    python examples/retrieval.py --encoder=runs/smoke --data_dir=DIR --images=512
"""
import argparse

import numpy as np
import tensorflow_datasets as tfds

import simclr_jax


def nearest_neighbours(features: np.ndarray, k: int) -> np.ndarray:
    """[N, D] features -> [N, k] indices of each row's k most similar other rows."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)  # an image is not its own neighbour
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def main(encoder_path: str, data_dir: str | None, images: int, k: int) -> np.ndarray:
    encoder = simclr_jax.load_encoder(encoder_path)
    test = tfds.as_numpy(tfds.load("cifar10", split=f"test[:{images}]", data_dir=data_dir, batch_size=-1))
    features = encoder.embed_views(test["image"].astype(np.float32) / 255.0)
    neighbours = nearest_neighbours(features, k)
    same_class = (test["label"][neighbours] == test["label"][:, None]).mean()
    print(f"{images} images, h of {features.shape[1]} dimensions: {same_class:.1%} of the {k} nearest "
          f"neighbours share the query's class (chance: ~10%)")
    for query in range(min(3, images)):
        print(f"  test image {query} (class {test['label'][query]}): neighbours {neighbours[query].tolist()}")
    return neighbours


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="a path load_encoder reads")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir holding cifar10 (default: TFDS's)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    main(args.encoder, args.data_dir, args.images, args.k)
