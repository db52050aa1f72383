"""Time and peak memory of NT-Xent forward + backward against the batch size.

    python benchmarks/loss.py --n=16384 --impl=blockwise
    python benchmarks/loss.py            # sweep n = 512 ... 16384, both forms

``--n`` is the number of views per step, 2N: z1 and z2 each have n / 2 rows,
and the loss contrasts every view with the other n - 1. Runs on the default
device (one device, no mesh), on random normal z, timing
``jit(value_and_grad)`` with respect to z1 and z2 as the train step uses it.

Prints one JSON object per configuration:
  seconds       median wall time of one forward + backward, after a warm-up
  peak_bytes    XLA's static memory plan of the compiled function: temporaries
                + arguments + outputs (deterministic, on every backend)
  device_peak_bytes  the allocator's peak bytes in use after the runs, where
                the device reports it (GPU, TPU); otherwise null

No TensorFlow here: only JAX and simclr_jax.pretraining.losses.
"""
import json
import os
import statistics
import sys
import time

from absl import app, flags

# Lets `python benchmarks/loss.py` import the package from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from simclr_jax.pretraining import losses  # noqa: E402

SWEEP = (512, 1024, 2048, 4096, 8192, 16384)

flags.DEFINE_integer("n", None, "Views per step (2N, even); omitted: sweep 512 to 16384.")
flags.DEFINE_integer("dim", 128, "Projection dimension d.")
flags.DEFINE_enum("impl", None, ["naive", "blockwise"], "NT-Xent form; omitted: both.")
flags.DEFINE_integer("block_size", losses.DEFAULT_BLOCK_SIZE, "Columns per block (blockwise).")
flags.DEFINE_integer("repeats", 5, "Timed runs after the warm-up (median is reported).")
flags.DEFINE_float("temperature", 0.1, "tau.")
FLAGS = flags.FLAGS


def measure(n: int, dim: int, impl: str, block_size: int, repeats: int, temperature: float) -> dict:
    if n < 2 or n % 2:
        raise ValueError(f"--n is the number of views 2N and must be even and >= 2, got {n}")
    key1, key2 = jax.random.split(jax.random.key(0))
    z1 = jax.random.normal(key1, (n // 2, dim), jnp.float32)
    z2 = jax.random.normal(key2, (n // 2, dim), jnp.float32)

    def loss_fn(a, b):
        return losses.nt_xent(a, b, temperature, impl=impl, block_size=block_size)

    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    memory = step.lower(z1, z2).compile().memory_analysis()
    peak_bytes = None
    if memory is not None:
        peak_bytes = (
            memory.temp_size_in_bytes
            + memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )

    jax.block_until_ready(step(z1, z2))  # warm-up: compile and first run
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(step(z1, z2))
        times.append(time.perf_counter() - start)

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "impl": impl,
        "n": n,
        "dim": dim,
        "block_size": block_size if impl == "blockwise" else None,
        "seconds": statistics.median(times),
        "peak_bytes": peak_bytes,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "device": device.device_kind,
    }


def main(argv):
    del argv
    sizes = SWEEP if FLAGS.n is None else (FLAGS.n,)
    impls = ("naive", "blockwise") if FLAGS.impl is None else (FLAGS.impl,)
    for n in sizes:
        for impl in impls:
            result = measure(n, FLAGS.dim, impl, FLAGS.block_size, FLAGS.repeats, FLAGS.temperature)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
