"""The ImageNet recipes end to end on TFDS's mock data: the paths only ImageNet takes.

``tfds.testing.mock_data`` serves random examples with the real features
of ``imagenet2012`` (JPEG-less random images of random sizes, 1000 classes,
'train'/'validation' splits) and of ``imagenet2012_subset/1pct`` and
``/10pct``. configs/imagenet.py and configs/imagenet_v2.py run as they are
(names, splits, stems, heads, selective kernels, the encoded-image pipeline)
except for size: 32 px, ResNet-18 at width 1/16, batch 8, one epoch of 16
images. Then the paper's linear evaluation reads v1's checkpoint and a fine-tuning
on the official 10% subset v2's, from its head's first layer. Accuracy means
nothing here; the names, label counts and code paths do.
"""
import json
import os

import pytest
import tensorflow_datasets as tfds

from configs import finetune as finetune_config
from configs import imagenet, imagenet_v2
from configs import linear_eval as linear_eval_config
from simclr_jax import protocols, writers
from simclr_jax.data import sources
from simclr_jax.weights import checkpoint
from tests.helpers import pretrain

NUM_EXAMPLES = 16  # per split of every mocked dataset
DATASETS = ("imagenet2012", "imagenet2012_subset/1pct", "imagenet2012_subset/10pct")


@pytest.fixture(scope="module")
def mock_imagenet(tmp_path_factory):
    """A TFDS data_dir where the three datasets look prepared and mock_data serves them."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for name in DATASETS:
        builder = tfds.builder(name, data_dir=data_dir)
        splits = [tfds.core.SplitInfo(name=split, shard_lengths=[NUM_EXAMPLES], num_bytes=0)
                  for split in ("train", "validation")]
        builder.info.set_splits(tfds.core.SplitDict(splits))
        os.makedirs(builder.data_dir)
        builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, data_dir=data_dir):
        yield data_dir


def _small(config, data_dir):
    config.data_dir = data_dir
    config.download = False
    config.image_size = 32
    config.model.depth = 18
    config.model.width_multiplier = 1 / 16
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_epochs = 1  # 16 images: 2 steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.write_pictures = False
    config.dtype = "float32"  # the recipe's bfloat16 is emulated, and slower, on a CPU
    return config


def _eval_results(workdir):
    with open(os.path.join(workdir, "eval_results.json")) as f:
        return json.load(f)


@pytest.mark.slow
# Each evaluation reads one recipe's checkpoint (the same code for either architecture): the paper's
# linear evaluation v1's, fine-tuning on the 10% subset v2's from its head's first layer, as the v2
# paper does. The 1% subset's labels are checked with the others' (fine-tuning reads either alike).
@pytest.mark.parametrize("recipe,protocol", [(imagenet, "linear_eval"), (imagenet_v2, "finetune")])
def test_imagenet_recipe_pretrains_monitors_and_evaluates_on_mock_data(mock_imagenet, recipe, protocol, tmp_path):
    config = _small(recipe.get_config(), mock_imagenet)
    if recipe is imagenet_v2:  # v1 runs the recipes' colour and blur on the device and the kNN monitor (the
        config.augment_on = "host"  # same code for either architecture); this run keeps the host's, and no monitor
        config.knn_monitor = False
    assert (config.dataset, config.train_split, config.test_split) == ("imagenet2012", "train", "validation")
    assert not config.cache_dataset  # images stay encoded until the views are made
    pretrain_dir = str(tmp_path / "pretrain")
    state = pretrain(config, pretrain_dir)
    assert int(state.step) == NUM_EXAMPLES // config.batch_size

    # The end-of-run kNN monitor: bank = mocked train split, queries = validation.
    knn = [r for r in writers.read_jsonl(os.path.join(pretrain_dir, "metrics.jsonl")) if "knn_top1" in r]
    if config.knn_monitor:
        assert [r["step"] for r in knn] == [int(state.step)] and 0 <= knn[0]["knn_top1"] <= 1
    assert checkpoint.read_run_config(pretrain_dir).model.head_layers == config.model.head_layers
    for name in DATASETS:  # the subsets share ImageNet's label set, as fine-tuning checks
        assert sources.num_classes(name, "train", mock_imagenet) == 1000

    eval_dir = str(tmp_path / "eval")
    data = dict(dataset="imagenet2012", data_dir=mock_imagenet, download=False, test_split="validation",
                eval_batch_size=8, cache_dataset=False, pretrained=pretrain_dir)
    if protocol == "linear_eval":
        evaluation = linear_eval_config.get_config()
        evaluation.update(**data)
        evaluation.linear.update(epochs=1, batch_size=8)
    else:
        evaluation = finetune_config.get_config()
        evaluation.update(head_layer=1, **data)
        evaluation.finetune.update(subset_split="imagenet2012_subset/10pct", epochs=1, batch_size=8)
    evaluation.shuffle_buffer_size = 16
    record = protocols.run(evaluation, eval_dir)

    assert record["protocol"] == protocol
    if protocol == "finetune":
        assert record["subset_split"] == "imagenet2012_subset/10pct" and record["head_layer"] == 1
    assert (record["dataset"], record["split"], record["num_examples"]) == ("imagenet2012", "validation", NUM_EXAMPLES)
    assert 0.0 <= record["top1"] <= record["top5"] <= 1.0
    assert _eval_results(eval_dir) == [record]
