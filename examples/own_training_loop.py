"""SimCLR's views, network, loss and optimiser in a training loop of your own.

Everything comes from the public API (``import simclr_jax``): tf.data makes
two ``train_view``s of each image, a ``SimCLR`` network maps both to
projections, ``nt_xent`` contrasts them and ``lars`` with the warm-up +
cosine ``schedule`` updates the parameters. One device, no mesh: the loss
sees the whole batch. Swap ``images`` for your own uint8 [N, H, W, 3] array.

    python examples/own_training_loop.py --steps 20
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf

import simclr_jax

SIZE, BATCH, TEMPERATURE = 32, 16, 0.5


def view_pairs(images: np.ndarray) -> tf.data.Dataset:
    """Batches of [BATCH, 2, SIZE, SIZE, 3] float32: two random views per image."""
    def two_views(image):
        return tf.stack([simclr_jax.train_view(image, SIZE, SIZE, color_jitter_strength=0.5, blur=False)
                         for _ in range(2)])
    return (tf.data.Dataset.from_tensor_slices(images).repeat().shuffle(len(images), seed=0)
            .map(two_views).batch(BATCH, drop_remainder=True))


def main(steps: int) -> list[float]:
    images = np.random.default_rng(0).integers(0, 256, size=(256, SIZE, SIZE, 3), dtype=np.uint8)
    model = simclr_jax.SimCLR(depth=18, width_multiplier=0.0625, cifar_stem=True)  # 4-32 channels: seconds on a CPU
    init = jax.jit(model.init, static_argnames="train")  # one compiled program, not one per layer's op
    variables = init(jax.random.key(0), jnp.zeros((2, SIZE, SIZE, 3)), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = simclr_jax.lars(simclr_jax.schedule(0.5, total_steps=steps, warmup_steps=steps // 4), weight_decay=1e-6)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, views):
        def loss_fn(params):
            both = jnp.concatenate([views[:, 0], views[:, 1]])  # one batch: BatchNorm sees both views
            (_, z), updates = model.apply({"params": params, "batch_stats": batch_stats}, both, train=True,
                                          mutable=["batch_stats"])
            loss, _ = simclr_jax.nt_xent(z[:BATCH], z[BATCH:], TEMPERATURE)
            return loss, updates["batch_stats"]
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    losses = []
    for step, views in zip(range(1, steps + 1), view_pairs(images).as_numpy_iterator()):
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, views)
        losses.append(float(loss))
        print(f"step {step}: loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
