"""Starting main.py (or a worker) as real processes, one or several, for tests."""
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(devices: int, process_id=None, num_processes=None, port=None) -> dict:
    """This process's environment (its XLA flags included) with ``devices`` simulated CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    if num_processes:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(process_id))
    return env


def start(args, log_dir, num_processes=2, devices_per_process=2, cwd=ROOT) -> list[subprocess.Popen]:
    """Starts ``python args...`` once per process in ``cwd``, logs in log_dir/process_<i>.log."""
    port = free_port()
    processes = []
    for index in range(num_processes):
        log = open(os.path.join(log_dir, f"process_{index}.log"), "w")
        env = process_env(devices_per_process, index, num_processes if num_processes > 1 else None, port)
        processes.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    return processes


def wait(processes, log_dir, timeout=600) -> None:
    for index, process in enumerate(processes):
        rc = process.wait(timeout=timeout)
        if rc != 0:
            with open(os.path.join(log_dir, f"process_{index}.log")) as f:
                tail = f.read()[-3000:]
            pytest.fail(f"process {index} exited with {rc}:\n{tail}")


MAIN = os.path.join(ROOT, "main.py")


def recipe(name: str) -> str:
    """The --config flag of configs/NAME.py, by absolute path (any working directory)."""
    return f"--config={os.path.join(ROOT, 'configs', name + '.py')}"


def main_args(workdir, data_dir, steps, *extra) -> list[str]:
    """main.py on the smoke recipe shrunk to seconds (as tests/test_pretrain.py).

    ``extra`` flags come last, so they override these (the last value wins).
    """
    return [MAIN, recipe("smoke"), f"--workdir={workdir}", f"--config.data_dir={data_dir}",
            "--config.image_size=16", "--config.model.width_multiplier=0.0625", "--config.batch_size=16",
            f"--config.num_train_steps={steps}", "--config.shuffle_buffer_size=256",
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
            # An odd test split and per-process eval batches of 250: the two processes
            # hold 501 and 500 queries, so 3 and 2 batches (uneven evaluation slices).
            "--config.train_split=train[:2000]", "--config.test_split=test[:1001]",
            "--config.eval_batch_size=500", *extra]


