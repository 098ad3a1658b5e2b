"""Stopping a run on SIGTERM, SIGINT or SIGHUP without losing it.

Clusters send SIGTERM before they preempt a job; a user presses Ctrl-C; a closed terminal
or SSH session sends SIGHUP. The first signal only asks: the run finishes the step it is in,
writes a checkpoint, records the status "interrupted" with the signal's name and exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP). A second signal
does not wait: the run records the status and
ends at once; the newest complete checkpoint is the one it resumes from (checkpoints are
written atomically, so one cut short is never taken for a complete one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

from lmdistill.core.errors import LmdistillError

HANDLED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Interrupted(LmdistillError):
    """The run stopped on a signal after a checkpoint; exit 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """``with GracefulStop(on_abort) as stop:`` -- ``stop.signum`` is the first signal received
    (None until then). ``on_abort(signum)`` runs on a second signal, just before the process
    ends; it should only record the status. Outside the main thread nothing is installed."""

    def __init__(self, on_abort: Callable[[int], None]):
        self.on_abort = on_abort
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            _say(
                f"lmdistill: {name} received: finishing this step and writing a checkpoint "
                f"(send it again to stop at once)"
            )
            return
        _say(f"lmdistill: {name} again: stopping now; the newest complete checkpoint is kept")
        try:
            self.on_abort(signum)
        finally:
            os._exit(128 + signum)  # no clean-up left to run: every file is written atomically


def _say(message: str) -> None:
    """To stderr, if it is still there (after SIGHUP the terminal may be gone)."""
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)
