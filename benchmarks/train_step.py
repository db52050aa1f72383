"""Throughput of the real SimCLR train step on synthetic images.

    python benchmarks/train_step.py --depth=18 --cifar_stem --image_size=32 --batch_size=128 --dtype=float32
    python benchmarks/train_step.py --depth=50 --image_size=224 --batch_size=256 --dtype=bfloat16   # GPU/TPU
    python benchmarks/train_step.py --augment_on=both --blur   # what device augmentation adds to the step

Builds exactly what pretraining runs (simclr_jax.pretraining.step.make_train_step: the
jit(shard_map) step with global BatchNorm, NT-Xent over the gathered
projections and LARS) on every device present, feeds it random views already
on the devices, and prints one JSON object:

  compile_seconds    lowering + XLA compilation of the step
  step_seconds       median wall time of one step over --steps steps, after --warmup
  images_per_sec     batch_size / step_seconds (views/s is twice that)
  flops_per_step     XLA's cost analysis of the compiled step, all devices
  mfu                flops_per_step / step_seconds / peak FLOP/s of the devices
                     (known accelerators, or --peak_tflops per device); else null

``--augment_on=device`` adds the colour distortion (strength --color_jitter_strength)
and, with --blur, the Gaussian blur to the step (simclr_jax.data.device_augment, as
config.augment_on='device' does); ``--augment_on=both`` times the step without and with
them on the same machine and adds one more object: augment_ms_per_image, the step's added
wall time per image (both views), and augment_fraction, its share of the augmented step.

No TensorFlow is imported, so this runs on machines with JAX only.
"""
import functools
import json
import os
import statistics
import sys
import time

from absl import app, flags

# Lets `python benchmarks/train_step.py` import the package from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import peaks  # noqa: E402
from simclr_jax import models, optim, sharding  # noqa: E402
from simclr_jax.data import device_augment  # noqa: E402
from simclr_jax.pretraining import step  # noqa: E402

flags.DEFINE_integer("depth", 18, "ResNet depth: 18, 34, 50, 101, 152 or 200.")
flags.DEFINE_float("width_multiplier", 1.0, "ResNet width multiplier.")
flags.DEFINE_bool("cifar_stem", False, "3x3 stride-1 stem without max-pool (CIFAR).")
flags.DEFINE_integer("image_size", 224, "Crop size in pixels.")
flags.DEFINE_integer("batch_size", 128, "Global images per step (two views each).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
flags.DEFINE_enum("loss_impl", "auto", ["auto", "naive", "blockwise"], "NT-Xent form.")
flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_enum("augment_on", "host", ["host", "device", "both"],
                  "host: views arrive augmented; device: the step adds colour (and blur); both: time each.")
flags.DEFINE_float("color_jitter_strength", 1.0, "Colour strength of --augment_on=device.")
flags.DEFINE_bool("blur", True, "Gaussian blur in --augment_on=device.")
flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s of one device for the MFU; default: known chips.")
FLAGS = flags.FLAGS

def measure(depth, width_multiplier, cifar_stem, image_size, batch_size, dtype, loss_impl, steps, warmup,
            peak_tflops=None, augment_on="host", color_jitter_strength=1.0, blur=True) -> dict:
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch_size, mesh.devices.size, jax.process_count())
    model = models.SimCLR(depth=depth, width_multiplier=width_multiplier, cifar_stem=cifar_stem,
                          axis_name=sharding.DATA_AXIS, dtype=jnp.dtype(dtype))
    tx = optim.lars(learning_rate=0.1, weight_decay=1e-6)
    state = step.create_train_state(model, tx, image_size=image_size, seed=0, mesh=mesh)
    augment_views = None
    if augment_on == "device":
        augment_views = functools.partial(device_augment.augment_views, strength=color_jitter_strength, blur=blur)
    train_step = step.make_train_step(model, tx, learning_rate=lambda s: 0.1, temperature=0.1, mesh=mesh,
                                      loss_impl=loss_impl, augment_views=augment_views)
    rng = np.random.default_rng(0)
    batch = {"views": rng.uniform(size=(batch_size, 2, image_size, image_size, 3)).astype(np.float32)}
    if augment_on == "device":
        batch["augment_keys"] = rng.integers(0, 2**32, (batch_size, 2, 2), dtype=np.uint32)
    batch = sharding.put_batch(batch, mesh)

    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # The compiled program is one device's share; the step's work is all of them.
    flops = float(cost.get("flops", 0.0)) * mesh.devices.size if cost else None

    for _ in range(warmup):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)  # defined with --warmup=0 too
    times = []
    for _ in range(max(steps, 1)):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)

    device = jax.devices()[0]
    peak = peak_tflops * 1e12 if peak_tflops else peaks.peak_flops_per_device(device.device_kind, dtype)
    return {
        "depth": depth, "width_multiplier": width_multiplier, "cifar_stem": cifar_stem,
        "image_size": image_size, "batch_size": batch_size, "dtype": dtype, "loss_impl": loss_impl,
        "augment_on": augment_on, "color_jitter_strength": color_jitter_strength if augment_on == "device" else None,
        "blur": blur if augment_on == "device" else None,
        "devices": mesh.devices.size, "device": device.device_kind, "platform": device.platform,
        "compile_seconds": round(compile_seconds, 2),
        "step_seconds": seconds,
        "images_per_sec": batch_size / seconds,
        "views_per_sec": 2 * batch_size / seconds,
        "flops_per_step": flops,
        "mfu": flops / seconds / (peak * mesh.devices.size) if flops and peak else None,
        "loss": float(metrics["loss"]),
    }


def main(argv):
    del argv
    places = ("host", "device") if FLAGS.augment_on == "both" else (FLAGS.augment_on,)
    results = {}
    for place in places:
        results[place] = measure(FLAGS.depth, FLAGS.width_multiplier, FLAGS.cifar_stem, FLAGS.image_size,
                                 FLAGS.batch_size, FLAGS.dtype, FLAGS.loss_impl, FLAGS.steps, FLAGS.warmup,
                                 FLAGS.peak_tflops, place, FLAGS.color_jitter_strength, FLAGS.blur)
        print(json.dumps(results[place]), flush=True)
    if len(results) == 2:
        added = results["device"]["step_seconds"] - results["host"]["step_seconds"]
        print(json.dumps({"augment_ms_per_image": 1e3 * added / FLAGS.batch_size,
                          "augment_fraction": added / results["device"]["step_seconds"]}), flush=True)


if __name__ == "__main__":
    app.run(main)
