"""Start-up of multi-process runs: the environment variables and their errors."""
import pytest

from simclr_jax import distributed

VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture
def env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_variables_means_one_process(env):
    assert distributed.explicit_settings() is None
    distributed.initialize()  # a no-op: nothing is joined


def test_complete_settings_are_parsed(env):
    env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    env.setenv("JAX_NUM_PROCESSES", "4")
    env.setenv("JAX_PROCESS_ID", "3")
    assert distributed.explicit_settings() == ("10.0.0.1:1234", 4, 3)


def test_one_process_needs_no_coordinator_to_join(env):
    env.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    env.setenv("JAX_NUM_PROCESSES", "1")
    env.setenv("JAX_PROCESS_ID", "0")
    distributed.initialize()  # returns without contacting localhost:1


@pytest.mark.parametrize("settings, message", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "missing JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "missing JAX_PROCESS_ID"),
    ({"JAX_PROCESS_ID": "1"}, "missing JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "0 <= JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "hostonly", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "host:port"),
])
def test_incomplete_or_bad_settings_fail_clearly(env, settings, message):
    for name, value in settings.items():
        env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize()
