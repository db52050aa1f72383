"""The bundled recipes (configs/*.py), by name, from a checkout or an installed package.

A checkout keeps them in configs/ beside the package; pip installs the same
files as simclr_jax/configs (pyproject.toml maps the folder). Recipes built on
another recipe load it here by name, so they work from either place.
"""
import importlib.util
import os

import ml_collections

from simclr_jax.errors import UserError

_INSTALLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CHECKOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def directory() -> str:
    """Where the bundled recipes are: the installed copy, else the checkout's configs/."""
    return _INSTALLED if os.path.isdir(_INSTALLED) else _CHECKOUT


def names() -> list[str]:
    """Every bundled recipe's name, e.g. ['cached_linear', 'cifar10', ...]."""
    return sorted(name[:-3] for name in os.listdir(directory()) if name.endswith(".py") and name != "__init__.py")


def path(name: str) -> str:
    """The file of the bundled recipe ``name`` ('smoke' -> .../configs/smoke.py)."""
    if name not in names():
        raise UserError(f"no recipe named {name!r}: pass a recipe file or one of {', '.join(names())}")
    return os.path.join(directory(), f"{name}.py")


def load(name: str) -> ml_collections.ConfigDict:
    """The bundled recipe ``name``'s config: what ``--config=NAME`` gives before overrides."""
    spec = importlib.util.spec_from_file_location(f"simclr_jax_recipe_{name}", path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
