"""Files and names on disk: writes that readers never see half-done, and local path versus hub id.

Every file lmdistill writes that another process (or a resumed run) may read goes through
``atomic_write``: the bytes go to a temporary file beside the target, then one ``rename``
puts them in place, so a reader finds the old file or the new one, never a mix. Whole
directories (a saved model, a checkpoint) are published the same way by ``replace_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lmdistill.core.errors import LmdistillError

# A hub id is 'name' or 'org/name'; names start with a letter or digit.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` can be a Hugging Face hub id (model or dataset), as opposed to a path.

    Anything that starts like a path (``.``, ``/``, ``~``) or has more than one ``/`` can
    only have been meant as a local path; callers check ``Path.exists`` first.
    """
    return bool(_HUB_ID.match(text)) and ".." not in text


def sha256_file(path: Path) -> str:
    """The SHA-256 (hex) of the file at ``path``, read in 8 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, data: str | bytes | Callable[[IO[bytes]], Any], *, fsync: bool = False) -> Path:
    """Write ``path`` in one step: a temporary file beside it, then ``os.replace``.

    ``data`` is text (UTF-8), bytes, or a function that writes into the open binary file
    (e.g. a figure's ``savefig``). With ``fsync`` the bytes reach the disk before the
    rename, which is what a crash-safe record needs; plain reports do without. On any error
    the temporary file is removed and the old ``path`` is left as it was; an OSError that
    names no file (a full disk) is raised again naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb", opener=_no_link_opener) as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write (a full disk) names no file: name the one we were writing
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # (0 where the system has no such flag)


def _no_link_opener(name, flags: int) -> int:
    # A link planted where the temporary file goes would otherwise send the bytes to its target.
    return os.open(name, flags | NOFOLLOW, 0o666)


def open_no_link(path: Path, flags: int, what: str) -> int:
    """``os.open(path, flags)`` for lmdistill's own lock and marker files, refusing a symbolic link
    (LmdistillError naming it): opened through a link, a lock would truncate and rewrite whatever
    file the link points to. Also refuses anything that is not a regular file (a FIFO, a device)."""

    try:
        fd = os.open(path, flags | NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)  # a FIFO must not hang us
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise LmdistillError(
                f"'{path}' is a symbolic link, not the {what} lmdistill writes there; lmdistill "
                "never writes through a link: remove the link, or choose another directory"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LmdistillError(
            f"'{path}' is not a regular file, so it cannot be the {what} lmdistill writes there; "
            "remove it, or choose another directory"
        )
    return fd


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str, on_wait: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing, never through a link)
    for the ``with`` block; ``on_wait(holder)`` is called once if another process holds it first,
    ``holder`` naming it ("pid N on HOST", as the holder wrote it in the file). The lock goes with
    the process (and the processes it forked, which share the descriptor), so a killed holder
    never leaves it taken."""
    import fcntl

    fd = open_no_link(path, os.O_RDWR | os.O_CREAT, what)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(_lock_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        _sign_lock(fd)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class LockHeld(Exception):
    """Another process holds a lock that ``claim_lock`` does not wait for; ``holder`` says who."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def claim_lock(path: Path, what: str) -> int:
    """Take the exclusive ``flock`` on ``path`` now or not at all, and write "pid N on HOST" in it
    for whoever finds it taken. Returns the open descriptor: the lock lasts until it is closed (or
    the process ends). Raises LockHeld naming the holder, or OSError when the file cannot be made."""
    import fcntl

    fd = open_no_link(path, os.O_RDWR | os.O_CREAT, what)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise LockHeld(holder) from None
    _sign_lock(fd)
    return fd


def _sign_lock(fd: int) -> None:
    """Write "pid N on HOST" in a lock file this process just took, for whoever finds it taken."""
    import socket

    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


def _lock_holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"


def is_plain_file(path: Path) -> bool:
    """A regular file at ``path`` itself, not a link to one (``Path.is_file`` follows links)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def atomic_write_json(path: Path, obj: Any, *, fsync: bool = False) -> Path:
    """``obj`` as indented JSON through :func:`atomic_write`."""
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n", fsync=fsync)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations inside it survive a power loss."""
    if os.name == "nt":  # Windows cannot open a directory; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path, *, aside_name: str | None = None) -> None:
    """Publish the finished directory ``tmp`` as ``final``, replacing an older ``final``.

    A directory cannot be renamed over a non-empty one, so an existing ``final`` is first
    moved aside (to ``aside_name`` in the same parent, default ``.<name>.old-<pid>``), the
    new one is renamed in, and only then is the old one removed. A crash at any point leaves
    either the old or the new directory under ``final`` (plus, at worst, the aside copy).
    """
    parent = final.parent
    aside = None
    if final.exists():
        aside = parent / (aside_name or f".{final.name}.old-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside is not None:  # put the old directory back before reporting the failure
            os.replace(aside, final)
        raise
    fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def protected_place(path: str | Path) -> str | None:
    """What ``path`` is if replacing it would take more than a directory of ours with it: "the
    current directory", "a parent of the current directory" (the root included) or "your home
    directory"; None otherwise (also when the current directory no longer exists)."""
    try:
        target, cwd = Path(path).resolve(), Path.cwd().resolve()
    except OSError:
        return None
    if target == cwd:
        return "the current directory"
    if target == Path.home().resolve():
        return "your home directory"
    if target in cwd.parents or target == Path(target.anchor):
        return "a parent of the current directory"
    return None


def cache_home() -> Path:
    return Path(os.environ.get("LMDISTILL_HOME", Path.home() / ".cache" / "lmdistill")).expanduser()
