"""The checkpoint's own supervised head, scored on the test split: nothing trains."""
import jax

from simclr_jax.data import sources
from simclr_jax.errors import UserError
from simclr_jax.evaluation import passes
from simclr_jax.models import SimCLR
from simclr_jax.models.classifier import head_logits


class SupervisedHeadEvaluator:
    """``run(variables, head)``: the checkpoint's own supervised head on the
    ``head_layer`` features of eval views of the test split; nothing trains.

    The released SimCLR models carry the linear-evaluation head trained beside
    pretraining (on h), fine-tuned ones their classifier (v2's on head layer
    1), our runs the online probe: this scores it as it is, as the paper's
    tables score the released heads.
    """

    def __init__(self, model: SimCLR, config, mesh):
        self.config, self.mesh, self.head_layer = config, mesh, config.head_layer
        self.num_classes = sources.num_classes(config.dataset, config.test_split, config.data_dir,
                                               download=config.download)
        self._logits = jax.jit(lambda variables, head, images: head_logits(
            model, variables, head, images, self.head_layer))

    def run(self, variables, head) -> dict:
        if head is None:
            raise UserError(f"{self.config.pretrained} has no supervised head to score: official checkpoints "
                             "saved with one (lineareval_while_pretraining, or fine-tuned) and our runs with "
                             "config.online_probe=True carry it; use configs/linear_eval.py to train one")
        classes = int(head["bias"].shape[0])
        if classes != self.num_classes:
            raise UserError(f"the supervised head has {classes} classes but {self.config.dataset} has "
                             f"{self.num_classes}: score it on the dataset it was trained for")
        return passes.split_accuracy(self.config, self.config.test_split, self.mesh,
                                     lambda images: self._logits(variables, head, images), label="supervised_head")
