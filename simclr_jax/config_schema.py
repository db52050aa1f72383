"""Every config field, declared once: its default, its rule and what it means.

Fields come in blocks (data, architecture, kNN, optimiser, loop, ...), and a
recipe kind is the blocks it reads (``KINDS``). ``build(kind)`` makes a kind's
ConfigDict from the declarations: configs/*.py start there and set only the
values their recipe changes. ``config_validation`` checks a config against the
same declarations (exactly the kind's fields, each by its rule), so a recipe
and the validator cannot disagree.

The pretraining defaults are the CIFAR-10 recipe (configs/cifar10.py). An
evaluation reads a pretraining workdir and takes the architecture and image
size from the checkpoint's config.json, so there they default to None (a
value set anyway must agree with the checkpoint); distillation's student
takes them from init_from or the teacher.

Only ml_collections is imported: recipes load while flags parse, before
main.py sets up JAX.
"""
import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy, and what to say when it does not
    (a string, or a function making it where it lists another module's choices)."""
    holds: Callable[[Any], bool]
    expected_text: str | Callable[[], str]

    @property
    def expected(self) -> str:
        return self.expected_text if isinstance(self.expected_text, str) else self.expected_text()

    def or_none(self) -> "Rule":
        """This rule, or None (filled in later, e.g. from a checkpoint)."""
        return Rule(lambda v: v is None or self.holds(v), self.expected_text)


@dataclasses.dataclass(frozen=True)
class Field:
    """A config field: its default, its rule, what it means, and whether a
    resumed run may change it (how it reports, checkpoints and monitors, where
    the data lies, how long it runs: any other change would continue a
    different run than the checkpoint holds). A None default needs ``value_type``,
    the value type a command-line override is parsed as."""
    default: Any
    rule: Rule
    doc: str
    value_type: type | None = None
    resumable: bool = False

    def __post_init__(self):
        if self.value_type is None:
            if self.default is None:
                raise TypeError("a Field defaulting to None needs its value_type")
            object.__setattr__(self, "value_type", type(self.default))

    def unset(self) -> "Field":
        """The same field defaulting to None, which it then accepts."""
        return dataclasses.replace(self, default=None, rule=self.rule.or_none())


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'optimizer': {'momentum': 0.9}} -> {'optimizer.momentum': 0.9}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# Rules.
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_of(choices, note: str = "") -> Rule:
    return Rule(lambda v: v in choices, f"choose one of {choices}{note}")


def _model_choices(name: str, note: str = "") -> Rule:
    """One of simclr_jax.models' ``name`` (imported when a config is checked, not when a recipe loads)."""
    def choices():
        from simclr_jax import models
        return getattr(models, name)
    return Rule(lambda v: v in choices(), lambda: f"choose one of {choices()}{note}")


def _number(holds: Callable[[Any], bool], expected: str) -> Rule:
    return Rule(lambda v: _is_number(v) and holds(v), expected)


INT = Rule(_is_int, "expected an integer")
POSITIVE_INT = Rule(lambda v: _is_int(v) and v > 0, "expected a positive integer")
NONNEG_INT = Rule(lambda v: _is_int(v) and v >= 0, "expected an integer >= 0")
POSITIVE = _number(lambda v: v > 0, "expected > 0")
NONNEG = _number(lambda v: v >= 0, "expected >= 0")
FRACTION = _number(lambda v: 0 <= v < 1, "expected in [0, 1)")
BOOL = Rule(lambda v: isinstance(v, bool), "expected True or False")
NAME = Rule(lambda v: isinstance(v, str) and bool(v), "expected a non-empty string")
OPTIONAL_NAME = Rule(lambda v: v is None or (isinstance(v, str) and bool(v)), "expected a string or None")
STEP = Rule(lambda v: _is_int(v) and v >= -1, "expected a step number, or -1 for the latest")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("momentum", "lars")
LOSS_IMPLS = ("auto", "naive", "blockwise")
AUGMENT_PLACES = ("host", "device")

# Blocks: dotted field name -> Field. A dot makes a sub-ConfigDict (config.knn.k).
DATA = {
    "dataset": Field("cifar10", NAME, "any TFDS image classification dataset, or folder:ROOT "
                     "(ROOT/<split>/<class>/*.jpg|png)"),
    "data_dir": Field(None, OPTIONAL_NAME, "the TFDS data directory; None lets TFDS resolve it (honouring "
                      "TFDS_DATA_DIR)", value_type=str, resumable=True),
    "download": Field(True, BOOL, "let TFDS download and prepare the data if it is not there yet", resumable=True),
    "train_split": Field("train", NAME, "the split that trains (every image: pretraining, distillation)"),
    "test_split": Field("test", NAME, "the split monitors and evaluations score", resumable=True),
    "cache_dataset": Field(True, BOOL, "keep the decoded images in memory (small datasets: decoded CIFAR-10 is "
                           "150 MB)", resumable=True),
    "seed": Field(0, INT, "the random initialisation, the stream of views and batches, subsets, pictures"),
}
IMAGE_SIZE = {"image_size": Field(32, POSITIVE_INT, "the side of the square crops the network sees")}
SHUFFLE = {"shuffle_buffer_size": Field(50_000, POSITIVE_INT, "training examples shuffled together")}
AUGMENTATION = {
    "color_jitter_strength": Field(0.5, _number(lambda v: v >= 0, "expected >= 0 (0.5 for CIFAR, 1.0 for "
                                                "ImageNet)"), "the colour distortion's strength"),
    "blur": Field(False, BOOL, "Gaussian blur of views (ImageNet)"),
    "augment_on": Field("host", _one_of(AUGMENT_PLACES), "where the colour distortion and blur run: 'host' (tf.data, "
                        "with the crop and flip) or 'device' (in the jitted train step, per image from keys the "
                        "batch carries; the host then only decodes, crops and flips)"),
}
# The architecture: what a checkpoint records and an evaluation restores.
ARCHITECTURE = {
    "model.depth": Field(18, _model_choices("VALID_DEPTHS"), "ResNet depth"),
    "model.width_multiplier": Field(1.0, POSITIVE, "channels x this (1/8: the smoke recipe's 8-64 channels)"),
    "model.cifar_stem": Field(True, BOOL, "3x3 stem without max-pool (32 px images); False: ImageNet's 7x7 "
                              "stem and max-pool"),
    "model.head_layers": Field(2, POSITIVE_INT, "projection-head layers: 2 in SimCLR v1, 3 in v2"),
    "model.proj_dim": Field(128, POSITIVE_INT, "the projection z's width"),
    "model.variant": Field("torchvision", _model_choices(
        "VARIANTS", " ('official': google-research/simclr's ResNet, a projection shortcut on the first block of "
        "every group)"), "'torchvision': a projection shortcut only where the shape changes; 'official': "
        "google-research/simclr's ResNet, one on the first block of every group"),
    "model.sk_ratio": Field(0.0, _number(lambda v: 0 <= v < 1, "expected in [0, 1): 0 = no selective kernels, "
                                         "0.0625 in SimCLR v2"), "selective kernels + ResNet-D (SimCLR v2: 0.0625)"),
    "model.se_ratio": Field(0.0, _number(lambda v: 0 <= v < 1, "expected in [0, 1): 0 = no squeeze-excitation"),
                            "squeeze-excitation"),
    "model.stem_pool_padding": Field("same", _model_choices("STEM_POOL_PADDINGS"), "how the ImageNet stem's max-pool "
                                     "pads: 'same' (TensorFlow's, official SimCLR's) or 'symmetric' (torchvision's)"),
}
INIT_FROM = {"init_from": Field(None, Rule(OPTIONAL_NAME.holds, "expected None or a path: a pretraining workdir, "
                                           "an official SimCLR TF2 checkpoint or a torchvision .safetensors"),
                                "start from these weights instead of random ones (encoder, head, BatchNorm "
                                "statistics; distillation: the student's): one of our pretraining workdirs, an "
                                "official SimCLR TF2 checkpoint or a torchvision ResNet state_dict (.safetensors) of "
                                "the same architecture. A resumed run ignores it",
                                value_type=str, resumable=True)}
PRETRAINING = {
    "model.remat": Field(False, BOOL, "recompute each residual block in the backward pass instead of storing its "
                         "activations: a larger batch in the same memory, for about a third more compute"),
    "dtype": Field("float32", _one_of(DTYPES, "; float16 needs loss scaling, which is not implemented: use bfloat16 "
                                      "(float32's range at half the memory, what TPUs and recent GPUs compute in)"),
                   "compute dtype; parameters and loss stay float32"),
    "batch_size": Field(512, POSITIVE_INT, "global, over all devices and processes"),
    "num_epochs": Field(1000, NONNEG, "epochs of the train split"),
    "num_train_steps": Field(-1, Rule(_is_int, "expected an integer (> 0 overrides num_epochs)"),
                             "> 0 overrides num_epochs", resumable=True),
    "temperature": Field(0.5, _number(lambda v: v > 0, "the NT-Xent temperature must be > 0 (SimCLR uses "
                                      "0.1-0.5)"), "the NT-Xent temperature"),
    "loss_impl": Field("auto", Rule(lambda v: v in LOSS_IMPLS, "choose 'auto', 'naive' or 'blockwise'"),
                       "NT-Xent: 'naive', 'blockwise' (memory-light) or 'auto'"),
    "microbatches": Field(1, Rule(lambda v: _is_int(v) and v > 0, "expected a positive integer (1 = the whole "
                                  "per-device batch at once)"),
                          "> 1: the model runs in chunks per device, all negatives kept (memory-light; BatchNorm "
                          "per chunk)"),
    # SimCLR v2's memory (MoCo's queue): a moving average of encoder and head makes
    # key projections of every batch, and the latest `size` are extra negatives.
    "memory.size": Field(0, Rule(lambda v: _is_int(v) and v >= 0, "expected an integer >= 0: the number of queued "
                                 "negatives (0 = no memory; 65536 in SimCLR v2)"),
                         "queued negatives; 0 = off, else a multiple of 2 * batch_size"),
    "memory.momentum": Field(0.999, _number(lambda v: 0 <= v < 1, "expected in [0, 1): the moving average's "
                                            "momentum (0.999 in SimCLR v2)"), "the moving average's momentum"),
}
OPTIMIZER = {  # LARS
    "optimizer.base_learning_rate": Field(1.0, POSITIVE, "the peak learning rate before scaling by the batch"),
    "optimizer.lr_scaling": Field("linear", Rule(lambda v: v in ("linear", "sqrt"),
                                                 "choose 'linear' (base*B/256) or 'sqrt' (base*sqrt(B))"),
                                  "peak = base * batch / 256 ('linear') or base * sqrt(batch) ('sqrt')"),
    "optimizer.warmup_epochs": Field(10.0, NONNEG, "linear warm-up, then cosine decay"),
    "optimizer.weight_decay": Field(1e-4, NONNEG, "on kernels (ndim > 1)"),
    "optimizer.momentum": Field(0.9, FRACTION, "heavy-ball momentum"),
    "optimizer.trust_coefficient": Field(1e-3, POSITIVE, "LARS' trust ratio coefficient"),
}
# Monitoring with labels, when the dataset has them (never used for the encoder's gradient).
MONITORS = {
    "online_probe": Field(True, BOOL, "a linear probe trained online on stop_gradient(h)"),
    "probe_learning_rate": Field(1e-3, POSITIVE, "Adam, for the probe only"),
    "knn_monitor": Field(True, BOOL, "a weighted kNN of test images against the train split", resumable=True),
    "eval_every_epochs": Field(50.0, _number(lambda v: v >= 0, "expected >= 0 (0 = only at the end)"),
                               "the monitors run this often and at the end; 0 = only at the end", resumable=True),
}
EVAL_BATCH = {"eval_batch_size": Field(512, POSITIVE_INT, "feature extraction and test scoring; a multiple of the "
                                       "device count", resumable=True)}
KNN = {  # weighted kNN, cosine on h: the train split votes for each test image
    "knn.k": Field(200, POSITIVE_INT, "neighbours that vote", resumable=True),
    "knn.temperature": Field(0.1, _number(lambda v: v > 0, "expected > 0 (peers use 0.1)"),
                             "votes weigh exp(similarity / temperature)", resumable=True),
}
# The one training loop (simclr_jax/loop.py): it checkpoints, resumes after preemption, guards non-finite steps.
LOOP = {
    "log_every_steps": Field(50, POSITIVE_INT, "metrics cadence", resumable=True),
    "checkpoint_every_steps": Field(1000, POSITIVE_INT, "checkpoint cadence", resumable=True),
    "keep_checkpoints": Field(3, POSITIVE_INT, "the newest checkpoints kept", resumable=True),
    "nonfinite_policy": Field("stop", Rule(lambda v: v in ("stop", "skip"), "choose 'stop' or 'skip'"),
                              "a non-finite loss or gradient: 'stop' (with the step and the last good checkpoint), "
                              "or 'skip' the update and go on", resumable=True),
    "profile_steps": Field(0, Rule(lambda v: _is_int(v) and v >= 0, "expected an integer >= 0 (0 = no profile; "
                                   "5 to 20 steps make a readable trace)"),
                           "0 = off; N > 0: jax.profiler traces the N steps after the run's first (compiled) step, "
                           "into workdir/plugins/profile (TensorBoard's Profile tab)", resumable=True),
}
PICTURES = {"write_pictures": Field(True, BOOL, "pretraining: workdir/augmentations.png (two views of a few "
                                    "images); kNN and cached_linear: embedding_tsne.png and retrieval.png",
                                    resumable=True)}
# An evaluation of a pretraining workdir.
EVALUATION = {
    "pretrained": Field(None, Rule(NAME.holds, "set --config.pretrained=PRETRAIN_WORKDIR (a pretraining workdir)"),
                        "a pretraining workdir (or its checkpoints/ folder), an official SimCLR checkpoint, or a "
                        "torchvision ResNet state_dict (.safetensors)",
                        value_type=str),
    "checkpoint_step": Field(-1, STEP, "-1: the latest"),
    "random_init": Field(False, BOOL, "True: the same architecture at random initialisation (the baseline)"),
    "head_layer": Field(0, NONNEG_INT, "the classifier reads this layer: 0 = h, i = output of projection-head "
                        "layer i (distillation: None = the teacher's)"),
}
LINEAR = {  # the paper's linear-evaluation optimiser: Nesterov SGD, cosine decay
    "linear.epochs": Field(100, POSITIVE_INT, "over the train split"),
    "linear.batch_size": Field(512, POSITIVE_INT, "a multiple of the device count"),
    "linear.learning_rate": Field(0.1, POSITIVE, "peak = learning_rate * batch_size / 256"),
    "linear.weight_decay": Field(0.0, NONNEG, "on the classifier's kernel"),
}
STANDARDIZE = {"linear.standardize": Field(True, BOOL, "standardise each dimension of h with fixed statistics of "
                                           "10,000 augmented training views; False: raw h, as the paper")}
FINETUNE = {
    "finetune.label_fraction": Field(0.1, _number(lambda v: 0 < v <= 1, "expected in (0, 1]: the fraction of the "
                                                  "train split's labels (the paper uses 0.01 and 0.1; 1.0 = all "
                                                  "labels)"), "the class-balanced labelled subset"),
    "finetune.subset_seed": Field(0, INT, "which examples make the subset"),
    "finetune.subset_split": Field(None, OPTIONAL_NAME, "a TFDS dataset whose train split is the subset (e.g. "
                                   "imagenet2012_subset/1pct; label_fraction is then ignored)", value_type=str),
    "finetune.epochs": Field(30.0, POSITIVE, "over the labelled subset"),
    "finetune.batch_size": Field(256, POSITIVE_INT, "a multiple of the device count"),
    "finetune.learning_rate": Field(0.05, POSITIVE, "peak = learning_rate * batch_size / 256"),
    "finetune.weight_decay": Field(0.0, NONNEG, "on kernels"),
    "finetune.schedule": Field("cosine", _one_of(SCHEDULES), "'cosine' decay or 'constant'"),
}
TEACHER = {
    "teacher": Field(None, Rule(NAME.holds, "set --config.teacher=PATH: a fine-tuned network (the finetuned/ folder "
                                "configs/finetune.py writes into its workdir) or an official fine-tuned SimCLR "
                                "checkpoint"), "a fine-tuned network: our WORKDIR/finetuned, or an official "
                     "checkpoint", value_type=str),
    "teacher_step": Field(-1, STEP, "-1: the teacher's latest checkpoint"),
    "teacher_head_layer": Field(None, NONNEG_INT.or_none(), "the layer the teacher's classifier reads; None = what "
                                "the teacher records (our fine-tuned networks' config.json), 0 for official "
                                "checkpoints: SimCLR v2's fine-tuned ones need 1", value_type=int),
}
DISTILL = {
    "distill.temperature": Field(1.0, _number(lambda v: v > 0, "the distillation temperature must be > 0 (1.0 in "
                                              "the SimCLR v2 paper)"),
                                 "tau of P(y|x; tau) = softmax(logits / tau), both networks"),
    "distill.alpha": Field(0.0, _number(lambda v: v >= 0, "expected >= 0: the supervised term's weight (0 = "
                                        "distillation alone)"),
                           "weight of the supervised term; 0 = distillation alone (labels unused)"),
    "distill.label_fraction": Field(0.1, _number(lambda v: 0 < v <= 1, "expected in (0, 1]: the labelled subset, "
                                                 "as finetune.label_fraction"),
                                    "the labelled subset when alpha > 0, as finetune.label_fraction"),
    "distill.subset_seed": Field(0, INT, "as finetune.subset_seed: the same seed draws the same subset"),
    "distill.epochs": Field(5.0, POSITIVE, "over the whole train split"),
    "distill.batch_size": Field(256, POSITIVE_INT, "a multiple of the device count"),
    "distill.optimizer": Field("momentum", _one_of(OPTIMIZERS), "'momentum' (Nesterov SGD) or 'lars' "
                               "(pretraining's LARS)"),
    "distill.learning_rate": Field(0.1, POSITIVE, "peak = learning_rate * batch_size / 256"),
    "distill.warmup_epochs": Field(0.0, NONNEG, "linear warm-up"),
    "distill.weight_decay": Field(0.0, NONNEG, "on kernels (ndim > 1), as LARS applies it"),
    "distill.schedule": Field("cosine", _one_of(SCHEDULES), "after the warm-up: 'cosine' or 'constant'"),
}


def _unset(*blocks: dict) -> dict:
    """The blocks' fields defaulting to None: filled in from a checkpoint."""
    return {name: field.unset() for block in blocks for name, field in block.items()}


def _kind(*blocks: dict) -> dict:
    fields = {}
    for block in blocks:
        if twice := fields.keys() & block.keys():
            raise TypeError(f"fields {sorted(twice)} declared twice")
        fields.update(block)
    return fields


def _protocol(name: str) -> dict:
    return {"protocol": Field(name, NAME, "the recipe kind: an evaluation protocol or distill")}


def _evaluation(name: str, *blocks: dict) -> dict:
    return _kind(_protocol(name), EVALUATION, DATA, _unset(IMAGE_SIZE, ARCHITECTURE), EVAL_BATCH, *blocks)


# Each recipe kind's fields: exactly these, no more and none missing. Pretraining has no protocol field.
KINDS = {
    "pretrain": _kind(DATA, IMAGE_SIZE, AUGMENTATION, SHUFFLE, ARCHITECTURE, INIT_FROM, PRETRAINING, OPTIMIZER,
                      MONITORS, EVAL_BATCH, KNN, LOOP, PICTURES),
    "knn": _evaluation("knn", KNN, PICTURES),
    "cached_linear": _evaluation("cached_linear", LINEAR, PICTURES),
    "linear_eval": _evaluation("linear_eval", LINEAR, STANDARDIZE, SHUFFLE, LOOP),
    "finetune": _evaluation("finetune", SHUFFLE, FINETUNE, LOOP),
    "supervised_head": _evaluation("supervised_head"),
    # The student's architecture, image size and head layer: None = from init_from, else the teacher.
    "distill": _kind(_protocol("distill"), TEACHER, INIT_FROM, DATA, SHUFFLE,
                     _unset(IMAGE_SIZE, ARCHITECTURE, {"head_layer": EVALUATION["head_layer"]}), DISTILL, EVAL_BATCH,
                     LOOP),
}


def build(kind: str) -> ml_collections.ConfigDict:
    """A ``kind``'s config, every field at its default (None ones as typed placeholders,
    so --config.FIELD=VALUE parses)."""
    config = ml_collections.ConfigDict()
    for name, field in KINDS[kind].items():
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[leaf] = placeholder(field.value_type) if field.default is None else field.default
    return config
