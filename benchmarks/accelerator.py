"""One command that measures an accelerator for SimCLR: one JSON object.

    python benchmarks/accelerator.py                 # the devices JAX sees: ~6-8 min on one H100
    python benchmarks/accelerator.py --small         # tiny shapes (the default on a CPU): well under a minute

On whatever devices JAX sees, it reports:

  devices      kind, count and platform; peak_source: where the peak FLOP/s comes from
  train_step   the real pretraining step (benchmarks/train_step.py's ``measure``: jit(shard_map), global
               BatchNorm, NT-Xent over gathered projections, LARS) on random views already on the devices, for
               ResNet-18 CIFAR (32 px, 512 images per device) and ResNet-50 (224 px, the largest power-of-two
               batch per device that fits), each in float32 and bfloat16: step_seconds (median), images_per_sec,
               mfu (XLA's cost analysis of the compiled step / step time / the dense peak of
               benchmarks/peaks.py; null where the chip is not in the table, CPUs included) and
               peak_memory_bytes (the device allocator's peak; each configuration runs in a process of its own
               on an accelerator, so the peak is its own and an out-of-memory batch harms nothing)
  host_views   augmented views/s of the CIFAR-10 pretraining pipeline (``input_pipeline.pretrain_dataset``)
               with every host core (tf.data's own pool), for augment_on='host' and 'device' (with 'device'
               the host only decodes, crops and flips)
  run          a short ``main.py`` CIFAR-10 pretraining (configs/cifar10.py; --small: configs/smoke.py):
               images/s and input wait (the share of wall time the accelerator waited for the next batch)
               of its logging intervals after the first
  wall_seconds the whole measurement

--small (automatic when JAX sees only CPUs): ResNet-18 at 1/8 width with batch 16 per device; for
ResNet-50's entry the ImageNet stem at 64 px, batch 4, but depth 18 (a ResNet-50 compiles for ~30 s on a
2-core CPU); 3 timed steps, a 12-step smoke run on 2,000 images, everything in this process: so CI keeps
the script working (tests/test_benchmarks.py). Its figures say that the code runs, not how fast anything is.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

# Lets `python benchmarks/accelerator.py` import the package from a checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

flags.DEFINE_bool("small", None, "Tiny shapes, all in this process; default: True when JAX sees only CPUs.")
flags.DEFINE_list("models", ["resnet18_cifar", "resnet50_224"], "Of resnet18_cifar, resnet50_224.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (parameters stay float32).")
flags.DEFINE_integer("run_steps", None, "Steps of the main.py run (0: no run); default 300, --small 12.")
flags.DEFINE_bool("host_views", True, "Measure the host pipeline's views/s.")
flags.DEFINE_string("data_dir", os.path.join(os.path.dirname(ROOT), "shared", "data", "tfds"),
                    "TFDS folder holding cifar10 (the host pipeline and the run; without it they report null).")
flags.DEFINE_string("one_step", None, "Internal: measure one 'model:dtype:per_device_batch' here, print its JSON.")
FLAGS = flags.FLAGS

# model: the architecture and shapes of each mode; batch: per device (None: the largest power of two that fits).
MODELS = {
    "resnet18_cifar": {"full": dict(depth=18, width_multiplier=1.0, cifar_stem=True, image_size=32, batch=512),
                       "small": dict(depth=18, width_multiplier=0.125, cifar_stem=True, image_size=32, batch=16)},
    "resnet50_224": {"full": dict(depth=50, width_multiplier=1.0, cifar_stem=False, image_size=224, batch=None),
                     # depth 18 stands in for 50 here: the same code, a third of the compile time on a CPU
                     "small": dict(depth=18, width_multiplier=0.125, cifar_stem=False, image_size=64, batch=4)},
}
# A first guess of one image's (two views') bytes for ResNet-50 at 224 px, where the search for the largest
# batch starts (it halves from there on out-of-memory, and doubles while the measured peak leaves room).
R50_GUESS_BYTES_PER_IMAGE = {"float32": 160 * 2**20, "bfloat16": 96 * 2**20}
MEMORY_HEADROOM = 0.95  # a doubled batch is tried when twice the measured peak stays under this share of the limit
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def step_figures(model: str, dtype: str, per_device_batch: int, small: bool) -> dict:
    """One configuration of the train step, measured in this process (train_step.measure), with the
    device's peak memory; ``fits`` False when it ran out of memory."""
    import jax

    from benchmarks import peaks, train_step

    shape = MODELS[model]["small" if small else "full"]
    device = jax.devices()[0]
    peak = peaks.peak_flops_per_device(device.device_kind, dtype)
    try:
        result = train_step.measure(
            shape["depth"], shape["width_multiplier"], shape["cifar_stem"], shape["image_size"],
            per_device_batch * jax.device_count(), dtype, "auto", steps=3 if small else 10, warmup=1 if small else 2,
            peak_tflops=peak / 1e12 if peak else None)
    except Exception as e:  # noqa: BLE001 (out of memory is an answer; anything else is raised)
        if not any(text in str(e) for text in OUT_OF_MEMORY):
            raise
        return {"model": model, "dtype": dtype, "per_device_batch": per_device_batch, "fits": False,
                "error": str(e).splitlines()[0][:300], **_memory(device)}
    figures = {k: result[k] for k in ("step_seconds", "images_per_sec", "views_per_sec", "flops_per_step", "mfu",
                                      "compile_seconds", "image_size", "depth", "width_multiplier")}
    return {"model": model, "dtype": dtype, "per_device_batch": per_device_batch, "fits": True, **figures,
            **_memory(device)}


def _memory(device) -> dict:
    """The allocator's peak and limit (null on a CPU, whose devices keep no such statistics)."""
    stats = device.memory_stats() or {}
    return {"peak_memory_bytes": stats.get("peak_bytes_in_use"), "memory_limit_bytes": stats.get("bytes_limit")}


def step_in_child(model: str, dtype: str, per_device_batch: int) -> dict:
    """step_figures in a fresh process: its own peak memory, and an out-of-memory that harms nothing."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one_step={model}:{dtype}:{per_device_batch}"],
                          capture_output=True, text=True, cwd=ROOT, env=_child_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        if any(text in "\n".join(tail) for text in OUT_OF_MEMORY):
            return {"model": model, "dtype": dtype, "per_device_batch": per_device_batch, "fits": False,
                    "error": " | ".join(tail)[:300]}
        raise RuntimeError(f"measuring {model} {dtype} at {per_device_batch} per device failed: {' | '.join(tail)}")
    return json.loads(lines[-1])


def largest_batch(measure, model: str, dtype: str, limit_bytes: int | None, cap: int = 4096) -> dict:
    """ResNet-50's largest power-of-two batch per device that fits: halves from a guess on out-of-memory,
    doubles while twice the measured peak stays under the limit. Returns the largest fitting
    measurement with ``tried`` (every batch and whether it fit) and, where the next power of two was
    not tried, why (``next_batch``)."""
    guess = max(1, int((limit_bytes or 16 * 2**30) / R50_GUESS_BYTES_PER_IMAGE[dtype]))
    batch, tried, best, why = 1 << (guess.bit_length() - 1), {}, None, None
    while batch >= 1 and batch not in tried:
        result = measure(batch)
        tried[batch] = result["fits"]
        if not result["fits"]:
            if best is not None:
                break
            batch //= 2
            continue
        best, peak, limit = result, result.get("peak_memory_bytes"), result.get("memory_limit_bytes")
        if 2 * batch in tried:
            break
        if 2 * batch > cap or not peak or not limit or 2 * peak > MEMORY_HEADROOM * limit:
            why = (f"{2 * batch} not tried: " + (f"above the cap {cap}" if 2 * batch > cap else
                                                 "twice this peak is above 95% of the limit" if peak and limit
                                                 else "no memory statistics on this device"))
            break
        batch *= 2
    tried = {str(b): fits for b, fits in sorted(tried.items())}
    if best is None:
        return {"model": model, "dtype": dtype, "fits": False, "tried": tried}
    return dict(best, tried=tried, next_batch=why or f"{2 * best['per_device_batch']} does not fit")


def train_steps(small: bool) -> list[dict]:
    """Every model x dtype asked for; in this process with --small, else each in its own."""
    results, limit = [], None
    for model in FLAGS.models:
        for dtype in FLAGS.dtypes:
            measure = ((lambda b, m=model, d=dtype: step_figures(m, d, b, small)) if small else
                       (lambda b, m=model, d=dtype: step_in_child(m, d, b)))
            batch = MODELS[model]["small" if small else "full"]["batch"]
            result = measure(batch) if batch else largest_batch(measure, model, dtype, limit)
            limit = limit or result.get("memory_limit_bytes")
            results.append(result)
            print(f"  {model} {dtype}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return results


def host_views(mode: str, data_dir: str, small: bool) -> dict:
    """Augmented views/s of the CIFAR-10 pretraining pipeline with every host core, ``mode`` = augment_on."""
    import tensorflow as tf

    from simclr_jax import recipes
    from simclr_jax.data import input_pipeline

    tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX
    config = recipes.load("smoke" if small else "cifar10")
    if "augment_on" not in config:  # HOOK: the field arrives with device augmentation
        return {"augment_on": mode, "views_per_sec": None, "reason": "this checkout has no config.augment_on"}
    if not os.path.isdir(os.path.join(data_dir, "cifar10")):
        return {"augment_on": mode, "views_per_sec": None, "reason": f"no cifar10 in {data_dir}"}
    config.update(data_dir=data_dir, augment_on=mode, download=False)
    batch, batches = (64, 8) if small else (256, 80)
    if small:
        config.update(train_split="train[:2000]", shuffle_buffer_size=500)
    iterator = input_pipeline.pretrain_dataset(config, per_process_batch_size=batch, seed=0).as_numpy_iterator()
    for _ in range(2):  # the first waits for the shuffle buffer (and fills the cache)
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return {"augment_on": mode, "views_per_sec": round(2 * batch * batches / seconds, 1), "cores": os.cpu_count(),
            "image_size": config.image_size, "batch_size": batch}


def short_run(steps: int, data_dir: str, small: bool) -> dict:
    """A short main.py CIFAR-10 pretraining in a child process: its images/s and input wait, the means of
    the logging intervals after the first (which compiles and fills the pipeline)."""
    if not os.path.isdir(os.path.join(data_dir, "cifar10")):
        return {"images_per_sec": None, "input_wait": None, "reason": f"no cifar10 in {data_dir}"}
    recipe = "smoke" if small else "cifar10"
    log_every = max(1, steps // 6)
    overrides = dict(data_dir=data_dir, num_train_steps=steps, log_every_steps=log_every, knn_monitor=False,
                     checkpoint_every_steps=steps, write_pictures=False)
    if small:
        overrides.update(train_split="train[:2000]", shuffle_buffer_size=500, batch_size=32)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), f"--config=configs/{recipe}.py",
                               f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())],
                              capture_output=True, text=True, cwd=ROOT, env=_child_env())
        seconds = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"main.py failed: {' | '.join(done.stderr.strip().splitlines()[-3:])}")
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if "images_per_sec" in line]
    steady = rows[1:] or rows
    mean = lambda key: sum(r[key] for r in steady) / len(steady)
    return {"recipe": f"configs/{recipe}.py", "steps": steps, "log_every_steps": log_every,
            "images_per_sec": round(mean("images_per_sec"), 1), "input_wait": round(mean("input_wait"), 4),
            "input_wait_per_interval": [round(r["input_wait"], 4) for r in rows],
            "images_per_sec_per_interval": [round(r["images_per_sec"], 1) for r in rows],
            "seconds": round(seconds, 1)}


_PARENT_ENV = dict(os.environ)  # the children's: they allocate as a user's run does


def _child_env() -> dict:
    return dict(_PARENT_ENV)


def devices() -> dict:
    """What JAX sees, without holding an accelerator's memory (the measurements run in their own processes)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from benchmarks import peaks

    device = jax.devices()[0]
    return {"kind": device.device_kind, "count": jax.device_count(), "platform": device.platform,
            "processes": jax.process_count(), "peak_source": peaks.source(device.device_kind)}


def main(argv):
    del argv
    if FLAGS.one_step:
        model, dtype, batch = FLAGS.one_step.split(":")
        print(json.dumps(step_figures(model, dtype, int(batch), small=False)), flush=True)
        return
    start = time.perf_counter()
    seen = devices()
    small = FLAGS.small if FLAGS.small is not None else seen["platform"] == "cpu"
    result = {"devices": seen, "small": small, "train_step": train_steps(small)}
    if FLAGS.host_views:
        result["host_views"] = [host_views(mode, FLAGS.data_dir, small) for mode in ("host", "device")]
    steps = FLAGS.run_steps if FLAGS.run_steps is not None else (12 if small else 300)
    result["run"] = short_run(steps, FLAGS.data_dir, small) if steps else None
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
