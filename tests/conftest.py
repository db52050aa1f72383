"""Test-wide set-up: eight simulated CPU devices, quiet TensorFlow.

XLA reads XLA_FLAGS once, when JAX initialises its backends, so this must run
before any test imports jax. Tests that need one device build their mesh from
``jax.devices()[:1]``.
"""
import os

# XLA:CPU's code generator at optimisation level 1 (its default is 2): compiling is about
# half of the suite's CPU time and level 1 compiles faster; the long-running tests run a
# little slower, far less than that saves. Same arithmetic to float rounding (every
# tolerance holds). The processes tests start inherit the flag (tests/launch.py).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Bucket URLs through fsspec (gcsfs), which can be pointed at the loopback GCS
# server below; tf.io.gfile, epath's default with TensorFlow, cannot. epath
# reads this once, so before anything touches a path. Local paths are unaffected.
os.environ.setdefault("EPATH_USE_TF", "false")
# One compilation cache for the session, empty at its start (as in CI's clean clone):
# tests build the same programs again and again (each pretraining run, evaluation and
# main.py process jits its own functions), and XLA then reads the executable instead
# of compiling it anew. The processes tests start inherit it (their own device counts
# make their own entries). What runs is the same program either way. Every program is
# cached, however quickly it compiles: the many small ones (eager slices, reductions)
# add up (test_classifier + test_evaluate: 173 s with a 0.5 s floor, 153 s without).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="simclr_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)

import collections
import pathlib
import subprocess
import sys
import tarfile
import time
import urllib.request
import warnings

import pytest

REAL_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"
OFFICIAL_FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_simclr_tf2"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-data or end-to-end tests (CI runs them)")


def pytest_itemcollected(item):
    """Tests that share an expensive fixture run in one worker (pytest.ini: --dist
    loadgroup), which then builds it once: those of the session's tiny pretraining run
    together, and a module's tests that use a module-scoped fixture. pytest-xdist hands
    every other test out on its own."""
    fixtures = getattr(item, "_fixtureinfo", None)
    if fixtures is None:
        return
    if "tiny_pretraining" in fixtures.names_closure:
        item.add_marker(pytest.mark.xdist_group("tiny_pretraining"))
    elif any(defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values()):
        item.add_marker(pytest.mark.xdist_group(item.path.stem))


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """The long work first: end-to-end (``slow``) tests and the groups above, those of
    the files with the most end-to-end tests leading; the quick tests last, where they
    fill the gaps while the other worker ends its last long one. pytest-xdist hands
    the work out in this order (pytest.ini: --no-loadscope-reorder)."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    long = lambda item: item.get_closest_marker("slow") or item.get_closest_marker("xdist_group")
    items.sort(key=lambda item: (not long(item), -slow[item.path]))  # stable
    yield
    # In a worker, pytest-xdist has now named each test's group in its id; a group left
    # unnamed is handed out test by test, and the suite takes minutes longer.
    if getattr(config.option, "loadgroup", False):
        lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            warnings.warn(pytest.PytestConfigWarning(
                f"pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more tests): install the pytest "
                "version requirements.txt names"))


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


@pytest.fixture(scope="session")
def gcs_bucket():
    """``gs://simclr-test``, served by a GCS API server on loopback
    (tests/gcs_server.py, in memory) for this session; the server's
    address is set for gcsfs (epath's bucket backend here) and tensorstore
    (Orbax's array store), in this process and the processes it starts."""
    from tests.launch import free_port

    port, bucket = free_port(), "simclr-test"
    server = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).parent / "gcs_server.py"), str(port), bucket],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the GCS emulator did not start on {url}")
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                             "GOOGLE_CLOUD_PROJECT")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_CLOUD_PROJECT="test")
    yield f"gs://{bucket}"
    server.kill()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def official_files(tmp_path_factory):
    """{(model, format): path} of the files the official SimCLR TF2 code wrote
    (../shared/fixtures/official_simclr_tf2), unpacked once per session.
    Skipped when absent on a developer machine, a failure in CI."""
    if not OFFICIAL_FIXTURES.is_dir():
        message = f"official SimCLR fixtures not found under {OFFICIAL_FIXTURES}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("official")
    paths = {}
    for name in ("r18_cifar", "r50_1x_sk1"):
        for archive in sorted((OFFICIAL_FIXTURES / name).glob("*.tar.gz")):
            with tarfile.open(archive) as tar:
                tar.extractall(root / name, filter="data")
        paths[name, "saved_model"] = str(root / name / "saved_model" / "1")
    paths["r18_cifar", "checkpoint_dir"] = str(root / "r18_cifar" / "checkpoint")
    paths["r18_cifar", "ckpt_prefix"] = str(root / "r18_cifar" / "checkpoint" / "ckpt-1")
    return paths


@pytest.fixture(scope="session")
def tiny_pretraining(real_data_dir, tmp_path_factory):
    """One tiny pretraining run on the real CIFAR-10 copy for the whole session:
    tests/helpers.py's tiny_real_data_config (4 steps, batch 16, checkpoints at
    steps 2 and 4, the online probe every step and the kNN monitor at the end,
    the augmentations picture), as main.py runs it.

    Returns (workdir, config, the final state on the host). Tests only read
    the workdir; one that trains on copies it first (shutil.copytree). Its
    log is ``tiny_pretraining_log``.
    """
    import jax

    from tests.helpers import absl_log, pretrain, tiny_real_data_config

    workdir = str(tmp_path_factory.mktemp("tiny_pretraining"))
    config = tiny_real_data_config(real_data_dir)
    with absl_log() as log:
        state = jax.device_get(pretrain(config, workdir))
    (tmp_path_factory.getbasetemp() / "tiny_pretraining.log").write_text(log.getvalue())
    return workdir, config, state


@pytest.fixture(scope="session")
def tiny_pretraining_log(tiny_pretraining, tmp_path_factory):
    """What the session's tiny pretraining run logged (absl, INFO and up), as a user sees it."""
    return (tmp_path_factory.getbasetemp() / "tiny_pretraining.log").read_text()
