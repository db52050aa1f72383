"""Pretrains or evaluates SimCLR: simclr-jax (or python main.py) --config=RECIPE --workdir=DIR.

RECIPE is a bundled recipe's name (smoke, cifar10, imagenet, imagenet_v2;
knn, cached_linear, linear_eval, finetune, supervised_head; distill) or a
recipe file (configs/NAME.py, or your own). Pretraining recipes train and
checkpoint into workdir; evaluation recipes read --config.pretrained=PATH (our
pretraining workdir, an official SimCLR checkpoint or a torchvision
.safetensors) and write eval_results.json into workdir; distill reads --config.teacher=PATH (a
fine-tuned network) and trains a student into workdir.
Any config field can be overridden, e.g. --config.batch_size=256.

Without --config the recipe is cifar10, which is meant for a GPU or TPU: on a
host without one, the run says how long cifar10 would take and trains smoke
instead (--config=cifar10 insists).

Several processes (hosts) join one run through JAX's distributed runtime:
automatically on Cloud TPU, SLURM and Open MPI, or by setting
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (see
simclr_jax/distributed.py).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from simclr_jax import recipes  # noqa: E402
from simclr_jax.errors import UserError  # noqa: E402

DEFAULT_RECIPE = "cifar10"  # what a bare command trains where there is an accelerator
CPU_RECIPE = "smoke"  # what it trains instead where there is none

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", recipes.path(DEFAULT_RECIPE),
    f"Recipe: a bundled recipe's name ({', '.join(recipes.names())}) or a recipe file. Default {DEFAULT_RECIPE}; "
    f"without --config on a host with no accelerator, {CPU_RECIPE} (see above).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (default: ./workdir/<recipe>).")
flags.DEFINE_integer(
    "cpu_devices", -1,
    "Split the host CPU into this many JAX devices (XLA's host device count); -1: the largest power "
    "of two <= the core count, at most 8; 0: leave XLA_FLAGS alone. Only CPU training uses them: "
    "XLA:CPU runs a batch split over per-core devices faster than one device (docs: Speed).")
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


def _config_value(argv: list[str]) -> tuple[int, str] | None:
    """(index, value) of the --config flag on a command line, if there is one."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return i, arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return i + 1, argv[i + 1]
    return None


def resolve_recipe(argv: list[str]) -> list[str]:
    """The command line with --config=NAME replaced by the bundled recipe's file;
    a recipe that is neither a file nor a bundled name is a UserError."""
    found = _config_value(argv)
    if found is None:
        return argv
    index, value = found
    recipe, colon, arguments = value.partition(":")
    if os.path.isfile(recipe):
        return argv
    if os.sep in recipe or recipe.endswith(".py"):
        raise UserError(f"no recipe file {recipe!r}; pass a recipe file or one of {', '.join(recipes.names())}")
    resolved = recipes.path(recipe) + colon + arguments
    argv = list(argv)
    argv[index] = f"--config={resolved}" if argv[index].startswith("--config=") else resolved
    return argv


def _with_overrides(recipe: str, argv: list[str]):
    """The bundled ``recipe`` with the --config.FIELD overrides of ``argv`` applied."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", recipes.path(recipe), flag_values=values, lock_config=True)
    overrides = [arg for i, arg in enumerate(argv) if arg.startswith("--config.")
                 or (i and argv[i - 1].startswith("--config.") and "=" not in argv[i - 1])]
    values([argv[0], *overrides])
    return values.config


def _cpu_instead_of_default(argv: list[str]):
    """No --config and no accelerator: says what the default recipe would cost
    here and returns the CPU recipe (with the command line's overrides)."""
    from simclr_jax.data import sources
    from simclr_jax.pretraining import estimate

    default = FLAGS.config
    examples = sources.prepared_split_size(default.dataset, default.train_split, default.data_dir)
    cost = estimate.estimate(default, examples)
    logging.warning(
        "No accelerator here and no --config: the default recipe (%s: %g epochs of %s) is meant for a GPU or "
        "TPU. At ~%.0f images/s (%.1f GFLOP per training image; this CPU ran ~%.0f GFLOP/s) it would take %s. "
        "Training the CPU recipe %s instead (a few minutes); --config=%s runs the default anyway.",
        DEFAULT_RECIPE, default.num_epochs, default.dataset, cost.images_per_second, cost.flops_per_image / 1e9,
        cost.flops_per_second / 1e9, cost.took(default.num_epochs), CPU_RECIPE, DEFAULT_RECIPE)
    return _with_overrides(CPU_RECIPE, argv)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"{_program()}: unexpected arguments {argv[1:]}: every setting is a flag, e.g. --workdir=DIR or "
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

    config, recipe = FLAGS.config, os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
    if _config_value(sys.argv[1:]) is None and jax.default_backend() == "cpu" and jax.process_count() == 1:
        config, recipe = _cpu_instead_of_default(sys.argv), CPU_RECIPE
    workdir = FLAGS.workdir or os.path.join("workdir", recipe)
    logging.info("Config:\n%s", config)
    try:
        config_validation.recipe_kind(config)  # an unknown protocol fails before the lock is taken
        with lock.hold(workdir):  # one run per workdir
            protocols.run(config, workdir)
    except Exception:
        if jax.process_count() > 1:
            logging.error("Process %d of %d stopped on the error below. In a multi-process run a "
                          "collective failing (e.g. 'Gloo ... Connection reset by peer') usually means "
                          "another process died first: see its log.", jax.process_index(), jax.process_count())
        raise


def _program() -> str:
    """How the user called us: main.py or simclr-jax, for messages."""
    return os.path.basename(sys.argv[0]) or "simclr-jax"


def _unknown_field_message(error: AttributeError) -> str:
    """ml_collections' "did you mean" for a mistyped --config.FIELD, as one line."""
    text = str(error.args[0]) if error.args else str(error)
    text = text.strip("'\"").replace("\\n", ": ").replace("\n", ": ").replace("\\'", "'")
    return f"unknown config field {text}"


def run() -> None:
    """The command (console script simclr-jax; main.py calls it too)."""
    sys.modules["__main__"].__doc__ = __doc__  # --help's usage text, for main.py and simclr-jax alike
    for name in ("config", "workdir", "cpu_devices", "init_timeout_s", "heartbeat_timeout_s"):
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])  # what --help lists
    try:
        sys.argv = resolve_recipe(sys.argv)
        app.run(main)
    except AttributeError as e:
        if FLAGS.is_parsed():  # not a command-line mistake
            raise
        sys.exit(f"{_program()}: {_unknown_field_message(e)} (see the recipe files in {recipes.directory()})")
    except (UserError, FloatingPointError) as e:  # a user's mistake, or training that diverged: the fix is said
        sys.exit(f"{_program()}: {e}")
