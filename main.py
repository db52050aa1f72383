"""Pretrains or evaluates SimCLR: python main.py --config=configs/NAME.py --workdir=DIR.

Pretraining recipes (cifar10, imagenet, smoke) train and checkpoint into
workdir; evaluation recipes (knn, linear_eval, ...) read
--config.pretrained=PRETRAIN_WORKDIR and write eval_results.json into workdir.
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


class _QuietOrbax(logging.logging.Filter):
    """Orbax logs every save step by step at INFO; keep its warnings only."""

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX
    from simclr_jax import evaluate, train

    workdir = FLAGS.workdir
    if workdir is None:
        recipe = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
        workdir = os.path.join("workdir", recipe)
    logging.info("Config:\n%s", FLAGS.config)
    if "protocol" in FLAGS.config:  # an evaluation recipe
        evaluate.evaluate(FLAGS.config, workdir)
    else:
        train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main)
