"""Pretrains SimCLR: python main.py --config=configs/cifar10.py --workdir=DIR.

Any config field can be overridden, e.g. --config.batch_size=256.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "configs", "cifar10.py"), "Recipe: a configs/*.py file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (default: ./workdir/<recipe>).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX
    from simclr_jax import train

    workdir = FLAGS.workdir
    if workdir is None:
        recipe = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
        workdir = os.path.join("workdir", recipe)
    logging.info("Config:\n%s", FLAGS.config)
    train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main)
