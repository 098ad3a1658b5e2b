"""Files that must be right: content hashes, fsync'd writes, safetensors, and a finite-weights check.

What checkpoints, stores, caches and saved models share: a file's record (size and SHA-256)
for a manifest, a directory's content hash to name a model by, writes that reach the disk
before they are published, a directory published whole with the manifest that vouches for its
files (``ManifestDir``), and the refusal to write weights that hold NaN or inf.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch

from lmdistill.core.errors import CheckpointError, last_line
from lmdistill.core.parallel import local_tensor
from lmdistill.core.paths import atomic_write, fsync_dir, replace_dir, sha256_file

MANIFEST = "manifest.json"


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


def write_file(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
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


def fsync_file(path: Path) -> None:
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


def file_record(path: Path, size_key: str = "size") -> dict[str, Any]:
    """What the manifest records of a file: its size (under ``size_key``: a data store and a teacher
    cache call it "bytes") and SHA-256."""
    return {size_key: path.stat().st_size, "sha256": sha256_file(path)}


class ManifestDir:
    """A directory of files and the SHA-256 manifest that vouches for them, published in one step.

    What checkpoints, data stores and teacher caches share. Staged (the default), the files are
    written into a staging directory beside ``final`` (``path``); ``publish`` fsyncs every file,
    writes the manifest -- the caller's fields plus each file's record -- last, fsyncs the
    directory and renames it to ``final`` (an older ``final`` is replaced crash-safely, see
    ``replace_dir``). A reader finds the old directory or the complete new one, never a mix. Used
    as a ``with`` block, a staging directory that was not published (an error, a refusal, even a
    KeyboardInterrupt) is removed on the way out: a failure publishes nothing and leaves nothing
    behind::

        with ManifestDir(final) as out:
            out.write("weights.bin", data)
            out.publish({"format_version": 1})

    In place (``in_place=True``), ``final`` itself is written: a directory built over several
    runs or by several processes (a teacher cache, whose finished shards survive a killed build).
    Each file is renamed into place whole, the manifest's arrival is what publishes the directory,
    and a failure removes nothing but its own temporary file.

    ``staging``: the staging directory (default ``.<name>.tmp-<pid>`` beside ``final``; its parent
    must exist). ``adopt``: it exists already and holds files other processes wrote (the shards of
    a sharded checkpoint), instead of being made anew; unpublished, it is removed all the same.
    ``aside_name``: where ``replace_dir`` moves an older ``final`` meanwhile. ``names``: the files
    the manifest records, in that order (default: every file in ``path``, sorted). ``record``:
    what it records of each (default ``file_record``, size and SHA-256), under ``records_key``.
    ``sort_keys``: the manifest's JSON keys sorted, else in the order of the fields.
    """

    def __init__(
        self,
        final: Path,
        *,
        staging: Path | None = None,
        adopt: bool = False,
        in_place: bool = False,
        aside_name: str | None = None,
        manifest: str = MANIFEST,
        names: Iterable[str] | None = None,
        record: Callable[[Path], dict[str, Any]] = file_record,
        records_key: str = "files",
        sort_keys: bool = True,
    ):
        self.final = Path(final)
        self.in_place = in_place
        if in_place:
            self.path = self.final
        elif staging is not None:
            self.path = Path(staging)
        else:
            self.path = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self.adopt = adopt
        self.aside_name = aside_name
        self.manifest = manifest
        self.names = None if names is None else list(names)
        self.record = record
        self.records_key = records_key
        self.sort_keys = sort_keys
        self.published = False
        self._synced: set[str] = set()  # files written (and fsync'd) through this object
        self._records: dict[str, dict] | None = None

    def __enter__(self) -> ManifestDir:
        if not self.in_place and not self.adopt:
            if self.path.exists():  # an earlier attempt of this process's, under the same name
                shutil.rmtree(self.path)
            self.path.mkdir()
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.in_place and not self.published:
            shutil.rmtree(self.path, ignore_errors=True)

    def write(self, name: str, data: bytes | Callable[[IO[bytes]], Any]) -> Path:
        """Write file ``name``: ``data`` is bytes, or a function that writes into the open binary
        file (``torch.save``, ``ndarray.tofile``). It is fsync'd before this returns."""
        fill = data if callable(data) else lambda f: f.write(data)
        target = self.path / name
        if self.in_place:
            atomic_write(target, fill, fsync=True)
        else:
            write_file(target, fill)
        self._synced.add(name)
        return target

    def save(self, name: str, save: Callable[[Path], Any]) -> Path:
        """File ``name``, written by ``save(path)``: for a library that writes by file name
        (safetensors). It is fsync'd before this returns."""
        target = self.path / name
        if not self.in_place:
            save(target)
            fsync_file(target)
        else:
            tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
            try:
                save(tmp)
                fsync_file(tmp)
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self._synced.add(name)
        return target

    def records(self, known: Mapping[str, dict] | None = None) -> dict[str, dict]:
        """{name: record} of the files the manifest lists, each fsync'd first (unless written here).

        ``known``: records in ``file_record``'s shape that other processes measured of the files
        they wrote (a sharded checkpoint's shards); one is taken as it is when its size is the
        file's, else the file is measured here. Measured once: a later call (``publish``'s) returns
        the same records, so a caller may take them first, e.g. to hash them into a fingerprint."""
        if self._records is None:
            names = self.names if self.names is not None else sorted(p.name for p in self.path.iterdir())
            records = {}
            for name in names:
                path = self.path / name
                if name not in self._synced:  # written by the caller or another process
                    fsync_file(path)
                record = (known or {}).get(name)
                if record is None or record.get("size") != path.stat().st_size:
                    record = self.record(path)
                records[name] = dict(record)
            self._records = records
        return self._records

    def publish(self, fields: Mapping[str, Any], *, known: Mapping[str, dict] | None = None) -> dict[str, Any]:
        """Write the manifest -- ``fields`` and, under ``records_key``, ``records(known)`` -- after
        every file, then put the directory in place; returns the manifest. ``fields`` may hold the
        records already (``records()``, placed where the caller wants the key in the JSON)."""
        records = self.records(known)
        if fields.get(self.records_key, records) != records:
            raise ValueError(f"the manifest's fields hold a {self.records_key!r} entry that is not records()")
        manifest = {**fields, self.records_key: records}
        text = (json.dumps(manifest, indent=2, sort_keys=self.sort_keys, default=str) + "\n").encode()
        if self.in_place:
            fsync_dir(self.path)  # the files' renames reach the disk before the manifest vouches for them
            atomic_write(self.path / self.manifest, text, fsync=True)
            fsync_dir(self.path)
        else:
            # The manifest is what makes the directory complete, so it goes last: a crash before
            # the rename leaves a staging directory that no reader takes for the real one.
            write_file(self.path / self.manifest, lambda f: f.write(text))
            fsync_dir(self.path)
            replace_dir(self.path, self.final, aside_name=self.aside_name)
        self.published = True
        return manifest


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
        raise CheckpointError(f"cannot hash {root}: {exc}; check that the directory is readable") from exc
    return "sha256:" + digest.hexdigest()
