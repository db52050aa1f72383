"""The public API: named in simclr_jax/__init__.py, documented, and usable from
an installed copy of the package, with the repository off ``sys.path``."""
import math
import os
import shutil
import subprocess
import sys

import pytest

import simclr_jax
from tests.launch import ROOT, process_env


def test_every_public_name_loads_and_says_what_it_takes_and_returns():
    for name in simclr_jax.__all__:
        value = getattr(simclr_jax, name)
        assert (value.__doc__ or "").strip(), f"simclr_jax.{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nt_xnet'"):
        simclr_jax.nt_xnet


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip installs a copy of the source (so the build writes nothing into the
    repository): the package, its recipes and the simclr-jax command."""
    tmp = tmp_path_factory.mktemp("installed")
    source, site = tmp / "source", tmp / "site"
    for folder in ("simclr_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, folder), source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(source)], check=True, capture_output=True)
    return site


@pytest.mark.slow
def test_pip_installed_package_runs_the_training_loop_example(installed, tmp_path):
    """examples/own_training_loop.py runs on the installed copy, through the public names only."""
    example = os.path.join(ROOT, "examples", "own_training_loop.py")
    code = (f"import runpy, sys, simclr_jax; assert simclr_jax.__file__.startswith({str(installed)!r}), "
            f"simclr_jax.__file__; sys.argv = ['example', '--steps', '3']; "
            f"runpy.run_path({example!r}, run_name='__main__')")
    env = dict(process_env(1), PYTHONPATH=str(installed))
    result = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), result.stdout


@pytest.mark.slow
def test_installed_command_with_no_flags_on_a_cpu_trains_the_cpu_recipe(installed, tmp_path):
    """simclr-jax with no flags, on this accelerator-less host: before compiling,
    the default recipe's estimate and the switch to the smoke recipe (found by
    name in the installed package, the command line's override kept); then,
    with no dataset prepared, the data error as one line, nothing written."""
    env = dict(process_env(1), PYTHONPATH=str(installed), TFDS_DATA_DIR=str(tmp_path / "tfds"))
    result = subprocess.run([str(installed / "bin" / "simclr-jax"), f"--workdir={tmp_path / 'run'}",
                             "--config.batch_size=64"], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    warning = next(line for line in result.stderr.splitlines() if "No accelerator here" in line)
    assert "the default recipe (cifar10: 1000 epochs of cifar10)" in warning
    assert "Training the CPU recipe smoke instead" in warning and "--config=cifar10" in warning
    assert "batch_size: 64\nblur" in result.stderr.replace("\r", "")  # smoke's config, with the override
    assert "num_train_steps: 500" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("simclr-jax: TFDS dataset 'cifar10' is not prepared"), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    usage = subprocess.run([str(installed / "bin" / "simclr-jax"), "--help"], env=env, capture_output=True,
                           text=True, timeout=120).stdout
    assert usage.startswith("Pretrains or evaluates SimCLR") and "--config: Recipe: a bundled recipe's name" in usage
