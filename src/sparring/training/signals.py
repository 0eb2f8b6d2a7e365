"""Stopping cleanly: a stop signal between steps (preemption) and a non-finite step.

SIGTERM or SIGUSR1 during training (a scheduler's preemption notice) ends the current step, writes a
checkpoint and raises ``Preempted`` (the CLI exits with ``EXIT_PREEMPTED``). A non-finite loss or
gradient norm raises ``NonFiniteLoss`` or skips the step (``train.on_nonfinite``).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

# sysexits' EX_TEMPFAIL: "try again later" — the run stopped cleanly and its rerun resumes it.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; rerunning the command resumes it."""


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient norm was NaN/inf (train.on_nonfinite=error); nothing was saved from it."""


class StopRequest:
    """Notes SIGTERM/SIGUSR1 while training, so the loop stops between steps, never inside one.

    Handlers can only be set from the main thread; elsewhere the signals keep their old meaning.
    The previous handlers come back when the block ends.
    """

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame) -> None:
        self.signum = signum
