"""What a pretraining run tells its user: the progress line, the CPU warning
and the end-of-run summary."""
import time

import jax
from absl import logging

from simclr_jax import storage
from simclr_jax.loop import duration, eta

CPU_WARNING_HOURS = 1.0  # a CPU run estimated longer than this is told about configs/smoke.py


def progress_line(step: int, total_steps: int, batch_size: int, scalars: dict) -> str:
    """One readable line: where the run is, how fast, how long to go, how well."""
    return (f"step {step}/{total_steps} (epoch {scalars['epoch']:.2f}) | loss {scalars['loss']:.4f} | "
            f"contrastive acc {scalars['contrastive_acc']:.3f} | {scalars['images_per_sec']:.1f} images/s | "
            f"ETA {eta(step, total_steps, batch_size, scalars)}")


class CpuEstimate:
    """On a host without an accelerator, times the first steps after compilation
    and warns, with the estimated duration, when the run would take longer than
    CPU_WARNING_HOURS: the full recipes are meant for GPUs and TPUs."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int, measure_steps: int = 3):
        self.active = jax.default_backend() == "cpu"
        self.first, self.last = start_step + 1, start_step + 1 + measure_steps
        self.total_steps, self.batch_size, self.started = total_steps, batch_size, None
        if self.active:
            logging.warning("No accelerator found: JAX is training on the CPU (%d devices).", jax.device_count())

    def after_step(self, step: int, metrics) -> None:
        """Call after each step; syncs with the device only on the few steps it times."""
        if not self.active or step not in (self.first, self.last) or self.last > self.total_steps:
            return
        jax.block_until_ready(metrics)
        if step == self.first:  # the first step compiled: time the ones after it
            self.started = time.perf_counter()
            return
        seconds_per_step = (time.perf_counter() - self.started) / (self.last - self.first)
        remaining = seconds_per_step * (self.total_steps - step)
        if remaining > CPU_WARNING_HOURS * 3600:
            logging.warning(
                "At %.1f images/s on this CPU the remaining %d steps need about %s. This recipe is meant for "
                "GPUs and TPUs (README: install the matching JAX build); configs/smoke.py is the recipe for "
                "a CPU (a few minutes).", self.batch_size / seconds_per_step, self.total_steps - step,
                duration(remaining))


def summary(workdir, manager, *, step, total_steps, seconds, evaluations: dict, random_init: dict | None = None,
            next_command: str | None = None) -> str:
    """The one-screen account of where everything went; ``random_init``: the
    monitors' scores of the same network at random initialisation, beside
    the trained ones (so a user can tell whether 25% means anything);
    ``next_command``: how to evaluate the encoder (the caller knows the
    evaluation recipes)."""
    workdir = storage.resolve(workdir)
    lines = [
        f"Pretraining {'finished' if step >= total_steps else 'stopped'} at step {step}/{total_steps} "
        f"after {duration(seconds)}.",
        f"  checkpoints   {manager.directory} (steps {list(manager.all_steps())})",
        f"  metrics       {storage.join(workdir, 'metrics.jsonl')}",
        f"  TensorBoard   tensorboard --logdir={workdir}",
    ]
    pngs = [storage.join(workdir, name) for name in storage.listdir(workdir) if name.endswith(".png")]
    if pngs:
        lines.append(f"  pictures      {', '.join(pngs)}")
    for name, result in evaluations.items():
        line = f"  {name:<13} top-1 {result['top1']:.1%}, top-5 {result['top5']:.1%}"
        if name in (random_init or {}):
            line += (f" (the same network at random initialisation: {random_init[name]['top1']:.1%}, "
                     f"{random_init[name]['top5']:.1%})")
        lines.append(line)
    if next_command:
        lines.append(f"  evaluate      {next_command}")
    if step < total_steps:
        lines.append("  resume        run the same command again")
    return "\n".join(lines)
