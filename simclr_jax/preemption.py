"""Stop requests: SIGTERM (preemption) and Ctrl-C turn into "save and exit".

Preemptible TPUs and GPUs get SIGTERM some seconds before they are taken.
One process catches it itself. Several processes must stop at the SAME step
(each saves its part of one checkpoint), so there JAX's preemption service
does it: whichever host gets SIGTERM tells the others, and every host learns
the agreed step from ``reached_preemption_sync_point``.
"""
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
    """``stop_now(step)`` is True at the step where training should save and stop.

    Use as a context manager around the training loop; it restores the
    previous signal handlers on exit. A second Ctrl-C stops at once, without
    saving.
    """

    def __init__(self):
        self._requested = False
        self._previous = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested = True
        logging.warning("Received %s: saving a checkpoint after this step, then stopping.",
                        signal.Signals(signum).name)

    def stop_now(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested
