"""One process of a multi-process test run (tests/test_multiprocess.py).

Started as ``python -m tests.multiprocess_worker OUT_DIR DATA_DIR`` with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set; the test
also calls ``train_steps`` in its own process for the single-process run.
It writes what the test compares: this process's slice of the test split;
the losses and final parameters of a few steps on fixed batches of real
CIFAR-10; and kNN and the cached linear classifier on small random features
split over both processes' devices (``sharded_evaluation``). One launch does
all three: each process start costs seconds of imports.
"""
import os
import sys

import numpy as np

NUM_STEPS = 5
GLOBAL_BATCH = 16
IMAGE_SIZE = 16
# At learning rate 0.5 this 1/16-width net is chaotic: 1e-7 rounding
# differences from the order of cross-process sums grow ~100x per step
# (1e-3 after 3 steps). At 0.1 they stay at float32 rounding (~1e-6 after 5).
LEARNING_RATE = 0.1


def fixed_global_batches(data_dir: str) -> np.ndarray:
    """[NUM_STEPS, GLOBAL_BATCH, 2, S, S, 3] views of the first test images.

    Every view's seed is its global position, so each process can build the
    same global batches whatever the process count.
    """
    import tensorflow as tf

    from simclr_jax.data import augment, sources

    ds, _, _ = sources.load_split("cifar10", "test", data_dir, process_slice=False)

    def views(index, example):
        seeds = tf.random.experimental.stateless_split(tf.stack([index, tf.constant(7, tf.int64)]), 2)
        return tf.stack([augment.train_view(example["image"], IMAGE_SIZE, IMAGE_SIZE, seed=seeds[i])
                         for i in range(2)])

    total = NUM_STEPS * GLOBAL_BATCH
    images = np.stack(list(ds.take(total).enumerate().map(views).as_numpy_iterator()))
    return images.reshape((NUM_STEPS, GLOBAL_BATCH) + images.shape[1:])


def train_steps(global_batches: np.ndarray, devices=None) -> tuple[list[float], dict]:
    """Losses and final parameters of NUM_STEPS steps; each process feeds its rows."""
    import jax

    from simclr_jax import optim, sharding
    from simclr_jax.pretraining import step
    from tests.helpers import tiny_simclr

    mesh = sharding.make_mesh(devices)
    model = tiny_simclr(sharding.DATA_AXIS)
    tx = optim.lars(learning_rate=LEARNING_RATE, weight_decay=1e-4)
    state = step.create_train_state(model, tx, image_size=IMAGE_SIZE, seed=0, mesh=mesh)
    train_step = step.make_train_step(model, tx, learning_rate=lambda s: LEARNING_RATE, temperature=0.5, mesh=mesh)
    rows = sharding.per_process_batch_size(GLOBAL_BATCH)
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    losses = []
    for views in global_batches:
        state, metrics = train_step(state, sharding.put_batch({"views": views[mine]}, mesh))
        losses.append(float(metrics["loss"]))
    params = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return losses, params


EVAL_SIZES = {"train": 1001, "test": 203}  # odd: the two processes hold uneven slices
EVAL_DIM, EVAL_CLASSES, EVAL_BATCH = 16, 10, 12  # EVAL_BATCH rows per process and batch
EVAL_LINEAR = dict(epochs=3, batch_size=32, learning_rate=0.5, weight_decay=1e-3, seed=0)


def evaluation_data() -> dict:
    """{split: (features, labels)}: the same on every process."""
    rng = np.random.default_rng(0)
    return {split: (rng.normal(size=(n, EVAL_DIM)).astype(np.float32), rng.integers(0, EVAL_CLASSES, size=n))
            for split, n in EVAL_SIZES.items()}


def sharded_evaluation(out_dir: str) -> None:
    """Extracts (identity features) each process's every other example, runs
    sharded kNN and the sharded linear classifier, and writes, from process 0,
    the gathered features and the results in the gathered order."""
    import jax
    import tensorflow as tf

    from simclr_jax import sharding
    from simclr_jax.evaluation import cached_linear, knn, passes
    from simclr_jax.evaluation.features import ShardedFeatures, ShardedSplit

    mesh = sharding.make_mesh()
    mine = slice(jax.process_index(), None, jax.process_count())
    splits = {}
    for split, (x, y) in evaluation_data().items():
        dataset = tf.data.Dataset.from_tensor_slices({"image": x[mine], "label": y[mine]}).batch(EVAL_BATCH)
        splits[split] = ShardedSplit(*passes.map_sharded_batches(jax.jit(lambda v: v), dataset, mesh, EVAL_BATCH))
    bank, queries = splits["train"], splits["test"]
    scores = knn.sharded_knn_scores(bank, queries, EVAL_CLASSES, query_batch_size=16)
    accuracy = knn.sharded_knn_accuracy(bank, queries, EVAL_CLASSES, query_batch_size=16)
    params = cached_linear.train_sharded_classifier(bank, EVAL_CLASSES, **EVAL_LINEAR)
    host = ShardedFeatures(bank, queries).numpy()
    scores = sharding.take_rows(scores, queries.rows)
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "evaluation.npz"), train_x=host.train_x, train_y=host.train_y,
                 test_x=host.test_x, test_y=host.test_y, scores=scores, top1=accuracy["top1"],
                 top5=accuracy["top5"], **{name: np.asarray(value) for name, value in params.items()})


def main(out_dir: str, data_dir: str) -> None:
    from simclr_jax import distributed

    distributed.initialize(init_timeout_s=60, heartbeat_timeout_s=10)
    import jax
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from simclr_jax.data import sources

    tf.config.set_visible_devices([], "GPU")
    index = jax.process_index()
    slice_ds, _, _ = sources.load_split("cifar10", "test", data_dir,
                                        decoders={"image": tfds.decode.SkipDecoding()})
    ids = np.array([example["id"] for example in slice_ds.as_numpy_iterator()])
    np.save(os.path.join(out_dir, f"slice_ids_{index}.npy"), ids)

    losses, params = train_steps(fixed_global_batches(data_dir))
    if index == 0:
        flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(os.path.join(out_dir, "result.npz"), losses=np.array(losses), **flat)
    sharded_evaluation(out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
