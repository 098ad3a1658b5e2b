"""Output paths the commands check before the work that fills them."""

from __future__ import annotations

import os
from pathlib import Path

from lmdistill.core.errors import LmdistillError


def check_writable_file(path: Path, flag: str) -> None:
    """Refuse an output file that cannot be written before the work that fills it."""
    if path.is_dir():
        raise LmdistillError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'eval.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise LmdistillError(f"{flag} {path}: {parent} is a file, not a directory; choose another path")
    if not parent.is_dir():
        raise LmdistillError(f"{flag} {path}: the directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise LmdistillError(f"{flag} {path}: cannot write in {parent}; choose a path you may write to")
