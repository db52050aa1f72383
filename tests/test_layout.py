"""Imports point down: each module of simclr_jax sits on a layer, and imports
only from lower layers or from its own package (docs/design.md, "Layout").

A protocol (pretraining, an evaluation protocol, distillation) is never
imported to reach a helper: the helpers live below all of them, and only
simclr_jax/protocols.py (the one dispatch) and the export CLI sit above.
Read from the source files (every import, function-level ones included),
so nothing is imported here.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "simclr_jax"

# The most specific prefix names a module's layer.
LAYERS = {
    "errors": 0, "numerics": 0, "optim": 0, "updates": 0, "preemption": 0, "sharding": 0, "models": 0,
    "storage": 1, "distributed": 1, "config_schema": 1, "recipes": 1,
    "config_validation": 2, "writers": 2, "lock": 2, "data": 2,
    "weights": 3, "pictures": 3,
    "loop": 4, "encoder": 4, "evaluation.metrics": 4, "evaluation.passes": 4, "evaluation.features": 4,
    "pretraining": 5, "evaluation": 5, "distillation": 5,
    "protocols": 6, "export": 6, "cli": 7,
}
PROTOCOL_PACKAGES = ("pretraining", "evaluation", "distillation")


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:  # the package root only re-exports the user API lazily
            names.append(".".join(parts))
    return names


def _layer(name: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return LAYERS[prefix]
    raise KeyError(name)


def _imports(name: str) -> set[str]:
    """The simclr_jax modules ``name`` imports (relative to the package; a
    ``from X import y`` counts y when y is a module, else X)."""
    path = PACKAGE.joinpath(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "simclr_jax":
            base = node.module.removeprefix("simclr_jax").lstrip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}".lstrip(".")
                is_module = PACKAGE.joinpath(*full.split(".")).with_suffix(".py").exists() or \
                    PACKAGE.joinpath(*full.split(".")).is_dir()
                found.add(full if is_module else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("simclr_jax").lstrip(".") for a in node.names
                      if a.name.split(".")[0] == "simclr_jax"}
    return {module for module in found if module and module != name}


def _package(name: str) -> str:
    return name.split(".")[0]


def wrong_way_imports() -> list[str]:
    wrong = []
    for name in _module_names():
        for target in sorted(_imports(name)):
            same_package = _package(target) == _package(name)
            if not (_layer(target) < _layer(name) or (same_package and _layer(target) <= _layer(name))):
                wrong.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    return wrong


def test_every_module_has_a_layer():
    for name in _module_names():
        _layer(name)  # a KeyError names a module missing from LAYERS


def test_imports_point_down():
    assert wrong_way_imports() == []


@pytest.mark.parametrize("importer,target", [
    ("distillation.step", "evaluation.classifier"),  # a model helper reached through a protocol
    ("weights.pretrained", "pretraining.step"),  # a checkpoint key reached through the train step
    ("sharding", "data.input_pipeline"),  # the low level reading evaluation datasets
    ("pretraining.train", "evaluation.knn"),  # one protocol importing another
])
def test_the_check_catches_a_wrong_way_import(monkeypatch, importer, target):
    real = _imports
    monkeypatch.setitem(globals(), "_imports", lambda name: real(name) | ({target} if name == importer else set()))
    assert any(line.startswith(f"{importer} ") and line.endswith(f"imports {target} (layer {_layer(target)})")
               for line in wrong_way_imports())


def test_only_the_dispatch_imports_the_protocol_drivers():
    drivers = {"pretraining.train", "evaluation.run", "distillation.experiment"}
    importers = {name for name in _module_names() if _imports(name) & drivers}
    assert importers == {"protocols"}
