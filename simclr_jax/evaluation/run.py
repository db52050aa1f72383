"""The evaluation protocols' driver: restore the encoder, run the protocol, record it.

``evaluate(config, workdir, run_protocol)`` restores the encoder of
``config.pretrained`` (architecture and image size from its config.json),
runs one of the ``run_*`` functions on it, and appends the result to
``workdir/eval_results.json`` and TensorBoard (with the pictures of the
features, when the protocol computed them). simclr_jax/protocols.py pairs
each protocol name with its ``run_*``.
"""
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from simclr_jax import config_validation, pictures, sharding, storage, writers
from simclr_jax import encoder as encoder_lib
from simclr_jax.data import sources
from simclr_jax.evaluation.cached_linear import CachedLinearEvaluator
from simclr_jax.evaluation.classifier import ClassifierExperiment
from simclr_jax.evaluation.knn import KnnEvaluator
from simclr_jax.evaluation.supervised_head import SupervisedHeadEvaluator
from simclr_jax.weights import checkpoint, pretrained
from simclr_jax.weights.checkpoint import PROBE

FINETUNED = "finetuned"  # where fine-tuning writes its network, inside the evaluation workdir


def _on_features(evaluator_class):
    """A protocol scoring features extracted once; it returns them for the pictures."""
    def run(config, encoder, mesh, workdir):
        evaluator = evaluator_class(encoder.model, config, mesh, config.head_layer)
        features = evaluator.features(encoder.variables)
        return evaluator.score(features), features
    return run


run_knn = _on_features(KnnEvaluator)
run_cached_linear = _on_features(CachedLinearEvaluator)


def run_supervised_head(config, encoder, mesh, workdir):
    return SupervisedHeadEvaluator(encoder.model, config, mesh).run(encoder.variables, encoder.supervised_head), None


def run_linear_eval(config, encoder, mesh, workdir):
    return ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=True).run(encoder.variables, workdir), None


def run_finetune(config, encoder, mesh, workdir):
    """Also writes the network it trained (encoder, head and the classifier as
    its supervised head) to ``workdir/finetuned``, readable as any pretraining
    workdir: ``load_encoder(path)`` gives its ``logits``."""
    experiment = ClassifierExperiment(encoder.model, config, mesh, freeze_encoder=False)
    result = experiment.run(encoder.variables, workdir)
    if result is None:  # stopped on request
        return None, None
    finetuned = storage.join(workdir, FINETUNED)
    checkpoint.save_network(finetuned, config=config, variables=experiment.trained_variables,
                            head=experiment.trained_classifier,
                            step=result["train_steps"], head_key=PROBE)
    return dict(result, finetuned=finetuned), None


def _data_flags(config) -> list[str]:
    """The flags that restate a run's data for the next recipe (an image folder
    without labels: labelled images to evaluate on)."""
    if config.dataset.startswith(sources.IMAGES_PREFIX):
        flags = ["--config.dataset=folder:LABELLED_ROOT"]
    else:
        flags = [f"--config.dataset={config.dataset} --config.test_split={config.test_split}"]
    return flags + ([f"--config.data_dir={config.data_dir}"] if config.data_dir is not None else [])


def evaluation_command(config, workdir: str) -> str:
    """The quick linear evaluation of a pretraining run (its end-of-run summary
    prints it): the architecture comes from the workdir's config.json, so only
    the data needs restating."""
    return " ".join(["python main.py --config=configs/cached_linear.py", f"--config.pretrained={workdir}",
                     *_data_flags(config), f"--workdir={workdir}/eval"])


# What follows each protocol: (why, the recipe), for ``next_command``.
NEXT = {
    "knn": ("the paper's linear evaluation", "linear_eval"),
    "cached_linear": ("the paper's linear evaluation", "linear_eval"),
    "linear_eval": ("semi-supervised fine-tuning", "finetune"),
    "finetune": ("distillation into a student", "distill"),
}


def next_command(config, workdir: str) -> str | None:
    """The line an evaluation ends with: the protocol that usually comes next,
    on the same encoder and data, into the same workdir (each protocol keeps
    its own files there); None after the last one."""
    if config.protocol not in NEXT:
        return None
    why, recipe = NEXT[config.protocol]
    source = (f"--config.teacher={storage.join(workdir, FINETUNED)}" if recipe == "distill" else
              f"--config.pretrained={config.pretrained}")
    target = storage.join(workdir, "distill") if recipe == "distill" else workdir
    return (f"Next, {why}: " + " ".join([f"python main.py --config=configs/{recipe}.py", source, *_data_flags(config),
                                          f"--workdir={target}"]))


def resolve_architecture(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The evaluation config with ``model`` and ``image_size`` filled in from
    ``config.pretrained`` (pretrained.resolve: a field the user set must agree)."""
    if config.pretrained == "random":  # the spelling before random_init existed
        raise config_validation.ConfigError(
            "config.pretrained='random' is no longer a model: set --config.pretrained=PRETRAIN_WORKDIR "
            "--config.random_init=True for that workdir's architecture at random initialisation")
    trained = pretrained.resolve(config.pretrained, config.model, field="pretrained", image_size=config.image_size,
                                 unset_ok=True)
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.image_size = int(trained.image_size)
    resolved.model = ml_collections.ConfigDict({name: trained.model[name] for name in config_validation.MODEL_FIELDS})
    config_validation.check_image_size(resolved.image_size, resolved.model.cifar_stem)
    if resolved.head_layer > resolved.model.head_layers:
        raise config_validation.ConfigError(
            f"config.head_layer={resolved.head_layer} is invalid: the checkpoint's head has "
            f"{resolved.model.head_layers} layers (0 = h)")
    return resolved


def evaluate(config: ml_collections.ConfigDict, workdir: str, run_protocol) -> dict[str, Any]:
    """Evaluates the encoder of ``config.pretrained`` with ``run_protocol``
    (one of the ``run_*`` above: (config, encoder, mesh, workdir) -> (result,
    or None if stopped on request; the features it computed, or None)) and
    records the result. Fine-tuning refuses to start if its
    ``workdir/finetuned`` exists."""
    mesh = sharding.make_mesh()
    config_validation.validate(config, mesh.devices.size)
    storage.check_writable_dir(workdir)
    checkpoint.refuse_run_workdir(workdir, config.protocol)
    finetuned = storage.join(workdir, FINETUNED)
    if config.protocol == "finetune" and storage.exists(finetuned):
        raise config_validation.ConfigError(
            f"{finetuned} already holds a fine-tuned network; remove it, or give this run another --workdir")
    config = resolve_architecture(config)
    start = time.perf_counter()
    encoder = encoder_lib.load_encoder(config.pretrained, step=config.checkpoint_step, mesh=mesh,
                                       random_init_seed=config.seed if config.random_init else None)
    result, features = run_protocol(config, encoder, mesh, workdir)
    if result is None:  # stopped on request; the same command resumes from the checkpoint
        return {}
    record = dict(protocol=config.protocol, pretrained=config.pretrained, random_init=config.random_init,
                  dataset=config.dataset, split=config.test_split, checkpoint_step=encoder.step,
                  head_layer=config.head_layer, seconds=round(time.perf_counter() - start, 1), **result)
    logging.info("Evaluation result: %s", record)
    drawn = None
    if features is not None and config.write_pictures:  # a collective: every process takes part
        drawn = features.numpy(max_train_rows=pictures.BANK_LIMIT)  # all the retrieval grid searches
    if jax.process_index() == 0:
        writers.append_result(workdir, record)
        writer = writers.create_writer(workdir)
        writer.write_scalars(encoder.step, {f"{config.protocol}/{k}": record[k] for k in ("top1", "top5")})
        writer.close()
        if drawn is not None:
            start = time.perf_counter()
            paths = pictures.write_evaluation_pictures(config, workdir, drawn.train_x, drawn.train_y,
                                                       drawn.test_x, drawn.test_y)
            logging.info("Wrote %s (%.1f s)", ", ".join(paths), time.perf_counter() - start)
        if (command := next_command(config, workdir)):
            logging.info(command)
    return record
