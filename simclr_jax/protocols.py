"""Every protocol by name, and the one dispatch: ``run(config, workdir)``.

A recipe's kind (config_validation.recipe_kind: 'pretrain', or the
``protocol`` it names) picks its entry here; each entry takes the validated
recipe and a workdir. main.py calls ``run``; so can user code and tests.
"""
import functools
from typing import Any, Callable

import ml_collections

from simclr_jax import config_validation
from simclr_jax.distillation.experiment import distill
from simclr_jax.evaluation import knn
from simclr_jax.evaluation import run as evaluation
from simclr_jax.pretraining.train import train_and_evaluate


def _evaluation(run_protocol: Callable) -> Callable:
    return functools.partial(evaluation.evaluate, run_protocol=run_protocol)


PROTOCOLS: dict[str, Callable[[ml_collections.ConfigDict, str], Any]] = {
    # Pretraining with its kNN monitor (the number it reports is the kNN recipe's), its
    # summary naming the evaluation to run next.
    "pretrain": functools.partial(train_and_evaluate, make_evaluators=knn.monitors,
                                  evaluation_command=evaluation.evaluation_command),
    "knn": _evaluation(evaluation.run_knn),
    "cached_linear": _evaluation(evaluation.run_cached_linear),
    "linear_eval": _evaluation(evaluation.run_linear_eval),
    "finetune": _evaluation(evaluation.run_finetune),
    "supervised_head": _evaluation(evaluation.run_supervised_head),
    "distill": distill,
}


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Runs the recipe's protocol into ``workdir``: pretraining returns its
    final state, evaluation and distillation their record ({} when stopped on
    request: the same command resumes)."""
    return PROTOCOLS[config_validation.recipe_kind(config)](config, workdir)
