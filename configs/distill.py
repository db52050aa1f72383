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

This recipe is sized for CIFAR-10 on a CPU demo: docs/results.md gives
its commands and numbers, and how the ImageNet runs differ.
"""
from simclr_jax import config_schema


def get_config():
    config = config_schema.build("distill")
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2
    return config
