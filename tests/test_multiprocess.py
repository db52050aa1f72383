"""Several local processes stand in for hosts (JAX distributed runtime, gloo).

Each test starts real processes with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, two simulated CPU devices each, and
compares them with one process holding all the devices.
"""
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from configs import knn as knn_recipe
from simclr_jax import protocols, writers
from simclr_jax.evaluation import cached_linear, knn
from simclr_jax.weights import checkpoint
from tests import multiprocess_worker
from tests.launch import main_args as _main_args
from tests.launch import start as _start
from tests.launch import wait as _wait

pytestmark = pytest.mark.slow


def test_two_processes_match_one_process_in_training_data_slices_and_evaluation(real_data_dir, tmp_path):
    """One launch of two worker processes: training steps, the test split's slices,
    and sharded kNN and linear classifier, each against this process."""
    out = str(tmp_path)
    workers = _start(["-m", "tests.multiprocess_worker", out, real_data_dir], out)
    # While they run: the same global batches on 1 process x 4 devices, and the evaluation's
    # one-device references.
    losses, params = multiprocess_worker.train_steps(multiprocess_worker.fixed_global_batches(real_data_dir),
                                                     jax.devices()[:4])
    evaluation = _one_device_evaluation()
    _wait(workers, out)
    _check_slices(out)
    _check_training(out, losses, params)
    _check_evaluation(out, *evaluation)


def _check_slices(out):
    """Each process read its own part of the test split: disjoint, and together all of it."""
    slices = [set(np.load(os.path.join(out, f"slice_ids_{i}.npy")).tolist()) for i in range(2)]
    assert not slices[0] & slices[1]
    assert len(slices[0]) + len(slices[1]) == 10_000
    assert abs(len(slices[0]) - len(slices[1])) <= 1


def _check_training(out, losses, params):
    result = np.load(os.path.join(out, "result.npz"))
    np.testing.assert_allclose(result["losses"], losses, rtol=0, atol=1e-5)
    flat = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    assert set(flat) == set(result.files) - {"losses"}
    diffs = {name: float(np.max(np.abs(result[name] - leaf))) for name, leaf in flat.items()}
    print(json.dumps({"max_abs_loss_diff": float(np.max(np.abs(result["losses"] - losses))),
                      "max_abs_param_diff": max(diffs.values())}))
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def _one_device_evaluation():
    """The features gathered in passes.map_padded_batches' order (per batch, process 0's
    rows then process 1's), and the exact global kNN scores, accuracy and linear
    classifier over both processes' banks, as on one device."""
    data, gathered = multiprocess_worker.evaluation_data(), {}
    for split, (x, y) in data.items():
        b = multiprocess_worker.EVAL_BATCH
        order = np.concatenate([np.arange(len(y))[p::2][t * b:(t + 1) * b]
                                for t in range(-(-len(y) // (2 * b))) for p in range(2)])
        gathered[split] = x[order], y[order]
    (bank_x, bank_y), (query_x, query_y) = gathered["train"], gathered["test"]
    classes = multiprocess_worker.EVAL_CLASSES
    scores = knn.knn_scores(bank_x, bank_y, query_x, classes, query_batch_size=16)
    accuracy = knn.knn_accuracy(bank_x, bank_y, query_x, query_y, classes)
    params = cached_linear.train_classifier(bank_x, bank_y, classes, **multiprocess_worker.EVAL_LINEAR)
    return gathered, scores, accuracy, params


def _check_evaluation(out, gathered, want, accuracy, params):
    result = np.load(os.path.join(out, "evaluation.npz"))
    for split, (x, y) in gathered.items():
        np.testing.assert_array_equal(result[f"{split}_x"], x)
        np.testing.assert_array_equal(result[f"{split}_y"], y)
    np.testing.assert_allclose(result["scores"], want, rtol=5e-6, atol=0)  # as tests/test_sharded_evaluation.py
    assert (float(result["top1"]), float(result["top5"])) == (accuracy["top1"], accuracy["top5"])
    diffs = {name: float(np.max(np.abs(result[name] - np.asarray(value)))) for name, value in params.items()}
    print(json.dumps({"max_abs_knn_score_diff": float(np.max(np.abs(result["scores"] - want))),
                      "max_abs_linear_param_diff": diffs}))
    for name, value in params.items():  # float32 sums in another order
        np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_one_process_killed_stops_the_other_and_their_checkpoint_resumes_in_one_process(real_data_dir, tmp_path):
    """Two processes train with the kNN monitor every 2 steps (2000 images / 16 = 125 steps
    per epoch), only process 0 writing metrics. One is killed: the other stops within the
    heartbeat timeout and leaves only complete checkpoints. One process with all 4 devices
    resumes the latest; kNN of a monitored step on one process equals the monitor's."""
    workdir, logs = str(tmp_path / "run"), str(tmp_path)
    heartbeat, monitor_every = 5, "--config.eval_every_epochs=0.016"
    processes = _start(_main_args(workdir, real_data_dir, 10_000, f"--heartbeat_timeout_s={heartbeat}",
                                  monitor_every), logs)
    metrics = os.path.join(workdir, "metrics.jsonl")

    def monitored():
        records = writers.read_jsonl(metrics) if os.path.exists(metrics) else []
        return [r for r in records if "knn_top1" in r]

    deadline = time.monotonic() + 300  # training and a monitored step's checkpoint are under way
    while not (monitored() and os.path.isdir(os.path.join(checkpoint.checkpoint_dir(workdir),
                                                          str(monitored()[0]["step"])))):
        assert time.monotonic() < deadline and processes[0].poll() is None, "training never got going"
        time.sleep(0.5)
    processes[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc = processes[0].wait(timeout=120)
    elapsed = time.monotonic() - killed
    print(json.dumps({"survivor_exit_code": rc, "seconds_to_exit": round(elapsed, 1)}))
    assert rc != 0
    assert elapsed < 3 * heartbeat + 15

    # Only process 0 wrote metrics: one record per step, not two.
    records = writers.read_jsonl(metrics)
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 2
    knn_step, knn_two_processes = monitored()[0]["step"], monitored()[0]["knn_top1"]
    assert knn_step == 2
    # Whatever was being saved, resume only sees complete checkpoints.
    manager = checkpoint.create_manager(workdir, save_every_steps=2, max_to_keep=3, read_only=True)
    steps = manager.all_steps()
    manager.close()
    for step in steps:
        assert os.path.exists(os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "_CHECKPOINT_METADATA"))
    assert knn_step in steps

    # One process with 4 devices resumes and trains on (no monitor: its kNN is checked below);
    # meanwhile, in this process, kNN of the monitored step's encoder.
    latest = max(steps)
    os.makedirs(os.path.join(logs, "resume"))
    resume = _start(_main_args(workdir, real_data_dir, latest + 2, "--config.knn_monitor=False"),
                    os.path.join(logs, "resume"), num_processes=1, devices_per_process=4)
    knn = knn_recipe.get_config()
    knn.update(pretrained=workdir, data_dir=real_data_dir, checkpoint_step=knn_step, train_split="train[:2000]",
               test_split="test[:1001]", eval_batch_size=504, write_pictures=False)
    result = protocols.run(knn, str(tmp_path / "eval"))
    _wait(resume, os.path.join(logs, "resume"))
    resumed = [r for r in writers.read_jsonl(metrics)[len(records):] if "loss" in r]
    assert [r["step"] for r in resumed] == [latest + 1, latest + 2]
    assert all(np.isfinite(r["loss"]) for r in resumed)

    # kNN on one process equals the 2-process run's monitor.
    assert result["num_examples"] == 1001 and result["checkpoint_step"] == knn_step
    print(json.dumps({"knn_top1_two_processes": knn_two_processes, "knn_top1_one_process": result["top1"]}))
    assert result["top1"] == pytest.approx(knn_two_processes, abs=2e-3)
