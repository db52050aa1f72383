"""The progress line and the end-of-run summary say the right numbers."""
import types

import numpy as np

from configs import smoke
from simclr_jax import train


def test_duration_formats_hours_days_and_unknown():
    assert train._duration(3723) == "01:02:03"
    assert train._duration(86400 + 5) == "1d 00:00:05"
    assert train._duration(float("nan")) == "?"


def test_progress_line_has_step_epoch_rate_eta_loss_and_accuracy():
    scalars = dict(images_per_sec=256.0, epoch=1.5, loss=4.25, contrastive_acc=0.3125)
    line = train._progress_line(step=30, total_steps=90, batch_size=128, scalars=scalars)
    # 60 steps left x 128 images at 256 images/s = 30 s.
    assert line == ("step 30/90 (epoch 1.50) | loss 4.2500 | contrastive acc 0.312 | "
                    "256.0 images/s | ETA 00:00:30")


def test_summary_points_at_checkpoints_pictures_knn_and_resume(tmp_path):
    (tmp_path / "augmentations.png").write_bytes(b"")
    manager = types.SimpleNamespace(directory=str(tmp_path / "checkpoints"), all_steps=lambda: [5, 10])
    text = train._summary(smoke.get_config(), str(tmp_path), manager, step=10, total_steps=20, seconds=65.0,
                          knn={"knn_top1": np.float32(0.4375), "knn_top5": 0.875})
    assert "stopped at step 10/20 after 00:01:05" in text
    assert "steps [5, 10]" in text
    assert str(tmp_path / "augmentations.png") in text
    assert "kNN top-1     0.4375 (top-5 0.8750)" in text
    assert "resume" in text
    finished = train._summary(smoke.get_config(), str(tmp_path), manager, step=20, total_steps=20, seconds=1.0, knn={})
    assert "finished" in finished and "resume" not in finished


def test_evaluate_command_carries_the_architecture_and_data_overrides():
    config = smoke.get_config()  # ResNet-18 at 1/8 width: not linear_eval.py's default
    config.data_dir = "../shared/data/tfds"
    command = train._evaluate_command(config, "runs/smoke")
    assert command == ("python main.py --config=configs/linear_eval.py --config.pretrained=runs/smoke "
                       "--config.model.width_multiplier=0.125 --config.data_dir=../shared/data/tfds "
                       "--workdir=runs/smoke/eval")
    config.dataset = "images:/photos"
    assert "--config.dataset=folder:LABELLED_ROOT" in train._evaluate_command(config, "w")
