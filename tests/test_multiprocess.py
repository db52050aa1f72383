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


def test_two_processes_match_one_process_and_slice_the_split(real_data_dir, tmp_path):
    out = str(tmp_path)
    workers = _start(["-m", "tests.multiprocess_worker", out, real_data_dir], out)
    # While they run: the same global batches on 1 process x 4 devices (this pytest process).
    batches = multiprocess_worker.fixed_global_batches(real_data_dir)
    losses, params = multiprocess_worker.train_steps(batches, jax.devices()[:4])
    _wait(workers, out)

    # Each process read its own part of the test split: disjoint, and together all of it.
    slices = [set(np.load(os.path.join(out, f"slice_ids_{i}.npy")).tolist()) for i in range(2)]
    assert not slices[0] & slices[1]
    assert len(slices[0]) + len(slices[1]) == 10_000
    assert abs(len(slices[0]) - len(slices[1])) <= 1

    # The 2-process run against the 1-process one.
    result = np.load(os.path.join(out, "result.npz"))
    np.testing.assert_allclose(result["losses"], losses, rtol=0, atol=1e-5)
    flat = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    assert set(flat) == set(result.files) - {"losses"}
    diffs = {name: float(np.max(np.abs(result[name] - leaf))) for name, leaf in flat.items()}
    print(json.dumps({"max_abs_loss_diff": float(np.max(np.abs(result["losses"] - losses))),
                      "max_abs_param_diff": max(diffs.values())}))
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def test_sharded_knn_and_linear_classifier_over_two_processes_match_one_device(tmp_path):
    out = str(tmp_path)
    workers = _start(["-m", "tests.multiprocess_worker", "evaluation", out], out)

    # While they run, the one-device references. Gathered in passes.map_padded_batches' order:
    # per batch, process 0's rows then process 1's.
    data, gathered = multiprocess_worker.evaluation_data(), {}
    for split, (x, y) in data.items():
        b = multiprocess_worker.EVAL_BATCH
        order = np.concatenate([np.arange(len(y))[p::2][t * b:(t + 1) * b]
                                for t in range(-(-len(y) // (2 * b))) for p in range(2)])
        gathered[split] = x[order], y[order]
    (bank_x, bank_y), (query_x, query_y) = gathered["train"], gathered["test"]
    classes = multiprocess_worker.EVAL_CLASSES
    # The exact global top-k of each query, over both processes' banks, as on one device.
    want = knn.knn_scores(bank_x, bank_y, query_x, classes, query_batch_size=16)
    accuracy = knn.knn_accuracy(bank_x, bank_y, query_x, query_y, classes)
    params = cached_linear.train_classifier(bank_x, bank_y, classes, **multiprocess_worker.EVAL_LINEAR)

    _wait(workers, out)
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


def test_checkpoint_of_two_processes_resumes_in_one(real_data_dir, tmp_path):
    workdir, logs = str(tmp_path / "run"), str(tmp_path)
    _wait(_start(_main_args(workdir, real_data_dir, 4), logs), logs)
    records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    # Only process 0 writes metrics: one record per step, not two.
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    knn_two_processes = [r["knn_top1"] for r in records if "knn_top1" in r]
    assert len(knn_two_processes) == 1

    # One process with 4 devices resumes the 2-process checkpoint and trains on; meanwhile,
    # in this process, kNN of the step-4 encoder.
    os.makedirs(os.path.join(logs, "resume"))
    resume = _start(_main_args(workdir, real_data_dir, 6), os.path.join(logs, "resume"), num_processes=1,
                    devices_per_process=4)
    knn = knn_recipe.get_config()
    knn.update(pretrained=workdir, data_dir=real_data_dir, checkpoint_step=4, train_split="train[:2000]",
               test_split="test[:1001]", eval_batch_size=504, write_pictures=False)
    result = protocols.run(knn, str(tmp_path / "eval"))
    _wait(resume, os.path.join(logs, "resume"))
    records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)

    # kNN of the step-4 encoder on one process equals the 2-process run's monitor.
    assert result["num_examples"] == 1001 and result["checkpoint_step"] == 4
    knn_one_process = result["top1"]
    print(json.dumps({"knn_top1_two_processes": knn_two_processes[0], "knn_top1_one_process": knn_one_process}))
    assert knn_one_process == pytest.approx(knn_two_processes[0], abs=2e-3)


def test_killing_one_process_stops_the_other(real_data_dir, tmp_path):
    workdir, logs = str(tmp_path / "run"), str(tmp_path)
    heartbeat = 5
    processes = _start(_main_args(workdir, real_data_dir, 10_000, f"--heartbeat_timeout_s={heartbeat}"), logs)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while not (os.path.exists(metrics) and len(writers.read_jsonl(metrics)) >= 3):  # training is under way
        assert time.monotonic() < deadline and processes[0].poll() is None, "training never started"
        time.sleep(0.5)
    processes[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc = processes[0].wait(timeout=120)
    elapsed = time.monotonic() - killed
    print(json.dumps({"survivor_exit_code": rc, "seconds_to_exit": round(elapsed, 1)}))
    assert rc != 0
    assert elapsed < 3 * heartbeat + 15
    # Whatever was being saved, resume only sees complete checkpoints.
    manager = checkpoint.create_manager(workdir, save_every_steps=2, max_to_keep=3, read_only=True)
    for step in manager.all_steps():
        assert os.path.exists(os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "_CHECKPOINT_METADATA"))
    manager.close()
