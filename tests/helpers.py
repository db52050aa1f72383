"""What several test files share: the tiny architecture, pretraining configs
and workdirs, independent references (NT-Xent in numpy) and comparison helpers.

``tiny_workdir(path)`` writes only the config.json that evaluation reads the
architecture from: the tiny test architecture (ResNet-18 at width 1/16 with
the CIFAR stem, a 2-layer head, proj_dim 128) at 16 px. Evaluating it with
``config.random_init=True`` needs no checkpoint. ``tiny_simclr`` is that
network with proj_dim 16, built directly (no config), for train-step tests.
"""
import contextlib
import io
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import smoke
from simclr_jax import models
from simclr_jax.weights import checkpoint

IMAGE_SIZE = 16
WIDTH_MULTIPLIER = 1 / 16


# ------------------------------------------------------------------ the tiny architecture

def tiny_simclr(axis_name=None, **overrides) -> models.SimCLR:
    """SimCLR(ResNet-18 at width 1/16, CIFAR stem, 2-layer head, proj_dim 16):
    the network of the train-step tests; ``overrides`` set other fields."""
    fields = dict(depth=18, width_multiplier=WIDTH_MULTIPLIER, cifar_stem=True, proj_dim=16, axis_name=axis_name)
    return models.SimCLR(**{**fields, **overrides})


def tiny_pretrain_config(**model_overrides) -> ml_collections.ConfigDict:
    """configs/smoke.py at 16 px and width 1/16; ``model_overrides`` set model.* fields."""
    config = smoke.get_config()
    config.image_size = IMAGE_SIZE
    config.model.width_multiplier = WIDTH_MULTIPLIER
    for name, value in model_overrides.items():
        if name not in config.model:
            raise KeyError(f"no model field {name!r}")
        config.model[name] = value
    return config


def tiny_workdir(path, **model_overrides) -> str:
    """Writes ``path``/config.json of the tiny architecture; returns ``path`` as a str."""
    path = str(path)
    checkpoint.write_run_config(path, tiny_pretrain_config(**model_overrides))
    return path


def tiny_real_data_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    """The smoke recipe shrunk to seconds on real data: 16 px crops, 1/16-width
    ResNet-18, batch 16, 4 steps, small splits (the end-of-run kNN in a second)."""
    config = tiny_pretrain_config()
    config.data_dir = data_dir
    config.batch_size = 16
    config.num_train_steps = 4
    config.shuffle_buffer_size = 256
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.train_split = "train[:2000]"
    config.test_split = "test[:1000]"
    config.update(overrides)
    return config


def pretrain(config, workdir):
    """What main.py runs for a pretraining recipe: the loop with the kNN monitor."""
    from simclr_jax import protocols

    return protocols.run(config, workdir)


@contextlib.contextmanager
def absl_log():
    """absl's log (INFO and up) of the block, as a StringIO to read after it:
    a handler on absl's own logger, whose level is INFO for the block. Not
    caplog: once any test in the process has parsed absl flags (a
    pytest-xdist worker runs many files), absl's verbosity flag (default
    WARNING) sets that logger's level and caplog sees no INFO line at all."""
    logger, text = logging.getLogger("absl"), io.StringIO()
    handler, level = logging.StreamHandler(text), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield text
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ------------------------------------------------------------------ references and comparisons

def numpy_nt_xent(z1, z2, temperature, negatives=None, images=None):
    """NT-Xent as the paper writes it, in float64 loops: each of the 2N anchors
    against its positive and the 2N - 2 other views, plus the rows of
    ``negatives`` (SimCLR v2's queue) when given.

    Returns (loss, the fraction of anchors whose positive is the most similar
    candidate, the mean entropy of the softmax over the candidates), averaged
    over all anchors, or over both views of ``images`` only (indices into z1)
    when given: what one device's rows alone would report.
    """
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    z = unit(np.concatenate([z1, z2]).astype(np.float64))
    extra = unit(np.asarray(negatives, np.float64)) if negatives is not None and len(negatives) else \
        np.zeros((0, z.shape[1]))
    n = len(z1)
    losses, hits, entropies = [], [], []
    rows = range(2 * n) if images is None else [i + v * n for v in (0, 1) for i in images]
    for i in rows:
        positive = (i + n) % (2 * n)
        candidates = [k for k in range(2 * n) if k != i]
        logits = np.array([z[k] @ z[i] for k in candidates] + list(extra @ z[i])) / temperature
        log_denominator = np.log(np.sum(np.exp(logits)))
        losses.append(-(z[positive] @ z[i] / temperature - log_denominator))
        hits.append(int(np.argmax(logits)) == candidates.index(positive))
        p = np.exp(logits - log_denominator)
        entropies.append(-np.sum(p * np.log(p)))
    return np.mean(losses), np.mean(hits), np.mean(entropies)


def capture_gradient() -> optax.GradientTransformation:
    """Leaves params alone and keeps the gradient as its state: after one step
    the optimiser state is the step's gradient itself, not an update that
    rounds it against the parameters."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def relative_error(got, want) -> float:
    """max |got - want| of each leaf over that leaf's max |want|, worst leaf
    (arrays are one-leaf trees)."""
    errors = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-30)),
                          got, want)
    return max(jax.tree.leaves(errors))


def direct_chunks(views, num_devices, microbatches):
    """The chunks the chunked (GradCache) step should form, written out
    independently of chunked.py.

    Device d holds global images d*n .. d*n + n - 1, split into K groups; chunk
    k is view 1 of group k and view 2 of group k + 1 (mod K) of every device,
    normalised together. Returns (chunks [K, 2N/K, ...], and the global image
    indices of each chunk's view-1 and view-2 rows, each [K, N/K]).
    """
    n = views.shape[0] // num_devices
    m = n // microbatches
    group = lambda k: np.concatenate([d * n + np.arange(k * m, (k + 1) * m) for d in range(num_devices)])
    first = np.stack([group(k) for k in range(microbatches)])
    second = np.stack([group((k + 1) % microbatches) for k in range(microbatches)])
    return np.concatenate([views[first, 0], views[second, 1]], axis=1), first, second
