"""The progress line, the CPU warning and the end-of-run summary say the right numbers."""
import types

import numpy as np

from configs import knn as knn_recipe
from configs import smoke
from simclr_jax.evaluation import run as evaluation
from simclr_jax.pretraining import progress


def test_duration_formats_hours_days_and_unknown():
    assert progress.duration(3723) == "01:02:03"
    assert progress.duration(86400 + 5) == "1d 00:00:05"
    assert progress.duration(float("nan")) == "?"


def test_progress_line_has_step_epoch_rate_eta_loss_and_accuracy():
    scalars = dict(images_per_sec=256.0, epoch=1.5, loss=4.25, contrastive_acc=0.3125)
    line = progress.progress_line(step=30, total_steps=90, batch_size=128, scalars=scalars)
    # 60 steps left x 128 images at 256 images/s = 30 s.
    assert line == ("step 30/90 (epoch 1.50) | loss 4.2500 | contrastive acc 0.312 | "
                    "256.0 images/s | ETA 00:00:30")


def test_summary_points_at_checkpoints_pictures_knn_and_resume(tmp_path):
    (tmp_path / "augmentations.png").write_bytes(b"")
    manager = types.SimpleNamespace(directory=str(tmp_path / "checkpoints"), all_steps=lambda: [5, 10])
    text = progress.summary(str(tmp_path), manager, step=10, total_steps=20, seconds=65.0,
                            evaluations={"knn": {"top1": np.float32(0.4375), "top5": 0.875}},
                            random_init={"knn": {"top1": 0.184, "top5": 0.6}},
                            next_command="python main.py --config=configs/cached_linear.py ...")
    assert "stopped at step 10/20 after 00:01:05" in text
    assert "steps [5, 10]" in text
    assert str(tmp_path / "augmentations.png") in text
    assert "knn           top-1 43.8%, top-5 87.5% (the same network at random initialisation: 18.4%, 60.0%)" in text
    assert "resume" in text
    assert "evaluate      python main.py --config=configs/cached_linear.py ..." in text
    finished = progress.summary(str(tmp_path), manager, step=20, total_steps=20, seconds=1.0, evaluations={})
    assert "finished" in finished and "resume" not in finished and "evaluate" not in finished


def test_evaluate_command_needs_no_architecture_flags():
    config = smoke.get_config()  # ResNet-18 at 1/8 width: config.json says so, the command need not
    config.data_dir = "../shared/data/tfds"
    command = evaluation.evaluation_command(config, "runs/smoke")
    assert command == ("python main.py --config=configs/cached_linear.py --config.pretrained=runs/smoke "
                       "--config.dataset=cifar10 --config.test_split=test --config.data_dir=../shared/data/tfds "
                       "--workdir=runs/smoke/eval")
    config.dataset = "images:/photos"
    assert "--config.dataset=folder:LABELLED_ROOT" in evaluation.evaluation_command(config, "w")


def test_each_evaluation_names_the_protocol_that_comes_next():
    config = knn_recipe.get_config()
    config.update(pretrained="runs/smoke", data_dir="data")
    data = "--config.dataset=cifar10 --config.test_split=test --config.data_dir=data"
    assert evaluation.next_command(config, "runs/smoke/eval") == (
        "Next, the paper's linear evaluation: python main.py --config=configs/linear_eval.py "
        f"--config.pretrained=runs/smoke {data} --workdir=runs/smoke/eval")
    config.protocol = "linear_eval"
    assert "fine-tuning: python main.py --config=configs/finetune.py --config.pretrained=runs/smoke" in \
        evaluation.next_command(config, "w")
    config.protocol = "finetune"  # the teacher is the network fine-tuning wrote into its workdir
    assert evaluation.next_command(config, "runs/smoke/eval") == (
        "Next, distillation into a student: python main.py --config=configs/distill.py "
        f"--config.teacher=runs/smoke/eval/finetuned {data} --workdir=runs/smoke/eval/distill")
    config.protocol = "supervised_head"
    assert evaluation.next_command(config, "w") is None


def test_cpu_run_longer_than_an_hour_warns_with_the_estimate_and_the_smoke_recipe(monkeypatch, caplog):
    clock = iter([100.0, 160.0])  # steps 2..4 take 60 s: 20 s a step
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    estimate = progress.CpuEstimate(start_step=0, total_steps=1000, batch_size=512)
    assert estimate.active  # the tests run on the CPU
    for step in range(1, 6):
        estimate.after_step(step, {})
    # 996 steps left at 20 s: 05:32:00.
    warning = [r.getMessage() for r in caplog.records if "configs/smoke.py" in r.getMessage()]
    assert len(warning) == 1 and "about 05:32:00" in warning[0] and "25.6 images/s" in warning[0]


def test_short_cpu_run_does_not_warn(monkeypatch, caplog):
    clock = iter([100.0, 101.5])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    estimate = progress.CpuEstimate(start_step=0, total_steps=500, batch_size=128)
    for step in range(1, 6):
        estimate.after_step(step, {})
    assert not [r for r in caplog.records if "configs/smoke.py" in r.getMessage()]
