"""A train step in K chunks per device that keeps every negative (GradCache).

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup": the contrastive loss couples all projections, but its
gradient reaches the encoder only through them. So

  pass 1 runs the model on one chunk at a time and keeps only its
         projections (and h, for the online probe), no activations;
         NT-Xent over all of them gives L and dL/dz exactly as one big batch;
  pass 2 runs each chunk's forward again under ``jax.vjp`` and back-propagates
         its slice of dL/dz, summing the parameter gradients.

Both passes are loops over the chunks (lax.scan), so one chunk's
activations are live at a time and pass 2 starts only once dL/dz exists.
Unrolled, the TPU compiler ran pass 1's K chunks side by side and hoisted
chunk 1's pass-2 forward above the loss: it drops the optimisation barriers
that were to order them (seen in its buffer assignment). ``unroll=True`` is
for XLA:CPU, which runs convolutions in loop bodies several times slower
(benchmarks/memory.py --time_only) and does not schedule for memory anyway.

What does change is BatchNorm: its statistics are those of a chunk (still
global over devices through the model's axis_name), not of the whole batch.
Chunk k holds view 1 of group k and view 2 of group k + 1 (mod K), so for
K >= 2 no chunk holds both views of an image and its statistics cannot give
the positives away, which is why SimCLR uses global BatchNorm at all. The
moving statistics take the mean of the K chunks' updates.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def chunk_assignment(n: int, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
    """(view1_rows, view2_rows), each [K, n/K]: chunk k holds view 1 of the
    images ``view1_rows[k]`` and view 2 of the images ``view2_rows[k]``."""
    if n % microbatches:
        raise ValueError(f"{n} images per device do not split into {microbatches} microbatches")
    groups = np.arange(n).reshape(microbatches, n // microbatches)
    return groups, np.roll(groups, -1, axis=0)


def _to_chunks(views: jax.Array, microbatches: int) -> jax.Array:
    """[n, 2, ...] views -> [K, 2n/K, ...] chunks, view-1 rows first."""
    view1_rows, view2_rows = chunk_assignment(views.shape[0], microbatches)
    return jnp.concatenate([views[view1_rows, 0], views[view2_rows, 1]], axis=1)


def _from_chunks(x: jax.Array) -> jax.Array:
    """[K, 2n/K, ...] per-chunk rows -> [2n, ...]: view 1 of every image in
    image order, then view 2 (the layout of the one-batch step)."""
    microbatches, rows = x.shape[:2]
    view1_rows, view2_rows = chunk_assignment(microbatches * rows // 2, microbatches)
    flat = lambda y: y.reshape(-1, *x.shape[2:])
    view1 = flat(x[:, : rows // 2])[np.argsort(view1_rows.ravel())]
    view2 = flat(x[:, rows // 2:])[np.argsort(view2_rows.ravel())]
    return jnp.concatenate([view1, view2], axis=0)


def _forward_chunks(forward: Callable, params: Any, batch_stats: Any, chunks: jax.Array, unroll: bool):
    """((h, z), BN statistics) of every chunk, stacked [K, ...], one chunk at a time."""
    _, outputs = jax.lax.scan(lambda _, chunk: (None, forward(params, batch_stats, chunk)), None, chunks,
                              unroll=unroll)
    return outputs


def projections(forward: Callable, params: Any, batch_stats: Any, views: jax.Array,
                microbatches: int, unroll: bool = False) -> jax.Array:
    """z of this device's views, [2n, d] (view 1 of every image, then view 2),
    computed chunk by chunk with per-chunk BatchNorm, as pass 1 computes them."""
    (_, z), _ = _forward_chunks(forward, params, batch_stats, _to_chunks(views, microbatches), unroll)
    return _from_chunks(z)


def value_and_grad(
    forward: Callable,
    objective: Callable,
    params: Any,
    batch_stats: Any,
    views: jax.Array,
    microbatches: int,
    unroll: bool = False,
) -> tuple[tuple[jax.Array, Any], Any, Any]:
    """((objective, aux), grads, new batch_stats) of this device's views, in chunks.

    ``forward(params, batch_stats, images) -> ((h, z), new_batch_stats)``
    runs the model in train mode; ``objective(params, h, z) -> (total, aux)``
    takes [2n] rows (view 1 of every image, then view 2) and may use params
    directly (the online probe) but reaches the model's only through z: h
    enters it behind ``stop_gradient``. Runs inside shard_map, where the
    vjp with respect to the replicated params sums over devices, as grad does.
    ``unroll`` unrolls both loops (same numbers, no memory bound; see above).
    """
    chunks = _to_chunks(views, microbatches)
    (h, z), chunk_stats = _forward_chunks(forward, params, batch_stats, chunks, unroll)
    new_batch_stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), chunk_stats)

    def chunked_objective(params, z):
        return objective(params, _from_chunks(h), _from_chunks(z))

    (total, aux), (objective_grads, dz) = jax.value_and_grad(
        chunked_objective, argnums=(0, 1), has_aux=True)(params, z)

    def add_chunk_gradient(model_grads, chunk_and_dz):
        images, dz_chunk = chunk_and_dz
        _, vjp = jax.vjp(lambda p: forward(p, batch_stats, images)[0][1], params)
        return jax.tree.map(jnp.add, model_grads, vjp(dz_chunk)[0]), None

    model_grads, _ = jax.lax.scan(add_chunk_gradient, jax.tree.map(jnp.zeros_like, params), (chunks, dz),
                                  unroll=unroll)
    return (total, aux), jax.tree.map(jnp.add, objective_grads, model_grads), new_batch_stats
