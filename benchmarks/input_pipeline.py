"""Augmented views per second of the tf.data pretraining pipeline, per host core.

    python benchmarks/input_pipeline.py                       # the 4 standard configurations
    python benchmarks/input_pipeline.py --image_size=224 --blur --threads=0
    python benchmarks/input_pipeline.py --augment_on=device   # the host's share when the device adds colour, blur
    python benchmarks/input_pipeline.py --prepare_only        # files for torch_input_pipeline.py

Runs ``simclr_jax.data.input_pipeline.pretrain_dataset`` itself (augmentations
from ``simclr_jax.data.augment``, nothing re-implemented here) on two sources:

- ``cifar10_real``, 32 px: the real CIFAR-10 train split from --data_dir
  with configs/cifar10.py (decoded uint8 cached in memory, shuffle buffer
  50,000, colour strength 0.5). The first batch waits for the shuffle buffer,
  i.e. a full pass that fills the cache, and is skipped with the warm-up.
- ``jpeg_upscaled``, 224 px: --num_jpegs real CIFAR-10 train images upscaled
  (bicubic) to --jpeg_size and JPEG-encoded once into an image folder under
  /tmp, read as ``config.dataset = 'folder:...'`` with configs/imagenet.py
  (no cache: every view pays the file read and the JPEG decode, as on
  ImageNet; colour strength 1.0). --shuffle_buffer (default 1,000) keeps the
  buffer small here.

``--threads=N`` gives tf.data a private pool of N threads and one thread per
op (``max_intra_op_parallelism=1``, see --intra_op), so with the default
N=1 the rate is what one host core sustains; ``--threads=0`` uses tf.data's
default pool (all cores). ``--nodeterministic`` lets tf.data reorder (the
pipelines themselves are always deterministic). Each run skips
--warmup_batches batches, then times --num_views views (2 per image). With
--blur, --image_size or --augment_on unset, both values are run. With
``--augment_on=device`` the host decodes, crops and flips only (colour and
blur then run in the train step: benchmarks/train_step.py --augment_on).

Prints one JSON object per configuration:
  config        image_size, blur, augment_on, source, jpeg_size ('WxH' of the
                JPEGs, null for cifar10_real), batch_size (images; 2 views each)
  threads       tf.data threads used (the core count for --threads=0)
  views_per_sec           augmented views per second, after the warm-up
  views_per_sec_per_core  views_per_sec / threads
  seconds       wall time of the timed views
  cpu_seconds   CPU time of this process (all threads) over the same views
  views_per_cpu_sec  views / cpu_seconds: the per-core rate, less sensitive
                to other processes than views_per_sec_per_core
  load_avg_start  1-minute load average when the configuration started
                (other processes on the host lower the numbers)
"""
import json
import os
import sys
import time

from absl import app, flags

# Lets `python benchmarks/input_pipeline.py` import the package from a checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from configs import cifar10 as cifar10_config  # noqa: E402
from configs import imagenet as imagenet_config  # noqa: E402
from simclr_jax.data import input_pipeline, sources  # noqa: E402

flags.DEFINE_integer("image_size", None, "32 (CIFAR-10) or 224 (JPEGs); omitted: both.")
flags.DEFINE_boolean("blur", None, "Gaussian blur on/off; omitted: both.")
flags.DEFINE_enum("augment_on", None, ["host", "device"], "config.augment_on; omitted: both.")
flags.DEFINE_integer("threads", 1, "tf.data private threads; 0: all cores.")
flags.DEFINE_integer("num_views", None, "Views to time; omitted: 16384 (32 px), 2048 (224 px).")
flags.DEFINE_integer("batch_size", 128, "Images per batch (2 views each).")
flags.DEFINE_integer("warmup_batches", 3, "Batches skipped before timing.")
flags.DEFINE_integer("shuffle_buffer", None,
                     "Shuffle buffer; omitted: 50,000 (32 px), 1,000 (224 px).")
flags.DEFINE_boolean("deterministic", True, "tf.data ordering (the pipelines' is deterministic).")
flags.DEFINE_integer("intra_op", 1, "max_intra_op_parallelism; 0: tf.data's default.")
flags.DEFINE_string("data_dir", os.path.join(os.path.dirname(ROOT), "shared", "data", "tfds"),
                    "TFDS folder holding the real cifar10.")
flags.DEFINE_string("jpeg_size", "400x350", "WxH of the upscaled JPEGs.")
flags.DEFINE_integer("num_jpegs", 1000, "CIFAR-10 train images turned into JPEGs.")
flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality.")
flags.DEFINE_string("tmp_dir", "/tmp", "Where the JPEG folder and the CIFAR-10 .npy go.")
flags.DEFINE_boolean("prepare_only", False,
                     "Write the JPEG folder and the CIFAR-10 .npy for the torch script, then exit.")
FLAGS = flags.FLAGS


def jpeg_root(tmp_dir, num, size, quality):
    return os.path.join(tmp_dir, f"simclr_bench_jpeg_n{num}_{size}_q{quality}")


def cifar_npy_path(tmp_dir):
    return os.path.join(tmp_dir, "simclr_bench_cifar10_train.npy")


def _parse_size(size):
    width, height = (int(v) for v in size.lower().split("x"))
    return width, height


def prepare_jpegs(data_dir, root, num, size, quality):
    """root/train/<label>/<index>.jpg from upscaled CIFAR-10 (written once)."""
    if os.path.exists(os.path.join(root, "DONE")):
        return root
    width, height = _parse_size(size)
    ds, _, _ = sources.load_split("cifar10", f"train[:{num}]", data_dir, process_slice=False)
    for i, example in enumerate(ds):
        image = tf.image.resize(tf.cast(example["image"], tf.float32), [height, width],
                                method="bicubic")
        image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
        folder = os.path.join(root, "train", str(int(example["label"])))
        os.makedirs(folder, exist_ok=True)
        tf.io.write_file(os.path.join(folder, f"{i:05d}.jpg"),
                         tf.io.encode_jpeg(image, quality=quality))
    open(os.path.join(root, "DONE"), "w").close()
    return root


def prepare_cifar_npy(data_dir, path):
    """The decoded CIFAR-10 train split as uint8 [50000, 32, 32, 3] (for torch)."""
    if not os.path.exists(path):
        ds, _, _ = sources.load_split("cifar10", "train", data_dir, process_slice=False)
        images = np.stack([ex["image"] for ex in ds.as_numpy_iterator()])
        np.save(path + ".tmp.npy", images)
        os.replace(path + ".tmp.npy", path)
    return path


def make_config(image_size, blur, augment_on):
    if image_size == 32:
        config, source = cifar10_config.get_config(), "cifar10_real"
        config.dataset, config.data_dir = "cifar10", FLAGS.data_dir
    elif image_size == 224:
        config, source = imagenet_config.get_config(), "jpeg_upscaled"
        root = prepare_jpegs(FLAGS.data_dir, jpeg_root(FLAGS.tmp_dir, FLAGS.num_jpegs,
                                                       FLAGS.jpeg_size, FLAGS.jpeg_quality),
                             FLAGS.num_jpegs, FLAGS.jpeg_size, FLAGS.jpeg_quality)
        config.dataset, config.data_dir = "folder:" + root, None
        config.shuffle_buffer_size = 1000
    else:
        raise ValueError(f"--image_size must be 32 or 224, got {image_size}")
    config.blur, config.augment_on = blur, augment_on
    if FLAGS.shuffle_buffer is not None:
        config.shuffle_buffer_size = FLAGS.shuffle_buffer
    return config, source


def measure(image_size, blur, augment_on):
    load_avg = os.getloadavg()[0]
    config, source = make_config(image_size, blur, augment_on)
    batch = FLAGS.batch_size
    num_views = FLAGS.num_views or (16384 if image_size == 32 else 2048)
    num_batches = max(1, -(-num_views // (2 * batch)))
    threads = FLAGS.threads if FLAGS.threads > 0 else os.cpu_count()

    ds = input_pipeline.pretrain_dataset(config, per_process_batch_size=batch, seed=0)
    options = tf.data.Options()
    options.deterministic = FLAGS.deterministic
    if FLAGS.intra_op > 0:
        options.threading.max_intra_op_parallelism = FLAGS.intra_op
    if FLAGS.threads > 0:
        options.threading.private_threadpool_size = FLAGS.threads
    it = ds.with_options(options).as_numpy_iterator()
    for _ in range(FLAGS.warmup_batches):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        views = next(it)["views"]
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    assert views.shape == (batch, 2, image_size, image_size, 3), views.shape
    rate = num_batches * 2 * batch / seconds
    return {
        "config": {"image_size": image_size, "blur": blur, "augment_on": augment_on, "source": source,
                   "jpeg_size": FLAGS.jpeg_size if source == "jpeg_upscaled" else None,
                   "batch_size": batch},
        "threads": threads,
        "views_per_sec": round(rate, 1),
        "views_per_sec_per_core": round(rate / threads, 1),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "views_per_cpu_sec": round(num_batches * 2 * batch / cpu_seconds, 1),
        "load_avg_start": round(load_avg, 2),
    }


def main(argv):
    del argv
    if FLAGS.prepare_only:
        root = prepare_jpegs(FLAGS.data_dir, jpeg_root(FLAGS.tmp_dir, FLAGS.num_jpegs,
                                                       FLAGS.jpeg_size, FLAGS.jpeg_quality),
                             FLAGS.num_jpegs, FLAGS.jpeg_size, FLAGS.jpeg_quality)
        npy = prepare_cifar_npy(FLAGS.data_dir, cifar_npy_path(FLAGS.tmp_dir))
        print(json.dumps({"jpeg_root": root, "cifar10_npy": npy}))
        return
    sizes = (32, 224) if FLAGS.image_size is None else (FLAGS.image_size,)
    blurs = (False, True) if FLAGS.blur is None else (FLAGS.blur,)
    places = ("host", "device") if FLAGS.augment_on is None else (FLAGS.augment_on,)
    for size in sizes:
        for blur in blurs:
            for place in places:
                print(json.dumps(measure(size, blur, place)), flush=True)


if __name__ == "__main__":
    app.run(main)
