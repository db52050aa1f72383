"""SimCLR v2's third step: distil a fine-tuned teacher into a student on unlabelled images.

    python main.py --config=configs/distill.py --config.teacher=RUN/eval/finetuned \
        [--config.init_from=RUN] [--config.model.width_multiplier=0.0625] --workdir=RUN/distill

The teacher is a network fine-tuned by configs/finetune.py (its
WORKDIR/finetuned) or an official fine-tuned SimCLR checkpoint; it runs in
inference mode and never changes. The student (encoder, head up to
head_layer and a new linear classifier) learns to match the teacher's
softened class distribution, P_T(y|x; temperature), on every image of the
train split, labels unused (Chen et al. 2020b, eq. 2; temperature 1 in the
paper). With distill.alpha > 0 the student's cross-entropy on a class-balanced
label_fraction of the labels (the subset fine-tuning used, by the same
seed) joins with weight alpha.

The student's architecture is ``model.*`` where set, else that of init_from
(a pretraining workdir or official checkpoint), else the teacher's: the same
architecture is self-distillation, a smaller one (half width, fewer layers)
compression. init_from=None starts it at random. head_layer=None is the
teacher's head layer (1 for SimCLR v2's fine-tuned models). Images are crop +
flip views, as fine-tuning's, seen by teacher and student alike.

This recipe is sized for CIFAR-10 on a CPU demo: the README's Results give
its commands and numbers, and how the ImageNet runs differ.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from configs import evaluation


def get_config():
    config = ml_collections.ConfigDict()
    config.protocol = "distill"
    config.teacher = placeholder(str)  # a fine-tuned network: our WORKDIR/finetuned, or an official checkpoint
    config.teacher_step = -1  # -1: the teacher's latest checkpoint
    # The layer the teacher's classifier reads; None = what the teacher records (our fine-tuned
    # networks' config.json), 0 for official checkpoints: SimCLR v2's fine-tuned ones need 1.
    config.teacher_head_layer = placeholder(int)
    config.init_from = placeholder(str)  # the student's starting weights; None = random initialisation

    # Data: every image of train_split teaches; test_split scores.
    config.dataset = "cifar10"
    config.data_dir = placeholder(str)
    config.download = True
    config.train_split = "train"
    config.test_split = "test"
    config.cache_dataset = True
    config.shuffle_buffer_size = 50_000

    # The student: None = from init_from, else the teacher (see the docstring).
    config.image_size = placeholder(int)  # must equal the teacher's: both see the same views
    config.model = evaluation.unset_model()
    config.head_layer = placeholder(int)  # the student's classifier reads this layer; None = the teacher's

    config.distill = ml_collections.ConfigDict()
    config.distill.temperature = 1.0  # tau of P(y|x; tau) = softmax(logits / tau), both networks
    config.distill.alpha = 0.0  # weight of the supervised term; 0 = distillation alone (labels unused)
    config.distill.label_fraction = 0.1  # the labelled subset when alpha > 0, as finetune.label_fraction
    config.distill.subset_seed = 0  # as finetune.subset_seed: the same seed draws the same subset
    config.distill.epochs = 5.0  # over the whole train split
    config.distill.batch_size = 256  # a multiple of the device count
    config.distill.optimizer = "momentum"  # 'momentum' (Nesterov SGD) or 'lars' (pretraining's LARS)
    config.distill.learning_rate = 0.1  # peak = learning_rate * batch_size / 256
    config.distill.warmup_epochs = 0.0
    config.distill.weight_decay = 0.0  # on kernels (ndim > 1), as LARS applies it
    config.distill.schedule = "cosine"  # or 'constant' (after the warm-up)

    config.eval_batch_size = 512  # test scoring; a multiple of the device count
    config.seed = 0  # the student's random initialisation and the stream of views
    evaluation.add_loop_fields(config, log_every_steps=50, checkpoint_every_steps=500)
    return config
