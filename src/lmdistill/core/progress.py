"""Progress on long work: a tqdm bar in a terminal, plain lines in a log file.

A redrawn bar written to a file or a pipe is thousands of carriage-return updates; there
the same information goes out as one plain line every 10% of the work or every 30 seconds,
whichever comes first.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def interactive() -> bool:
    """stderr is a terminal: a redrawn bar is readable there."""
    return sys.stderr.isatty()


def progress_bar(total: int, initial: int, desc: str, enabled: bool, unit: str = "step"):
    """A tqdm bar on a terminal, else ``LineProgress``; either takes set_description,
    set_postfix, update and close. ``enabled`` False gives a silent one."""
    if enabled and interactive():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(total, initial, desc, enabled, unit)


class LineProgress:
    """One plain line per 10% of ``total`` or per ``every_s`` seconds: done, rate, ETA, postfix."""

    def __init__(
        self,
        total: int | None,
        initial: int,
        desc: str,
        enabled: bool = True,
        unit: str = "step",
        every_s: float = 30.0,
        stream=None,
    ):
        self.total, self.n, self.desc, self.enabled, self.unit = total, initial, desc, enabled, unit
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.start_n, self.start_t = initial, time.monotonic()
        self.last_t, self.last_decile = self.start_t, self._decile(initial)
        self.postfix: dict = {}

    def _decile(self, n: int) -> int:
        return n * 10 // self.total if self.total else 10

    def set_description(self, desc: str, refresh: bool = False) -> None:
        self.desc = desc

    def set_postfix(self, postfix: dict, refresh: bool = False) -> None:
        self.postfix = dict(postfix)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.enabled:
            return
        if self._decile(self.n) > self.last_decile or now - self.last_t >= self.every_s or self.n == self.total:
            self.last_decile, self.last_t = self._decile(self.n), now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = now - self.start_t
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 and self.total else None
        if not self.total:  # open-ended work (a stream): how far, no ETA
            parts = [f"{self.desc}: {self.unit} {self.n}", f"elapsed {_clock(elapsed)}"]
        else:
            parts = [
                f"{self.desc}: {self.unit} {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)",
                f"elapsed {_clock(elapsed)}",
                f"ETA {_clock(eta) if eta is not None else '?'}",
            ]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
