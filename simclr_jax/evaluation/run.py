"""Evaluation runs from a config: build the protocol's evaluator, run it, record it.

``evaluate(config, workdir)`` restores the encoder of ``config.pretrained``
(architecture and image size from its config.json), builds the evaluator of
``config.protocol`` once, runs it, and appends the result to
``workdir/eval_results.json`` and TensorBoard; fine-tuning also writes
the network it trained to ``workdir/finetuned`` (see ``evaluate``).
``pretraining_evaluators``
builds the same kNN evaluator for pretraining's monitor, so the number a
run reports is the number the kNN recipe gives.
"""
import json
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from simclr_jax import checkpoint, config_validation, pictures, sharding, storage, writers
from simclr_jax.data import sources
from simclr_jax.evaluation import encoder as encoder_lib
from simclr_jax.evaluation.cached_linear import CachedLinearEvaluator
from simclr_jax.evaluation.classifier import ClassifierExperiment, SupervisedHeadEvaluator
from simclr_jax.evaluation.knn import KnnEvaluator
from simclr_jax.pretrained import PROBE

FINETUNED = "finetuned"  # where fine-tuning writes its network, inside the evaluation workdir


def build_evaluator(config: ml_collections.ConfigDict, model, mesh):
    """The evaluator of ``config.protocol``, built once (its compiled functions are reused)."""
    if config.protocol == "knn":
        return KnnEvaluator(model, config, mesh, config.head_layer)
    if config.protocol == "cached_linear":
        return CachedLinearEvaluator(model, config, mesh, config.head_layer)
    if config.protocol == "supervised_head":
        return SupervisedHeadEvaluator(model, config, mesh)
    return ClassifierExperiment(model, config, mesh, freeze_encoder=config.protocol == "linear_eval")


def pretraining_evaluators(config: ml_collections.ConfigDict, model, mesh) -> list:
    """The monitors pretraining runs every ``eval_every_epochs``: the kNN
    evaluator on h when ``config.knn_monitor`` is on and the data has labels."""
    if not config.knn_monitor:
        return []
    _, _, info = sources.load_split(config.dataset, config.train_split, config.data_dir, download=config.download)
    return [KnnEvaluator(model, config, mesh)] if sources.label_classes(info) else []


def append_result(workdir: str, record: dict[str, Any]) -> None:
    """Adds one record to workdir/eval_results.json (a JSON list), atomically."""
    path = storage.join(workdir, "eval_results.json")
    records = json.loads(storage.read_text(path)) if storage.exists(path) else []
    records.append(record)
    storage.write_text(path, json.dumps(records, indent=2))


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs ``config.protocol`` on ``config.pretrained`` and records the result.

    Fine-tuning also writes the network it trained (encoder, head and the
    classifier as its supervised head) to ``workdir/finetuned``, readable as
    any pretraining workdir: ``load_encoder(path)`` gives its ``logits``. It
    refuses to start if that directory exists.
    """
    mesh = sharding.make_mesh()
    config_validation.validate(config, mesh.devices.size)
    storage.check_writable_dir(workdir)
    checkpoint.refuse_run_workdir(workdir, config.protocol)
    finetuned = storage.join(workdir, FINETUNED)
    if config.protocol == "finetune" and storage.exists(finetuned):
        raise config_validation.ConfigError(
            f"{finetuned} already holds a fine-tuned network; remove it, or give this run another --workdir")
    config = encoder_lib.resolve_architecture(config)
    start = time.perf_counter()
    encoder = encoder_lib.load_encoder(config.pretrained, step=config.checkpoint_step, mesh=mesh,
                                       random_init_seed=config.seed if config.random_init else None)
    evaluator = build_evaluator(config, encoder.model, mesh)
    features = None
    if config.protocol in ("knn", "cached_linear"):
        features = evaluator.features(encoder.variables)
        result = evaluator.score(features)
    elif config.protocol == "supervised_head":
        result = evaluator.run(encoder.variables, encoder.supervised_head)
    else:
        result = evaluator.run(encoder.variables, workdir)
        if result is None:  # stopped on request; the same command resumes from the checkpoint
            return {}
    if config.protocol == "finetune":
        checkpoint.save_network(finetuned, config, evaluator.trained_variables, evaluator.trained_classifier,
                                result["train_steps"], PROBE)
        result = dict(result, finetuned=finetuned)
    record = dict(protocol=config.protocol, pretrained=config.pretrained, random_init=config.random_init,
                  dataset=config.dataset, split=config.test_split, checkpoint_step=encoder.step,
                  head_layer=config.head_layer, seconds=round(time.perf_counter() - start, 1), **result)
    logging.info("Evaluation result: %s", record)
    drawn = None
    if features is not None and config.write_pictures:  # a collective: every process takes part
        drawn = features.numpy(max_train_rows=pictures.BANK_LIMIT)  # all the retrieval grid searches
    if jax.process_index() == 0:
        append_result(workdir, record)
        writer = writers.create_writer(workdir)
        writer.write_scalars(encoder.step, {f"{config.protocol}/{k}": record[k] for k in ("top1", "top5")})
        writer.close()
        if drawn is not None:
            start = time.perf_counter()
            paths = pictures.write_evaluation_pictures(config, workdir, drawn.train_x, drawn.train_y,
                                                       drawn.test_x, drawn.test_y)
            logging.info("Wrote %s (%.1f s)", ", ".join(paths), time.perf_counter() - start)
    return record
