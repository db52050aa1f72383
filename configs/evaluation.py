"""The fields every evaluation recipe shares (not a recipe itself: see knn.py,
cached_linear.py, linear_eval.py, finetune.py).

An evaluation reads a pretraining workdir, --config.pretrained=WORKDIR, and
takes the architecture and image size from the checkpoint's own config.json:
``model.*`` and ``image_size`` stay unset (None). Setting one is allowed only
if it agrees with the checkpoint (a contradiction is an error naming both).
"""
import ml_collections
from ml_collections.config_dict import placeholder


def base(protocol: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.protocol = protocol
    config.pretrained = placeholder(str)  # a pretraining workdir (or its checkpoints/ folder)
    config.checkpoint_step = -1  # -1: the latest
    config.random_init = False  # True: the same architecture at random initialisation (the baseline)

    # Labelled data. data_dir=None lets TFDS resolve it (honouring TFDS_DATA_DIR).
    config.dataset = "cifar10"  # any TFDS image classification dataset, or folder:ROOT
    config.data_dir = placeholder(str)
    config.download = True
    config.train_split = "train"
    config.test_split = "test"
    config.cache_dataset = True  # keep decoded images in memory (small datasets)

    # Read from the checkpoint; set only to assert them.
    config.image_size = placeholder(int)
    config.model = unset_model()

    config.head_layer = 0  # 0 = h; i = output of projection-head layer i
    config.eval_batch_size = 512  # feature extraction and test scoring; a multiple of the device count
    config.seed = 0  # random_init, the classifiers' batches, the pictures
    return config


def unset_model() -> ml_collections.ConfigDict:
    """Every architecture field unset (None): filled in from a checkpoint."""
    model = ml_collections.ConfigDict()
    model.depth = placeholder(int)
    model.width_multiplier = placeholder(float)
    model.cifar_stem = placeholder(bool)
    model.head_layers = placeholder(int)
    model.proj_dim = placeholder(int)
    model.variant = placeholder(str)
    model.sk_ratio = placeholder(float)
    model.se_ratio = placeholder(float)
    return model


def linear_section(epochs: int) -> ml_collections.ConfigDict:
    """The paper's linear-evaluation optimiser: Nesterov SGD, peak lr 0.1 x B/256,
    cosine decay, no weight decay."""
    linear = ml_collections.ConfigDict()
    linear.epochs = epochs
    linear.batch_size = 512
    linear.learning_rate = 0.1  # peak = learning_rate * batch_size / 256
    linear.weight_decay = 0.0
    return linear


def add_loop_fields(config: ml_collections.ConfigDict, *, log_every_steps: int, checkpoint_every_steps: int,
                    keep_checkpoints: int = 2) -> None:
    """The fields of a protocol that trains in the one loop (simclr_jax/loop.py):
    it checkpoints, resumes after preemption and guards non-finite steps."""
    config.log_every_steps = log_every_steps
    config.checkpoint_every_steps = checkpoint_every_steps
    config.keep_checkpoints = keep_checkpoints
    # A non-finite loss or gradient: 'stop' (with the step and the last good
    # checkpoint), or 'skip' the update and go on.
    config.nonfinite_policy = "stop"
