"""Files that must be right: content hashes, fsync'd writes, safetensors, and a finite-weights check.

What checkpoints, stores, caches and saved models share: a file's record (size and SHA-256)
for a manifest, a directory's content hash to name a model by, writes that reach the disk
before they are published, and the refusal to write weights that hold NaN or inf.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch

from lmdistill.core.errors import CheckpointError, last_line
from lmdistill.core.parallel import local_tensor
from lmdistill.core.paths import sha256_file


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, its I/O failures raised as the OSError they are
    (safetensors reports a full disk as a SafetensorError of its own)."""
    try:
        safetensors.torch.save_file(dict(tensors), str(path), metadata=metadata)
    except safetensors.SafetensorError as exc:
        raise safetensors_os_error(exc, path) from exc


def safetensors_os_error(exc: Exception, path) -> OSError:
    code = errno.ENOSPC if "No space left" in str(exc) else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def _write_file(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Create ``path``, let ``write`` fill it, and fsync it before returning."""
    with open(path, "wb") as f:
        try:
            write(f)
        except RuntimeError as exc:
            if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
                raise
            raise torch_write_os_error(exc, path) from exc
        f.flush()
        os.fsync(f.fileno())


def torch_write_os_error(exc: RuntimeError, path: Path) -> OSError:
    """``torch.save`` reports a write that failed -- a full disk, mostly -- as a RuntimeError of its
    zip writer ("[enforce fail at inline_container.cc:...] unexpected pos ..."); the OSError it is."""
    try:
        stats = os.statvfs(Path(path).parent)
        full = stats.f_bavail * stats.f_frsize < 1 << 20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({last_line(exc)})", str(path))


def _fsync_existing_file(path: Path) -> None:
    """fsync a file some library wrote and closed (safetensors writes by file name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iter_tensors(obj: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor nested in dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _iter_tensors(value, f"{name}[{key!r}]" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _iter_tensors(value, f"{name}[{i}]")


def first_nonfinite_tensor(state: Any, label: str = "") -> str | None:
    """Name of the first float tensor nested in ``state`` that holds NaN or inf, else None. Of a
    sharded tensor, this process's shard is checked (no collective)."""
    for name, tensor in _iter_tensors(state, label):
        tensor = local_tensor(tensor)
        # One device sync per tensor; negligible next to writing the same bytes to disk.
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest records of a file: its size and SHA-256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def model_reference(source: str) -> dict:
    """A model by path and content hash: checkpoints refer to the teacher, never copy it."""
    path = Path(source)
    return {"source": source, "hash": directory_hash(path) if path.is_dir() else None}


def directory_hash(path: Path) -> str:
    """Stable content hash of a model directory: ``"sha256:<64 hex digits>"``.

    Covers every regular file under ``path`` (symlinks followed, so a Hugging Face cache
    snapshot hashes like a plain copy) by relative path, size and content; skips names
    starting with "." (``.git``, ``.cache/huggingface`` download metadata). Independent
    of timestamps, permissions and directory listing order.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"cannot hash {root}: not a directory; pass a model directory")
    digest = hashlib.sha256()
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            file_path = Path(dirpath) / filename
            if file_path.is_file():
                entries.append((file_path.relative_to(root).as_posix(), file_path))
    try:
        for relative, file_path in sorted(entries):
            # Length-prefixed fields: no two different trees produce the same byte stream.
            name = relative.encode("utf-8")
            digest.update(len(name).to_bytes(8, "little") + name)
            digest.update(file_path.stat().st_size.to_bytes(8, "little"))
            digest.update(bytes.fromhex(sha256_file(file_path)))
    except OSError as exc:
        raise CheckpointError(
            f"cannot hash {root}: {exc}; check that the directory is readable"
        ) from exc
    return "sha256:" + digest.hexdigest()
