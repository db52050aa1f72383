"""What the supervised protocols read off a SimCLR network: features at a
head layer, a supervised head's logits, and the linear classifier they train."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.simclr import SimCLR


def linear_classifier(num_classes: int) -> nn.Dense:
    """Zero-initialised, as the reference code's linear-eval and fine-tuning
    commands set (zero_init_logits_layer=True) and as its supervised head
    can be: it starts at chance and owes all it learns to the labels."""
    return nn.Dense(num_classes, kernel_init=nn.initializers.zeros)


def feature_function(model: SimCLR, head_layer: int):
    """jit(variables, images) -> features of head layer ``head_layer`` (0 = h), in inference mode."""
    if not 0 <= head_layer <= model.head_layers:
        raise ValueError(f"head_layer must be in [0, {model.head_layers}] (0 = encoder output h), got {head_layer}")
    return jax.jit(functools.partial(model.apply, train=False, head_layer=head_layer, method=SimCLR.features))


def features_at(model: SimCLR, variables, images, head_layer: int, train: bool):
    """(features at head_layer (0 = h), updated BatchNorm statistics or None)."""
    if train:
        features, updates = model.apply(variables, images, train, head_layer, method=SimCLR.features,
                                        mutable=["batch_stats"])
        return features, updates["batch_stats"]
    return model.apply(variables, images, train, head_layer, method=SimCLR.features), None


def head_logits(model: SimCLR, variables, head, images, head_layer: int) -> jax.Array:
    """A supervised head {'kernel', 'bias'} on the head_layer features of
    ``images``, BatchNorm in inference mode: how a checkpoint's own classifier
    (or a distillation teacher) scores images."""
    features, _ = features_at(model, variables, images, head_layer, train=False)
    return features.astype(jnp.float32) @ head["kernel"] + head["bias"]


def keep_unused_head_stats(new, old, head_layer: int):
    """The head computes all its layers, but those past head_layer feed nothing:
    keep their BatchNorm statistics (their parameters get zero gradients)."""
    head = {name: new["head"][name] if int(name[len("bn"):]) <= head_layer else old["head"][name]
            for name in old["head"]}
    return dict(new, head=head)
