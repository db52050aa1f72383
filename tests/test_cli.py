"""The command line's recipe lookup and the first run's estimate, in-process."""
import os

import pytest

from configs import imagenet_v2, smoke
from simclr_jax import cli, recipes
from simclr_jax.errors import UserError
from simclr_jax.pretraining import estimate
from tests.launch import ROOT

# torchvision's figure for ResNet-50 at 224 px: 4.09 GFLOPs, counted as multiply-adds
# (its weights table); XLA counts 2 FLOPs per multiply-add.
R50_FORWARD_MACS = 4.09e9


def test_a_recipe_name_is_the_bundled_file_and_a_file_stays_as_given():
    smoke_file = os.path.join(ROOT, "configs", "smoke.py")
    assert cli.resolve_recipe(["x", "--config=smoke", "--workdir=w"]) == ["x", f"--config={smoke_file}", "--workdir=w"]
    assert cli.resolve_recipe(["x", "--config", "smoke:arg"]) == ["x", "--config", f"{smoke_file}:arg"]
    assert cli.resolve_recipe(["x", "--config=configs/smoke.py"]) == ["x", "--config=configs/smoke.py"]
    assert cli.resolve_recipe(["x", "--workdir=w"]) == ["x", "--workdir=w"]
    with pytest.raises(UserError, match="no recipe named 'smok': pass a recipe file or one of cached_linear, "):
        cli.resolve_recipe(["x", "--config=smok"])
    with pytest.raises(UserError, match="no recipe file 'configs/smok.py'"):
        cli.resolve_recipe(["x", "--config=configs/smok.py"])


def test_recipes_built_on_recipes_load_them_by_name():
    assert recipes.load("smoke") == smoke.get_config()
    assert recipes.load("imagenet_v2") == imagenet_v2.get_config()
    assert "smoke" in recipes.names() and "__init__" not in recipes.names()


def test_forward_flops_match_resnet50s_published_count():
    config = recipes.load("imagenet")
    flops = estimate.forward_flops(config.model, 224)
    # XLA skips the multiply-adds on padding, about 3% of ResNet-50's at 224 px.
    assert 0.95 < flops / (2 * R50_FORWARD_MACS) < 1.0, flops


def test_the_estimate_scales_with_the_recipe():
    config = recipes.load("smoke")
    config.num_train_steps = 100
    cost = estimate.Estimate(flops_per_image=1e9, flops_per_second=1e10, images=None)
    assert cost.images_per_second == 10 and cost.seconds is None
    assert estimate.training_images(config, None) == 100 * 128
    config.num_train_steps = -1
    assert estimate.training_images(config, 50_000) == config.num_epochs * 50_000
    assert estimate.training_images(config, None) is None
    assert estimate.measured_flops_per_second(0.125, 32) > 1e8
