"""Errors a user can act on.

Anything raised as ``LmdistillError`` reaches the command line as one line on stderr
and a non-zero exit code, never as a traceback. Reserve plain exceptions and asserts
for our own invariants.
"""

from __future__ import annotations

import re


class LmdistillError(Exception):
    """A problem with the user's input or environment; the message says what to do."""

    exit_code = 2


class ConfigError(LmdistillError):
    """A config key, value or combination that cannot be used."""


class TrainingStopped(LmdistillError):
    """Training stopped on purpose by a guard (too many skipped steps or rollbacks)."""

    exit_code = 3


class PeerLost(LmdistillError):
    """Another process of a multi-process run died; this one stopped too (checkpoints are kept)."""


def last_line(exc: BaseException) -> str:
    """The innermost line of an error message (library errors often wrap the useful one last),
    without a leading ``SomethingError:``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^\w+(Error|Exception): ", "", lines[-1])[:300].rstrip(".")


class CheckpointError(LmdistillError):
    """A checkpoint cannot be written, verified or loaded; the message names the path."""
