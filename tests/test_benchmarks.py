"""benchmarks/accelerator.py keeps working: on the CPU it runs its small mode
(tiny shapes, every part but the main.py run, which other tests cover) and
prints one JSON object with every figure it promises."""
import json
import os
import subprocess
import sys

from benchmarks import peaks
from tests.launch import ROOT


def test_accelerator_benchmark_prints_every_figure_on_a_cpu(real_data_dir):
    """One device, one model and dtype (each other pair is the same call with other
    numbers, and each compile costs seconds here), no main.py run (other tests run main.py)."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"), "--models=resnet18_cifar",
         "--dtypes=float32", "--run_steps=0", f"--data_dir={real_data_dir}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=1", TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["small"] and result["devices"] == {"kind": "cpu", "count": 1, "platform": "cpu", "processes": 1,
                                                     "peak_source": None}
    [step] = result["train_step"]
    assert (step["model"], step["dtype"], step["fits"]) == ("resnet18_cifar", "float32", True)
    assert step["images_per_sec"] > 0 and step["flops_per_step"] > 0
    assert step["mfu"] is None and step["peak_memory_bytes"] is None  # no peak FLOP/s nor allocator on a CPU
    modes = {r["augment_on"]: r for r in result["host_views"]}
    assert modes["host"]["views_per_sec"] > 0
    assert modes["device"]["views_per_sec"] > 0  # augment_on exists: the device mode is measured
    assert result["run"] is None


def test_peak_table_knows_the_accelerators_by_their_jax_names():
    assert peaks.peak_flops_per_device("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peaks.peak_flops_per_device("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peaks.peak_flops_per_device("NVIDIA A100-SXM4-80GB", "float32") == 156e12  # TF32: JAX's default
    assert peaks.peak_flops_per_device("TPU v5 lite", "bfloat16") == 197e12
    assert peaks.peak_flops_per_device("TPU v5", "bfloat16") == 459e12
    assert peaks.peak_flops_per_device("TPU v3", "bfloat16") == 61.5e12  # one JAX device per core
    assert peaks.peak_flops_per_device("cpu", "float32") is None


def _fake_device(bytes_per_image: float, limit: float):
    """A measure(batch) of a device whose step needs 1 GiB + bytes_per_image per image."""
    calls = []

    def measure(batch):
        calls.append(batch)
        peak = 2**30 + bytes_per_image * batch
        return {"per_device_batch": batch, "fits": peak <= limit, "peak_memory_bytes": peak if peak <= limit else None,
                "memory_limit_bytes": limit}
    return measure, calls


def test_the_largest_batch_search_halves_on_out_of_memory_and_doubles_while_there_is_room():
    from benchmarks import accelerator

    limit = 60 * 2**30
    measure, calls = _fake_device(300 * 2**20, limit)  # more than the float32 guess (160 MiB): halves
    result = accelerator.largest_batch(measure, "resnet50_224", "float32", limit)
    assert calls == [256, 128]
    assert result["per_device_batch"] == 128 and result["tried"] == {"128": True, "256": False}
    assert result["next_batch"] == "256 does not fit"
    measure, calls = _fake_device(20 * 2**20, limit)  # much room: doubles until twice the peak would not fit
    result = accelerator.largest_batch(measure, "resnet50_224", "bfloat16", limit)
    assert calls == [512, 1024, 2048] and result["per_device_batch"] == 2048
    assert "4096 not tried: twice this peak is above 95% of the limit" == result["next_batch"]
