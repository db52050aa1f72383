"""Evaluation of a pretrained encoder: restore, extract features, run a protocol.

Every protocol starts from ``config.pretrained``: a pretraining workdir, its
``checkpoints`` folder, or ``'random'`` (the same architecture at random
initialisation, the baseline every result is read against). Only the
encoder's parameters and BatchNorm statistics are restored (Orbax partial
restore), onto whatever devices are present, so a checkpoint written by 8
devices evaluates on 1 and vice versa.

Results are appended to ``workdir/eval_results.json`` and written as scalars
to TensorBoard.
"""
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from simclr_jax import checkpoint, finetune, input_pipeline, models, pictures, probes, sharding, writers

RANDOM = "random"


def _checkpoints_root(pretrained: str) -> str:
    """Accepts a workdir or its checkpoints folder; returns the latter."""
    candidate = checkpoint.checkpoint_dir(pretrained)
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(pretrained) and os.path.basename(os.path.normpath(pretrained)) == "checkpoints":
        return os.path.abspath(pretrained)
    raise FileNotFoundError(
        f"no checkpoint found for config.pretrained={pretrained!r}: expected a pretraining workdir "
        f"holding checkpoints/ (written by main.py), or 'random' for the random-init baseline."
    )


def _check_architecture(pretrained: str, model_config: ml_collections.ConfigDict) -> None:
    """Compares the config's model with the one the checkpoint was trained with."""
    saved = os.path.join(os.path.dirname(_checkpoints_root(pretrained)), "config.json")
    if not os.path.exists(saved):
        return  # shapes are still checked when restoring
    with open(saved, encoding="utf-8") as f:
        trained = json.load(f).get("model", {})
    differences = [
        f"model.{key}: checkpoint {trained[key]!r}, config {model_config[key]!r}"
        for key in sorted(trained)
        if key in model_config and trained[key] != model_config[key]
    ]
    if differences:
        overrides = " ".join(f"--config.model.{key}={trained[key]}" for key in sorted(trained)
                             if key in model_config and trained[key] != model_config[key])
        raise ValueError(
            "the checkpoint was trained with a different architecture than the config ("
            + "; ".join(differences) + f"). Evaluate it with {overrides}"
        )


def encoder_variables(
    model: models.SimCLR,
    image_size: int,
    pretrained: str,
    *,
    mesh: jax.sharding.Mesh,
    step: Optional[int] = None,
    seed: int = 0,
) -> tuple[dict, int]:
    """Returns ({'params', 'batch_stats'} replicated on ``mesh``, checkpoint step).

    ``pretrained='random'`` initialises the architecture with ``seed`` (step 0).
    """
    init = lambda: model.init(
        jax.random.key(seed, impl="rbg"), jnp.zeros((1, image_size, image_size, 3)), train=False
    )
    if pretrained == RANDOM:
        variables = jax.jit(init, out_shardings=sharding.replicated(mesh))()
        return dict(variables), 0

    root = _checkpoints_root(pretrained)
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None or step < 0 else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {root}; available steps: {manager.all_steps()}"
        )
    replicated = sharding.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), dict(jax.eval_shape(init))
    )
    try:
        restored = manager.restore(
            step,
            args=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True,
            ),
        )
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"the checkpoint in {root} (step {step}) does not fit the configured architecture "
            f"({e.__class__.__name__}: {str(e)[:300]}). Set config.model to the pretraining model."
        ) from None
    finally:
        manager.close()
    return restored, step


def make_feature_fn(model: models.SimCLR, head_layer: int = 0):
    """jit(variables, images) -> features of head layer ``head_layer`` (0 = h)."""
    if not 0 <= head_layer <= model.head_layers:
        raise ValueError(f"head_layer must be in [0, {model.head_layers}] (0 = encoder output h), got {head_layer}")

    return jax.jit(
        lambda variables, images: model.apply(variables, images, False, head_layer, method=models.SimCLR.features)
    )


def extract_features(feature_fn, variables, dataset, mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one pass over ``dataset``, every process's share
    gathered (``batch_size`` is the per-process batch)."""
    return sharding.map_padded_batches(lambda images: feature_fn(variables, images), dataset, mesh, batch_size)


def split_features(config, model, variables, split: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Eval-view features of a whole split at ``config.head_layer``."""
    batch_size = sharding.per_process_batch_size(config.eval_batch_size)
    dataset = input_pipeline.eval_dataset(config, split, batch_size=batch_size)
    return extract_features(make_feature_fn(model, config.get("head_layer", 0)), variables, dataset,
                            mesh, batch_size)


def label_classes(info) -> int:
    """Number of classes of a TFDS dataset's 'label' feature; 0 if it has none."""
    label = info.features["label"] if "label" in info.features else None
    return int(getattr(label, "num_classes", 0) or 0)


def num_classes(config) -> int:
    """Classes of the dataset's labels; a clear error if it has none."""
    _, _, info = input_pipeline.load_split(config.dataset, config.train_split, config.data_dir)
    classes = label_classes(info)
    if not classes:
        raise ValueError(
            f"dataset {config.dataset!r} has no 'label' class feature, which the "
            f"{config.get('protocol', 'supervised')} protocol needs; choose a labelled dataset."
        )
    return classes


def knn_top1(config, model, variables, mesh, on_features=None) -> dict[str, float]:
    """Weighted kNN (train split as memory bank, test split as queries).
    ``on_features(train_x, train_y, test_x, test_y)`` sees the features."""
    train_x, train_y = split_features(config, model, variables, config.train_split, mesh)
    test_x, test_y = split_features(config, model, variables, config.test_split, mesh)
    if on_features:
        on_features(train_x, train_y, test_x, test_y)
    result = probes.knn_accuracy(train_x, train_y, test_x, test_y, num_classes(config),
                                 k=config.knn.k, temperature=config.knn.temperature)
    return dict(result, num_examples=len(test_y))


def cached_linear_probe(config, model, variables, mesh, on_features=None) -> dict[str, float]:
    """Linear classifier on features extracted once (no augmentation)."""
    train_x, train_y = split_features(config, model, variables, config.train_split, mesh)
    test_x, test_y = split_features(config, model, variables, config.test_split, mesh)
    if on_features:
        on_features(train_x, train_y, test_x, test_y)
    lin = config.linear
    result = probes.evaluate_linear_probe(
        train_x, train_y, test_x, test_y, num_classes(config), epochs=lin.epochs,
        batch_size=lin.batch_size, learning_rate=lin.learning_rate, weight_decay=lin.weight_decay,
        seed=config.seed,
    )
    return dict(result, num_examples=len(test_y))


def append_result(workdir: str, record: dict[str, Any]) -> None:
    """Adds one record to workdir/eval_results.json (a JSON list), atomically."""
    path = os.path.join(workdir, "eval_results.json")
    records = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    records.append(record)
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(records, f, indent=2)
    os.replace(path + ".tmp", path)


def linear_eval(config, model, variables, mesh, on_features=None) -> dict[str, float]:
    """config.linear.cached: features extracted once (fast, the default), or
    False for the paper's full protocol (augmented views through the frozen
    encoder at every step, finetune.linear_eval; no ``on_features``)."""
    if config.linear.get("cached", True):
        return cached_linear_probe(config, model, variables, mesh, on_features)
    return finetune.linear_eval(config, model, variables, mesh)


PROTOCOLS = {"knn": knn_top1, "linear_eval": linear_eval, "finetune": finetune.finetune}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs ``config.protocol`` on ``config.pretrained`` and records the result."""
    if config.protocol not in PROTOCOLS:
        raise ValueError(f"config.protocol={config.protocol!r} is unknown; choose one of {sorted(PROTOCOLS)}")
    if not config.pretrained:
        raise ValueError("set --config.pretrained=PRETRAIN_WORKDIR (or 'random' for the baseline)")
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval_batch_size, mesh)
    finetune.check_config(config, mesh)  # the training protocols' settings
    num_classes(config)  # fails early on unlabelled data
    if config.pretrained != RANDOM:
        _check_architecture(config.pretrained, config.model)

    start = time.perf_counter()
    model = models.model_from_config(config.model)
    variables, step = encoder_variables(model, config.image_size, config.pretrained, mesh=mesh,
                                        step=config.checkpoint_step, seed=config.seed)
    # Pictures (knn, cached linear_eval) reuse the protocol's features.
    features = []
    extra = ({"on_features": lambda *arrays: features.append(arrays)}
             if config.get("write_pictures", False) and config.protocol in ("knn", "linear_eval") else {})
    result = PROTOCOLS[config.protocol](config, model, variables, mesh, **extra)
    record = dict(
        protocol=config.protocol, pretrained=config.pretrained, dataset=config.dataset,
        split=config.test_split, checkpoint_step=int(step), head_layer=config.get("head_layer", 0),
        seconds=round(time.perf_counter() - start, 1), **result,
    )
    logging.info("Evaluation result: %s", record)
    if jax.process_index() == 0:
        append_result(workdir, record)
        writer = writers.create_writer(workdir)
        writer.write_scalars(int(step), {f"{config.protocol}/{k}": record[k] for k in ("top1", "top5")})
        writer.close()
        if features:
            start = time.perf_counter()
            paths = pictures.write_evaluation_pictures(config, workdir, *features[0])
            logging.info("Wrote %s (%.1f s)", ", ".join(paths), time.perf_counter() - start)
    return record
