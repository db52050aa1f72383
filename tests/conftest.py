"""Test-wide set-up: eight simulated CPU devices, quiet TensorFlow.

XLA reads XLA_FLAGS once, when JAX initialises its backends, so this must run
before any test imports jax. Tests that need one device build their mesh from
``jax.devices()[:1]``.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest

REAL_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-data or end-to-end tests (CI runs them)")


@pytest.fixture(scope="session")
def real_data_dir():
    """The real CIFAR-10 copy in ../shared/data/tfds.

    Skipped when absent on a developer machine; in CI (CI=true) its absence is
    a failure, so a real-data test can never pass by not running.
    """
    if not (REAL_DATA_DIR / "cifar10").is_dir():
        message = f"real CIFAR-10 not found under {REAL_DATA_DIR}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(REAL_DATA_DIR)
