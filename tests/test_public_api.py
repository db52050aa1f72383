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


@pytest.mark.slow
def test_pip_installed_package_runs_the_training_loop_example(tmp_path):
    """pip installs a copy of the source (so the build writes nothing into the
    repository); examples/own_training_loop.py then runs on that install."""
    source, site = tmp_path / "source", tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "simclr_jax"), source / "simclr_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(source)], check=True, capture_output=True)
    example = os.path.join(ROOT, "examples", "own_training_loop.py")
    code = (f"import runpy, sys, simclr_jax; assert simclr_jax.__file__.startswith({str(site)!r}), "
            f"simclr_jax.__file__; sys.argv = ['example', '--steps', '3']; "
            f"runpy.run_path({example!r}, run_name='__main__')")
    env = dict(process_env(1), PYTHONPATH=str(site))
    result = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), result.stdout
