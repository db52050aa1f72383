"""Pretrains or evaluates SimCLR: python main.py --config=configs/NAME.py --workdir=DIR.

Pretraining recipes (cifar10, imagenet, imagenet_v2, smoke) train and
checkpoint into workdir; evaluation recipes (knn, cached_linear, linear_eval,
finetune, supervised_head) read --config.pretrained=PATH (our pretraining
workdir or an official SimCLR checkpoint) and write eval_results.json into
workdir; distill reads --config.teacher=PATH (a fine-tuned network) and
trains a student into workdir.
Any config field can be overridden, e.g. --config.batch_size=256.

Several processes (hosts) join one run through JAX's distributed runtime:
automatically on Cloud TPU, SLURM and Open MPI, or by setting
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (see
simclr_jax/distributed.py and the README).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

from simclr_jax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "configs", "cifar10.py"), "Recipe: a configs/*.py file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (default: ./workdir/<recipe>).")
flags.DEFINE_integer(
    "cpu_devices", -1,
    "Split the host CPU into this many JAX devices (XLA's host device count); -1: the largest power "
    "of two <= the core count, at most 8; 0: leave XLA_FLAGS alone. Only CPU training uses them: "
    "XLA:CPU runs a batch split over per-core devices faster than one device (README, Speed).")
flags.DEFINE_integer("init_timeout_s", 300, "Multi-process: how long to wait for every process to join.")
flags.DEFINE_integer("heartbeat_timeout_s", 100,
                     "Multi-process: a peer silent this long counts as dead and the run stops.")


class _QuietOrbax(logging.logging.Filter):
    """Orbax logs every save step by step at INFO: keep its warnings and
    errors only, each as one line. A failed background save also logs its
    traceback from every thread it touched; the exception that reaches the
    loop carries the same error, and says it once."""

    def filter(self, record):
        if "orbax" not in record.pathname:
            return True
        record.exc_info, record.exc_text = None, None
        return record.levelno >= logging.logging.WARNING


def _split_cpu_into_devices(count: int) -> None:
    """Sets XLA's host device count before JAX starts, unless XLA_FLAGS has one."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if count == 0 or "xla_force_host_platform_device_count" in xla_flags:
        return
    if count < 0:
        count = 1
        while count * 2 <= min(os.cpu_count() or 1, 8):
            count *= 2
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={count}".strip()


def main(argv):
    if len(argv) > 1:
        sys.exit(f"main.py: unexpected arguments {argv[1:]}: every setting is a flag, e.g. --workdir=DIR or "
                 "--config.batch_size=256")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    _split_cpu_into_devices(FLAGS.cpu_devices)
    from simclr_jax import distributed

    # Before JAX touches a device: several processes (hosts) join one run here.
    distributed.initialize(init_timeout_s=FLAGS.init_timeout_s, heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX
    import jax

    from simclr_jax import config_validation, lock, protocols

    workdir = FLAGS.workdir
    if workdir is None:
        recipe = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
        workdir = os.path.join("workdir", recipe)
    logging.info("Config:\n%s", FLAGS.config)
    try:
        config_validation.recipe_kind(FLAGS.config)  # an unknown protocol fails before the lock is taken
        with lock.hold(workdir):  # one run per workdir
            protocols.run(FLAGS.config, workdir)
    except Exception:
        if jax.process_count() > 1:
            logging.error("Process %d of %d stopped on the error below. In a multi-process run a "
                          "collective failing (e.g. 'Gloo ... Connection reset by peer') usually means "
                          "another process died first: see its log.", jax.process_index(), jax.process_count())
        raise


def _unknown_field_message(error: AttributeError) -> str:
    """ml_collections' "did you mean" for a mistyped --config.FIELD, as one line."""
    text = str(error.args[0]) if error.args else str(error)
    text = text.strip("'\"").replace("\\n", ": ").replace("\n", ": ").replace("\\'", "'")
    return f"unknown config field {text}"


def _missing_recipe(argv: list[str]):
    """The --config file named on the command line, if it does not exist."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if value is not None and not os.path.isfile(value.split(":")[0]):
            return value
    return None


if __name__ == "__main__":
    if (missing := _missing_recipe(sys.argv[1:])) is not None:
        recipes = sorted(name for name in os.listdir(os.path.join(HERE, "configs")) if name.endswith(".py")
                         and name != "__init__.py")
        sys.exit(f"main.py: no recipe file {missing!r}; pass one of {os.path.join(HERE, 'configs')}/"
                 f"{{{', '.join(recipes)}}}")
    try:
        app.run(main)
    except AttributeError as e:
        if FLAGS.is_parsed():  # not a command-line mistake
            raise
        sys.exit(f"main.py: {_unknown_field_message(e)} (see configs/ for the fields of each recipe)")
    except (UserError, FloatingPointError) as e:  # a user's mistake, or training that diverged: the fix is said
        sys.exit(f"main.py: {e}")
