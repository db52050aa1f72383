"""The training loop of every long-running protocol.

An experiment supplies what differs between protocols (the shape of DeepMind
BYOL's ``main_loop``): its fresh state, its device batches from any step, the
step, the scalars and the log line of an interval. The loop owns what every
long run needs:

- resume from the workdir's latest checkpoint, at the exact position of the
  input stream (the experiment's ``batches(start_step)``);
- SIGTERM or Ctrl-C: save after the current step and stop (``preemption``);
- the non-finite guard: a step whose loss or gradient is not finite applies
  no update (``updates.apply_if_finite`` in the step), and the loop stops or skips as
  ``nonfinite_policy`` says, before a checkpoint could follow it;
- metrics every ``log_every_steps`` (the only host sync) to the writer and,
  as one progress line (the experiment's ``describe``, then the input wait),
  to the log, with the interval's images/s and its ``input_wait`` (``InputWait``);
  checkpoints every ``checkpoint_every_steps`` and at the end;
- a profile of ``profile_steps`` steps after the first one (``Profile``).
"""
import contextlib
import dataclasses
import errno
import json
import queue
import shutil
import tempfile
import threading
import time
from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from simclr_jax import config_validation, preemption, storage
from simclr_jax.errors import StorageError
from simclr_jax.weights import checkpoint

INPUT_WAIT_WARNING = 0.10  # an accelerator idle this share of the time for input ...
INPUT_WAIT_INTERVALS = 3  # ... in this many logging intervals in a row (the first apart) warns, once


class Experiment(Protocol):
    name: str  # for log lines
    total_steps: int
    batch_size: int  # global images per step

    def initial_state(self) -> Any:
        """The state at step 0 (also the shape and placement a resume restores into)."""

    def batches(self, start_step: int) -> Iterator[Any]:
        """Device batches from step ``start_step + 1`` on, as an uninterrupted run sees them."""

    def step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        """One update; metrics stay on device and include 'nonfinite' (0 or 1)."""

    def scalars(self, step: int) -> dict[str, float]:
        """Scalars known on the host at ``step`` (learning rate, epoch), logged with the metrics."""

    def describe(self, step: int, scalars: dict[str, float]) -> str:
        """The log line of an interval ending at ``step`` (the loop appends its input wait)."""

    def monitor(self, state: Any, step: int, manager, writer) -> bool:
        """Periodic evaluation after ``step`` (its checkpoint, if any, is being
        saved by ``manager``: wait for it first, so that a failing evaluation
        never costs training). True if it ran (kept out of images/s)."""


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often a run logs and saves, how many checkpoints it keeps, what a
    non-finite step does, how many steps it profiles: the same config fields
    in every long protocol."""
    log_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    nonfinite_policy: str  # 'stop' | 'skip'
    profile_steps: int = 0

    @classmethod
    def from_config(cls, config) -> "Cadence":
        return cls(config.log_every_steps, config.checkpoint_every_steps, config.keep_checkpoints,
                   config.nonfinite_policy, config.profile_steps)


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a run starts: ``step`` (None: afresh) and the settings changed
    since its last start, {field: (then, now)}."""
    step: Any
    changes: dict


def check_resume(run_dir: str, config) -> Resume:
    """Before anything is written: the run in ``run_dir`` this config would
    resume, refusing (ConfigError) a config that changes what it trains."""
    step = checkpoint.latest_step(run_dir)
    saved = checkpoint.saved_config(run_dir) if step is not None else None
    return Resume(step, config_validation.resume_changes(saved, config) if saved else {})


def record_start(run_dir: str, config, resume: Resume) -> None:
    """``run_dir``/config.json (what evaluation and the next resume read), and
    the settings a resume changed, logged and appended to resumes.jsonl."""
    if jax.process_index() != 0:
        return
    if resume.changes:
        logging.warning("Resuming at step %d with changed settings: %s", resume.step,
                        ", ".join(f"{f} {a!r} -> {b!r}" for f, (a, b) in resume.changes.items()))
        record = storage.Appender(storage.join(run_dir, "resumes.jsonl"))
        record.write(json.dumps({"step": resume.step, "changed": {f: list(v) for f, v in resume.changes.items()}})
                     + "\n")
        record.close()
    checkpoint.write_run_config(run_dir, config)


def run(experiment: Experiment, workdir: str, cadence: Cadence, writer) -> Any:
    """Trains ``experiment`` to its ``total_steps`` in ``workdir``, resuming
    from its latest checkpoint, writing metrics to ``writer`` (the caller's,
    which it leaves open); returns the state, whose ``step`` is below
    ``total_steps`` when a stop request ended the run early."""
    manager = checkpoint.create_manager(workdir, save_every_steps=cadence.checkpoint_every_steps,
                                        max_to_keep=cadence.keep_checkpoints)
    state = experiment.initial_state()
    if manager.latest_step() is not None:
        state = checkpoint.restore(manager, state)
        logging.info("%s: resumed from step %d in %s", experiment.name, int(state.step), manager.directory)
    start_step, total = int(state.step), experiment.total_steps
    guard = NonfiniteGuard(cadence.nonfinite_policy, manager)
    batches = experiment.batches(start_step)
    history, interval_start = [], time.perf_counter()
    with (_disk_full_named(workdir), preemption.StopRequest() as stop_request,
          Profile(workdir, cadence.profile_steps, start_step, total) as profile,
          InputWait(experiment.name) as input_wait):
        for step in range(start_step + 1, total + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = experiment.step(state, input_wait.next_batch(batches))
            input_wait.dispatched(metrics)
            history.append(metrics)
            profile.after_step(step, metrics)
            stopping = stop_request.stop_now(step)
            save_due = step % cadence.checkpoint_every_steps == 0 or step == total or stopping
            # Metrics reach the host every log_every_steps, and before every save, so
            # a non-finite step is caught before a checkpoint could follow it.
            if step % cadence.log_every_steps == 0 or save_due:
                scalars = guard.check(fetch(history), step)
                seconds = time.perf_counter() - interval_start
                scalars.update(experiment.scalars(step), images_per_sec=len(history) * experiment.batch_size /
                               seconds, input_wait=input_wait.interval(seconds))
                writer.write_scalars(step, scalars)
                logging.info(f"{experiment.describe(step, scalars)} | input wait {scalars['input_wait']:.0%}")
                history, interval_start = [], time.perf_counter()
            if save_due:
                checkpoint.save(manager, step, state, force=True)
            if not stopping and experiment.monitor(state, step, manager, writer):
                interval_start = time.perf_counter()
                input_wait.restart()
            if stopping:
                logging.warning("%s: stopped at step %d of %d on request; checkpoint saved in %s. Run the same "
                                "command to resume.", experiment.name, step, total, manager.directory)
                break
        manager.wait_until_finished()
    manager.close()
    writer.flush()
    if guard.skipped:
        logging.warning("%s: %d non-finite updates were skipped in all.", experiment.name, guard.skipped)
    return state


class InputWait:
    """The share of each logging interval's wall time the accelerator spent
    waiting for the next batch, measured without a device sync in the hot
    path. The loop times each ``next(batches)``; a watcher thread blocks, off
    the hot path, on each step's outputs and notes when the device finished
    them. Only the part of a wait after the device finished every step given
    to it counts: a loop that runs ahead of a slow step (dispatch is
    asynchronous) waits for the input too, but the accelerator is busy with
    the steps queued then, and nothing is lost. A share above
    INPUT_WAIT_WARNING in INPUT_WAIT_INTERVALS intervals in a row, the run's
    first apart (it starts the pipeline and compiles the step), logs one
    warning saying what to try. A context: leaving it stops the watcher."""

    def __init__(self, name: str):
        self.name, self.waited, self.shares, self.warned = name, 0.0, [], False
        self._given, self._finished = 0, (0, 0.0)  # steps dispatched; (steps finished, when the last was seen)
        self._watch = queue.SimpleQueue()
        self._watcher = threading.Thread(target=self._watch_steps, name="input-wait", daemon=True)
        self._watcher.start()

    def __enter__(self) -> "InputWait":
        return self

    def __exit__(self, *exc_info) -> None:
        self._watch.put(None)

    def next_batch(self, batches: Iterator[Any]) -> Any:
        """``next(batches)``, adding the time the device sat idle meanwhile to the interval's wait."""
        start = time.perf_counter()
        batch = next(batches)
        end = time.perf_counter()
        finished, when = self._finished
        if finished >= self._given:  # the device ran out of work during this wait
            self.waited += end - max(start, when)
        return batch

    def dispatched(self, outputs: Any) -> None:
        """Call with each step's outputs (its metrics) once the step is dispatched."""
        self._given += 1
        self._watch.put((self._given, outputs))

    def _watch_steps(self) -> None:
        while (item := self._watch.get()) is not None:
            number, outputs = item
            try:
                jax.block_until_ready(outputs)
            except Exception:  # a failed step: the loop meets the error itself
                pass
            self._finished = (number, time.perf_counter())

    def restart(self) -> None:
        """An interval starts afresh (after a monitor's evaluation, which stays out of it)."""
        self.waited = 0.0

    def interval(self, seconds: float) -> float:
        """The share of an interval of ``seconds`` the accelerator waited for input; warns once when sustained."""
        share, self.waited = min(self.waited / seconds, 1.0) if seconds > 0 else 0.0, 0.0
        self.shares.append(share)
        recent = self.shares[1:][-INPUT_WAIT_INTERVALS:]
        if not self.warned and len(recent) == INPUT_WAIT_INTERVALS and min(recent) > INPUT_WAIT_WARNING:
            self.warned = True
            logging.warning(
                "%s: the accelerator waited for the next batch %s of the time in the last %d logging intervals: "
                "the input pipeline, not the accelerator, sets the pace. To try: more host CPU threads per "
                "accelerator (tf.data uses every core it sees), --config.augment_on=device (augment on the "
                "accelerator), --config.cache_dataset=True where the decoded images fit in memory, or a smaller "
                "image pipeline (a smaller image_size, blur=False).", self.name,
                ", ".join(f"{s:.0%}" for s in recent), INPUT_WAIT_INTERVALS)
        return share


class Profile:
    """jax.profiler's trace of ``steps`` steps, those after a run's first
    (which compiles, and stays out), from process 0 (as the Flax examples'
    clu ``periodic_actions.Profile``), into ``workdir``/plugins/profile/<time>/,
    where TensorBoard's Profile tab (tensorboard-plugin-profile) finds it.
    jax.profiler writes through its own file system, not ``storage``, so a
    bucket workdir gets a local trace copied in. A context: leaving it ends
    a trace the run did not reach the end of."""

    def __init__(self, workdir: str, steps: int, start_step: int, total_steps: int):
        self.workdir, self.first = workdir, start_step + 1
        self.last = min(self.first + steps, total_steps)
        self.active = steps > 0 and self.last > self.first and jax.process_index() == 0
        self.tracing, self.local = False, None

    def __enter__(self) -> "Profile":
        return self

    def after_step(self, step: int, metrics) -> None:
        """Call after each step; waits for the device only where a trace starts or ends."""
        if not self.active or step not in (self.first, self.last):
            return
        jax.block_until_ready(metrics)
        if step == self.first:
            self.local = tempfile.mkdtemp(prefix="simclr_jax_profile_") if storage.is_url(self.workdir) else None
            jax.profiler.start_trace(self.local or storage.resolve(self.workdir))
            self.tracing = True
        else:
            self._stop(step)

    def __exit__(self, *exc_info) -> None:
        if self.tracing:
            self._stop(None)

    def _stop(self, step) -> None:
        self.tracing = False
        jax.profiler.stop_trace()
        if self.local:
            storage.copy_tree(self.local, self.workdir)
            shutil.rmtree(self.local, ignore_errors=True)
        where = storage.join(self.workdir, "plugins", "profile")
        steps = f"steps {self.first + 1}-{step}" if step else f"the steps after {self.first}"
        logging.info("Profile of %s in %s: tensorboard --logdir=%s, Profile tab (pip install "
                     "tensorboard-plugin-profile)", steps, where, storage.resolve(self.workdir))


@contextlib.contextmanager
def _disk_full_named(workdir: str):
    """A full disk while saving or logging ends in one message: the folder, and
    that the newest complete checkpoint (Orbax commits a step only whole) is intact."""
    try:
        yield
    # TensorStore reports it as a ValueError (RESOURCE_EXHAUSTED ... [os_error_code='28']).
    except (OSError, ValueError) as e:
        if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
            raise
        raise StorageError(
            f"no space left on the device of {storage.resolve(workdir)}; the newest complete "
            f"checkpoint, step {checkpoint.latest_step(workdir)}, is intact: free some space (or move the "
            "workdir) and run the same command to resume from it") from None


def duration(seconds: float) -> str:
    """'1d 02:03:04', '00:05:00', or '?' when the rate is not known yet."""
    if not np.isfinite(seconds) or seconds < 0:
        return "?"
    days, rest = divmod(int(round(seconds)), 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def eta(step: int, total_steps: int, batch_size: int, scalars: dict) -> str:
    """The time left at the interval's rate (``scalars['images_per_sec']``), for a progress line."""
    rate = scalars["images_per_sec"]
    return duration((total_steps - step) * batch_size / rate if rate > 0 else float("nan"))


def fetch(history: list[dict]) -> dict[str, np.ndarray]:
    """Per-step metrics accumulated on device, as numpy [steps]: one host sync."""
    return jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))


class NonfiniteGuard:
    """Acts on steps whose loss or gradient was not finite (the step applied no
    update): 'stop' raises, naming the step and the last good checkpoint;
    'skip' counts them and goes on, unless a whole logging interval, and at
    least two steps in a row, applied no update: then the run is stuck and stops."""

    def __init__(self, policy: str, manager):
        self.policy, self.manager, self.skipped, self.in_a_row = policy, manager, 0, 0

    def check(self, stacked: dict, step: int) -> dict[str, float]:
        """The interval's mean metrics over its finite steps."""
        flags = stacked.pop("nonfinite")
        bad, good_steps = np.flatnonzero(flags), np.flatnonzero(flags == 0)
        self.in_a_row = self.in_a_row + len(flags) if not good_steps.size else len(flags) - 1 - int(good_steps[-1])
        if bad.size:
            first = step - len(flags) + 1 + int(bad[0])
            if self.policy == "stop" or self.in_a_row >= max(2, len(flags)):
                self._stop(first, bad.size, len(flags))
            self.skipped += bad.size
            logging.warning("Skipped %d non-finite updates, the first at step %d (%d in all).",
                            bad.size, first, self.skipped)
        good = np.ones(len(flags), bool)
        good[bad] = False
        scalars = {k: float(np.mean(v[good])) if good.any() else float("nan") for k, v in stacked.items()}
        if self.skipped:
            scalars["skipped_updates"] = float(self.skipped)
        return scalars

    def _stop(self, first: int, count: int, steps: int):
        self.manager.wait_until_finished()
        last_good = self.manager.latest_step()
        where = (f"the last good checkpoint is step {last_good} in {self.manager.directory}"
                 if last_good is not None else "no checkpoint was saved yet")
        what = ("training stopped" if self.policy == "stop" else
                f"the last {self.in_a_row} steps in a row applied no update (nonfinite_policy=skip), so "
                "training stopped")
        raise FloatingPointError(
            f"non-finite loss or gradient at step {first} ({count} of the last {steps} steps); the update was "
            f"not applied and {what}; {where}. Lower the learning rate, raise a very small temperature, or set "
            "--config.nonfinite_policy=skip to skip isolated such steps.")
