"""Resumable training checkpoints: atomic save, integrity manifest, retention, resume.

Layout (the run directory contract, see rundir.py)::

    runs/NAME/checkpoints/
      step-200/
        model.safetensors     model weights; tied tensors stored once (see metadata)
        optimizer.pt          optimizer.state_dict(), torch.save
        rng_state.pt          capture_rng_state(), torch.save (absent if not given)
        trainer_state.json    the trainer's JSON-able state (step, epoch, data cursor, ...)
        <extra files>         opaque bytes the trainer asked us to keep (e.g. config.yaml)
        manifest.json         written LAST: name, size and SHA-256 of every file above
      step-300/ ...

A sharded checkpoint (``parallel.strategy: fsdp``) holds, in place of ``model.safetensors`` and
``optimizer.pt``, the files of ``torch.distributed.checkpoint``: one ``__R_0.distcp`` per process
R with that process's shards of the weights and AdamW state, and ``.metadata``, the map of
every tensor's shards. Every process writes its file into the staging directory
(``staging_dir``), then the main process adds the rest and the manifest, which lists the
shard files like any other (layout ``sharded``, format version 2).

A checkpoint exists only if its directory is named ``step-N`` *and* its manifest lists
every file with the right size and hash. Everything else -- a ``.tmp-*`` directory left
by a crash mid-save, a ``.trash-*`` directory left by a crash mid-cleanup, a ``step-N``
whose file was truncated or bit-flipped -- is skipped with a warning and never loaded.

Crash safety comes from ordering, not from locks: files are written and fsync'ed into a
temporary directory beside the final one, the manifest last, then one ``rename`` puts the
directory in place (``core.files.ManifestDir``, which data stores and teacher caches share).
One writer per checkpoints directory is assumed (rank 0 under DDP; under FSDP the main
process, after every process has written its shard).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from lmdistill.core.errors import CheckpointError, last_line
from lmdistill.core.files import ManifestDir, first_nonfinite_tensor, save_safetensors
from lmdistill.core.paths import fsync_dir, sha256_file
from lmdistill.training.layout import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    PROJECTION_FILE,
    RNG_FILE,
    SHARDS_METADATA_FILE,
    TRAINER_STATE_FILE,
    foreign_in_checkpoint,
    is_leftover,
)
from lmdistill.training.sharded import load_shards, shard_files

try:  # numpy comes with torch/datasets in practice; the RNG code works without it.
    import numpy as np
except ImportError:  # pragma: no cover - exercised only in a numpy-free install
    np = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

FORMAT_NAME = "lmdistill-checkpoint"
FORMAT_VERSION = 2
"""Bumped when the layout changes incompatibly; newer versions are refused on load. Version 2
added sharded checkpoints; a checkpoint in one file is still written as version 1."""

# What export neither needs nor reads: a checkpoint without them still exports.
EXPORT_SKIP = frozenset({OPTIMIZER_FILE, RNG_FILE, TRAINER_STATE_FILE})
SHARDED = "sharded"
_RESERVED_FILES = frozenset({MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, TRAINER_STATE_FILE})

# safetensors header metadata key holding {alias: stored_name} for tied tensors.
_TIED_METADATA_KEY = "lmdistill.tied_weights"

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


@dataclass
class LoadedCheckpoint:
    """Everything ``save_checkpoint`` stored, verified against the manifest.

    ``model_state`` has every name the saved state dict had: tied aliases point at the
    very same tensor as the name that was stored (``tied_weights`` maps alias -> stored).
    """

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    trainer_state: dict[str, Any]
    rng_state: dict[str, Any] | None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    tied_weights: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    sharded: bool = False
    """The weights and optimizer state are DCP shards in ``path`` (``sharded.load_shards``);
    ``model_state`` is then empty and ``optimizer_state`` None."""


# --------------------------------------------------------------------------- paths


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimizer step ``step``: ``step-N``."""
    return f"step-{step}"


def checkpoint_step(path: Path) -> int | None:
    """Step number encoded in a ``step-N`` directory name, or None for any other name."""
    match = _STEP_DIR_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """All ``step-N`` directories (valid or not), oldest step first. Missing dir -> []."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in checkpoints_dir.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


# --------------------------------------------------------------------------- save


def staging_dir(checkpoints_dir: Path, step: int) -> Path:
    """Where every process writes its shards of the sharded checkpoint of ``step`` before the
    main process completes it (``save_checkpoint(sharded_in=...)``): the same path on all."""
    return Path(checkpoints_dir) / f"{_TMP_PREFIX}{checkpoint_dir_name(step)}-shards"


def make_staging_dir(checkpoints_dir: Path, step: int) -> Path:
    """The main process's part before the shards are written: clean up after earlier crashes,
    then create ``staging_dir`` empty."""
    checkpoints_dir = Path(checkpoints_dir)
    staging = staging_dir(checkpoints_dir, step)
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(checkpoints_dir)
        staging.mkdir()
    except OSError as exc:
        raise _write_error(checkpoints_dir / checkpoint_dir_name(step), checkpoints_dir, exc) from exc
    return staging


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    model_state: Mapping[str, torch.Tensor] | None,
    optimizer_state: Mapping[str, Any] | None,
    trainer_state: Mapping[str, Any],
    rng_state: Mapping[str, Any] | None = None,
    keep: int | None = 3,
    extra_files: Mapping[str, bytes] | None = None,
    sharded_in: Path | None = None,
    shard_records: Mapping[str, dict] | None = None,
) -> Path:
    """Write ``checkpoints_dir/step-{step}`` atomically and return its path.

    ``model_state``: a model's ``state_dict()`` (tied tensors are stored once).
    ``optimizer_state``: ``optimizer.state_dict()`` or None. ``trainer_state``: a
    JSON-able dict (tuples come back as lists, dict keys as strings). ``rng_state``: from
    ``capture_rng_state()``. ``extra_files``: plain file name -> bytes. ``keep``: how many
    valid checkpoints to keep after this one is in place (None keeps all).
    ``sharded_in``: the ``staging_dir`` where every process wrote its shards of the weights and
    optimizer (``sharded.save_shards``, which checked them); ``model_state`` and
    ``optimizer_state`` are then None, and this completes that directory into the checkpoint.
    ``shard_records``: size and SHA-256 of shard files, as each process measured its own
    (``sharded.save_shards``); they are not read again here unless their size differs.

    Raises CheckpointError -- leaving every earlier checkpoint untouched -- if a model or
    optimizer tensor is not finite, or if the directory cannot be written.
    """
    checkpoints_dir = Path(checkpoints_dir)
    extra_files = dict(extra_files or {})
    _check_save_arguments(step, keep, extra_files)
    final = checkpoints_dir / checkpoint_dir_name(step)

    # Everything that can be refused is refused before the first byte hits the disk, so
    # a refusal can never leave a half-written directory behind.
    trainer_state_bytes = _encode_trainer_state(trainer_state)
    if sharded_in is None:
        save_model = _model_saver(model_state, optimizer_state, final)
        _prepare_checkpoints_dir(checkpoints_dir, final)
    elif model_state is not None or optimizer_state is not None:
        raise ValueError("a sharded checkpoint's weights and optimizer state are in its shards, not in arguments")

    out = _checkpoint_dir(checkpoints_dir, final, sharded_in)
    try:
        with out:  # (a staging directory that is not published is removed, whatever the failure)
            shards = _written_shards(out.path, final) if sharded_in is not None else None
            if sharded_in is None:
                out.save(MODEL_FILE, save_model)
            _write_states(out, optimizer_state, rng_state, trainer_state_bytes, extra_files)
            out.publish(_manifest_fields(step, extra_files, shards), known=shard_records)
    except OSError as exc:
        raise _write_error(final, checkpoints_dir, exc) from exc

    if keep is not None:
        _apply_retention(checkpoints_dir, keep, protect=final)
    return final


def _write_states(
    out: ManifestDir,
    optimizer_state: Mapping[str, Any] | None,
    rng_state: Mapping[str, Any] | None,
    trainer_state_bytes: bytes,
    extra_files: Mapping[str, bytes],
) -> None:
    """The checkpoint's files besides the weights, each fsync'd as it is written."""
    if optimizer_state is not None:
        out.write(OPTIMIZER_FILE, lambda f: torch.save(dict(optimizer_state), f))
    if rng_state is not None:
        out.write(RNG_FILE, lambda f: torch.save(dict(rng_state), f))
    out.write(TRAINER_STATE_FILE, trainer_state_bytes)
    for name, data in extra_files.items():
        out.write(name, bytes(data))


def _check_save_arguments(step: Any, keep: Any, extra_files: Mapping[str, bytes]) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be a positive int or None, got {keep!r}")
    for name in extra_files:
        _check_extra_file_name(name)


def _model_saver(
    model_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any] | None, final: Path
) -> Callable[[Path], None]:
    """What writes ``model.safetensors`` of a checkpoint in one file, made once the states are
    known to be finite (else CheckpointError); tied tensors are stored once."""
    _check_finite(model_state, "model_state", final)
    if optimizer_state is not None:
        _check_finite(optimizer_state, "optimizer_state", final)
    tensors, tied = _dedupe_tied_tensors(model_state)
    metadata = {"format": "pt", _TIED_METADATA_KEY: json.dumps(tied, sort_keys=True)}
    return lambda path: save_safetensors(tensors, path, metadata)


def _prepare_checkpoints_dir(checkpoints_dir: Path, final: Path) -> None:
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(final, checkpoints_dir, exc) from exc
    # Leftovers of an earlier crash would otherwise hold the disk space this save needs.
    remove_leftovers(checkpoints_dir)


def _checkpoint_dir(checkpoints_dir: Path, final: Path, sharded_in: Path | None) -> ManifestDir:
    """The checkpoint's directory and manifest as ``ManifestDir`` writes them: staged in
    ``.tmp-step-N-<pid>`` (or, sharded, in the ``staging_dir`` that holds the shards already), an
    older ``step-N`` moved to ``.trash-step-N-<pid>`` while it is replaced: names that
    ``remove_leftovers`` knows."""
    pid = os.getpid()
    return ManifestDir(
        final,
        staging=Path(sharded_in) if sharded_in is not None else checkpoints_dir / f"{_TMP_PREFIX}{final.name}-{pid}",
        adopt=sharded_in is not None,
        aside_name=f"{_TRASH_PREFIX}{final.name}-{pid}",
        manifest=MANIFEST_FILE,
    )


def _manifest_fields(step: int, extra_files: Mapping[str, bytes], shards: list[str] | None) -> dict[str, Any]:
    """The manifest's entries besides the file records (which ``ManifestDir`` adds as "files")."""
    return {
        "format": FORMAT_NAME,
        "format_version": 1 if shards is None else 2,
        **({"layout": SHARDED, "shard_files": shards} if shards is not None else {}),
        "step": step,
        "created_unix": time.time(),
        "extra_files": sorted(extra_files),
    }


def _written_shards(staging: Path, final: Path) -> list[str]:
    """The files of the shard map in ``staging``, each one checked to be there: a shard this
    process cannot see (an output directory that is not shared between machines) refuses the
    save instead of making a checkpoint that verifies but cannot load."""

    try:
        names = shard_files(staging)
    except CheckpointError as exc:
        raise CheckpointError(f"could not complete checkpoint {final}: {exc}") from None
    missing = [name for name in names if not (staging / name).is_file()]
    if missing:
        raise CheckpointError(
            f"could not complete checkpoint {final}: {staging / missing[0]} is not there (of "
            f"{len(names)} files the shard map lists); every process must write into the same "
            "directory: put --output-dir on a file system all machines share"
        )
    return names


def _apply_retention(checkpoints_dir: Path, keep: int, protect: Path) -> None:
    """Remove checkpoints older than the newest ``keep`` valid ones, oldest first.

    Validity here is the cheap check (manifest present, sizes match, no hashing): a full
    hash of every kept checkpoint on every save would cost more than the save itself.
    Invalid checkpoints newer than the cut-off are left alone (they do not count toward
    ``keep``); older ones go with the rest. ``protect`` -- the checkpoint just written --
    is never removed, and neither, as a consequence, is the newest valid one.
    """
    kept = 0
    victims: list[Path] = []
    for path in reversed(list_checkpoints(checkpoints_dir)):
        if kept >= keep and path != protect:
            victims.append(path)
        elif not verify_checkpoint(path, check_hashes=False):
            kept += 1
    for path in reversed(victims):  # oldest first
        foreign = foreign_in_checkpoint(path)
        if foreign:  # never delete what lmdistill did not write
            logger.warning(
                "kept old checkpoint %s: it holds %s, which lmdistill did not write; move it away", path, foreign[0]
            )
            continue
        try:
            _remove_dir_crash_safe(path)
        except OSError as exc:
            # The new checkpoint is already safe; a failed cleanup only costs disk space
            # and is retried by the next save, so it must not fail the save.
            logger.warning("could not remove old checkpoint %s (%s); the next save retries", path, exc)
            return


def _remove_dir_crash_safe(path: Path) -> None:
    """Delete a checkpoint so that no crash leaves a half-deleted ``step-N`` behind.

    The rename is atomic; once it is done, a partially removed directory only ever has a
    ``.trash-`` name, which every reader ignores and the next save deletes.
    """
    trash = path.parent / f"{_TRASH_PREFIX}{path.name}-{os.getpid()}"
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


def remove_leftovers(checkpoints_dir: Path) -> None:
    """Delete ``.tmp-*`` and ``.trash-*`` directories left by an interrupted save or cleanup."""
    if not checkpoints_dir.is_dir():
        return
    for entry in checkpoints_dir.iterdir():
        if is_leftover(entry.name):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as exc:
                logger.warning("could not remove leftover %s (%s)", entry, exc)


def _write_error(final: Path, checkpoints_dir: Path, exc: OSError) -> CheckpointError:
    """One-line CheckpointError for a failed write: the path, the cause, what to do."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = f"free disk space under {checkpoints_dir}"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"make {checkpoints_dir} writable"
    else:
        hint = f"check the file system holding {checkpoints_dir}"
    return CheckpointError(
        f"could not write checkpoint {final}: {reason}; {hint}, then rerun with --resume to continue from "
        f"the last valid checkpoint (earlier checkpoints are untouched)"
    )


def _check_extra_file_name(name: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or name in _RESERVED_FILES
        or name.startswith((".", "__"))  # (``__R_0.distcp``: the shards of a sharded checkpoint)
        or "/" in name
        or "\\" in name
    ):
        raise ValueError(
            f"extra file name {name!r} must be a plain file name, not hidden, not starting with '__' and not one of "
            f"{sorted(_RESERVED_FILES)}"
        )


def _encode_trainer_state(trainer_state: Mapping[str, Any]) -> bytes:
    """trainer_state as UTF-8 JSON; NaN/inf are allowed (a monitor may record a NaN loss)."""
    try:
        text = json.dumps(dict(trainer_state), indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trainer_state must be JSON-serializable: {exc}") from exc
    return (text + "\n").encode("utf-8")


def _check_finite(state: Any, label: str, final: Path) -> None:
    """Raise CheckpointError naming the first tensor in ``state`` holding NaN or inf."""
    name = first_nonfinite_tensor(state, label)
    if name is not None:
        raise CheckpointError(
            f"refusing to save checkpoint {final}: {name} has non-finite value(s); earlier checkpoints "
            "are untouched, resume from the last valid one"
        )


def _dedupe_tied_tensors(
    model_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors accepts, plus {alias: stored_name} for the tied ones dropped.

    safetensors refuses tensors that share memory. Names that are the *same view* of the
    same memory (tied embeddings: ``lm_head.weight`` is ``embed_tokens.weight``) are
    stored once under the first name and re-linked on load. Tensors that merely overlap
    in one storage (slices of a fused buffer) are copied so each is stored on its own.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_name_of_view: dict[tuple, str] = {}
    storage_users: dict[tuple, int] = {}
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(tensor).__name__}, not a tensor")
        storage_key = (tensor.device, tensor.untyped_storage().data_ptr())
        view_key = (
            *storage_key,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if tensor.numel() > 0 and view_key in first_name_of_view:
            tied[name] = first_name_of_view[view_key]
            continue
        first_name_of_view[view_key] = name
        storage_users[storage_key] = storage_users.get(storage_key, 0) + 1
        tensors[name] = tensor
    for name, tensor in tensors.items():
        shared = storage_users[(tensor.device, tensor.untyped_storage().data_ptr())] > 1
        tensor = tensor.detach().to("cpu")
        if shared:
            tensors[name] = tensor.clone(memory_format=torch.contiguous_format)
        else:
            tensors[name] = tensor.contiguous()
    return tensors, tied


# --------------------------------------------------------------------------- verify


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, problem) for checkpoint directory ``path``."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return None, f"{manifest_path}: missing, checkpoint incomplete (its save was interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{manifest_path}: unreadable ({exc})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"{manifest_path}: not an {FORMAT_NAME} manifest"
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT_NAME or not isinstance(version, int):
        return None, f"{manifest_path}: not an {FORMAT_NAME} manifest"
    if version > FORMAT_VERSION:
        return None, (
            f"{manifest_path}: format version {version} is newer than this lmdistill "
            f"supports ({FORMAT_VERSION}); upgrade lmdistill to load it"
        )
    return manifest, None


def verify_checkpoint(path: Path, *, check_hashes: bool = True, skip: frozenset[str] = frozenset()) -> list[str]:
    """Problems with checkpoint directory ``path``, one string each naming the bad file.

    An empty list means the manifest exists and every file it lists has the recorded
    size and (with ``check_hashes``) SHA-256. ``check_hashes=False`` only checks sizes.
    Files named in ``skip`` are not checked (nor needed): they will not be read.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: not a directory"]
    manifest, problem = _read_manifest(path)
    if manifest is None:
        return [problem or f"{path}: invalid manifest"]
    problems = []
    files: dict[str, Any] = manifest["files"]
    sharded = manifest.get("layout") == SHARDED
    weights = manifest.get("shard_files") if sharded else [MODEL_FILE]
    if not isinstance(weights, list) or (sharded and SHARDS_METADATA_FILE not in weights):
        return [f"{path / MANIFEST_FILE}: a sharded checkpoint's manifest without its list of shard files"]
    for required in (*weights, TRAINER_STATE_FILE):
        if required not in files and required not in skip:
            problems.append(f"{path / required}: not listed in the manifest")
    for name, record in sorted(files.items()):
        file_path = path / name
        if name in skip:
            continue
        if "/" in name or "\\" in name or name in ("", ".", "..") or not isinstance(record, dict):
            problems.append(f"{path / MANIFEST_FILE}: bad entry for {name!r}")
            continue
        if not file_path.is_file():
            problems.append(f"{file_path}: missing")
            continue
        size = file_path.stat().st_size
        if size != record.get("size"):
            problems.append(
                f"{file_path}: size mismatch, {size} bytes on disk but the manifest records "
                f"{record.get('size')} (truncated or overwritten)"
            )
        elif check_hashes and sha256_file(file_path) != record.get("sha256"):
            problems.append(f"{file_path}: SHA-256 hash mismatch (file corrupted)")
    return problems


def find_latest_valid(checkpoints_dir: Path, skip: frozenset[str] = frozenset()) -> tuple[Path | None, list[str]]:
    """Newest ``step-N`` whose manifest verifies (hashes included; not the files in ``skip``), and
    warnings.

    Each warning names a newer checkpoint that was skipped and its bad file. Directories
    not named ``step-N`` (temporary or trash directories) are ignored silently.
    """
    warnings: list[str] = []
    for path in reversed(list_checkpoints(Path(checkpoints_dir))):
        problems = verify_checkpoint(path, skip=skip)
        if not problems:
            return path, warnings
        warnings.append(f"skipping checkpoint {path}: " + "; ".join(problems))
    return None, warnings


# --------------------------------------------------------------------------- load


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", *, check_hashes: bool = True, optimizer: bool = True
) -> LoadedCheckpoint:
    """Verify ``path`` against its manifest, then load everything onto ``map_location``.

    Raises CheckpointError naming the bad file if verification fails; nothing from an
    unverified directory is ever deserialized. ``check_hashes=False`` when ``path`` was just
    verified with them (``resume_point``): the sizes are still checked. ``optimizer=False``
    (export): only the weights and extra files are needed and read (``EXPORT_SKIP``: the optimizer,
    RNG and trainer states are None, None and {}).
    """
    path = Path(path)
    problems = verify_checkpoint(path, check_hashes=check_hashes, skip=frozenset() if optimizer else EXPORT_SKIP)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        if not optimizer:
            raise CheckpointError(
                f"cannot export checkpoint: {problems[0]}{more}; export needs the checkpoint's "
                "weights and student_config.json: restore them, or export another checkpoint"
            )
        raise CheckpointError(
            f"cannot load checkpoint: {problems[0]}{more}; resume from an older checkpoint "
            f"(find_latest_valid picks the newest valid one)"
        )
    manifest, _ = _read_manifest(path)
    assert manifest is not None  # verify_checkpoint just read it
    files = manifest["files"]
    device = str(map_location)
    sharded = manifest.get("layout") == SHARDED
    model_state, tied = {}, {}
    try:
        if not sharded:
            model_state = safetensors.torch.load_file(str(path / MODEL_FILE), device=device)
            with safetensors.safe_open(str(path / MODEL_FILE), framework="pt") as f:
                metadata = f.metadata() or {}
            tied = json.loads(metadata.get(_TIED_METADATA_KEY, "{}"))
            for alias, stored in tied.items():
                model_state[alias] = model_state[stored]
        optimizer_state = None
        if OPTIMIZER_FILE in files and optimizer:
            optimizer_state = _load_tensors(path / OPTIMIZER_FILE, map_location)
        rng_state = None
        if RNG_FILE in files and optimizer:
            # RNG states must stay on the CPU whatever the model's device (restore needs it).
            rng_state = _load_tensors(path / RNG_FILE, "cpu")
        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8")) if optimizer else {}
        extra_files = {name: (path / name).read_bytes() for name in manifest.get("extra_files", [])}
    except (
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        pickle.UnpicklingError,
        safetensors.SafetensorError,
    ) as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {last_line(exc)}") from exc
    return LoadedCheckpoint(
        path=path,
        step=int(manifest["step"]),
        model_state=model_state,
        optimizer_state=optimizer_state,
        trainer_state=trainer_state,
        rng_state=rng_state,
        extra_files=extra_files,
        tied_weights=dict(tied),
        format_version=int(manifest["format_version"]),
        sharded=sharded,
    )


def _load_tensors(file: Path, map_location) -> Any:
    """``torch.load`` of a file lmdistill wrote: tensors and plain values only (weights_only). A
    file holding anything else is refused in one line, and never loaded another way."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{file} is not a checkpoint file lmdistill wrote (it holds Python objects, not only "
            "tensors) and was not loaded; use a checkpoint lmdistill wrote (move this one away to "
            "resume from an older one)"
        ) from None


def resume_point(checkpoints_dir: Path, announce: bool = True) -> Path | None:
    """The newest valid checkpoint to resume from; None when none was written yet.

    Checkpoints that all fail their check are refused (CheckpointError naming the newest and
    why): resuming from step 0 instead would silently throw the run away."""
    newest, warnings = find_latest_valid(checkpoints_dir)
    for warning in warnings if announce else []:
        print(f"warning: {warning}")
    if newest is None and warnings:
        raise CheckpointError(
            f"no valid checkpoint to resume in '{checkpoints_dir}': all {len(warnings)} are damaged "
            f"(newest: {warnings[0].removeprefix('skipping checkpoint ')}); restore them, or start "
            "over with --overwrite"
        )
    return newest


def projection_file(projection: torch.nn.Module | None) -> dict[str, bytes]:
    """The hidden-state projection as a checkpoint's extra file (nothing when there is none to
    train). It is kept apart from the student's weights, so an exported student never has it."""
    if projection is None or not any(True for _ in projection.parameters()):
        return {}
    from safetensors.torch import save

    return {PROJECTION_FILE: save({k: v.detach().contiguous() for k, v in projection.state_dict().items()})}


def check_resumable(path: Path, processes: int, batch_size: int, strategy: str, total_steps: int | None = None) -> None:
    """Refuse, before anything is loaded or written, a resume of checkpoint ``path`` that cannot
    continue its run: a trainer state lmdistill did not write, a step past this run's
    ``total_steps``, another global micro-batch (``batch_size`` x ``processes`` blocks fixes the
    data order; the process count alone may change), or whole weights into FSDP."""
    file = Path(path) / TRAINER_STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        manifest, _ = _read_manifest(Path(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    problem = _trainer_state_problem(state)
    if problem is not None:
        raise CheckpointError(damaged_state_message(path, problem))
    state = state["run"]
    if total_steps is not None and state["step"] > total_steps:
        raise CheckpointError(
            f"checkpoint {path} is at step {state['step']}, past this run's {total_steps} steps "
            f"(train.max_steps, or train.epochs); resume with --max-steps {state['step']} or more "
            f"(the run was planned for {state.get('total_steps', 'more')} steps)"
        )
    saved_processes = state.get("processes", 1)
    saved_batch = state.get("global_batch")  # absent from checkpoints of older versions
    if saved_batch is None and saved_processes != processes:
        raise CheckpointError(
            f"{path} was written by a run with {saved_processes} processes, this one has "
            f"{processes}; the data order depends on the process count: resume with the same "
            "number of processes"
        )
    if saved_batch is not None and saved_batch != batch_size * processes:
        fix = (
            f"--batch-size {saved_batch // processes}"
            if saved_batch % processes == 0
            else f"a number of processes that divides {saved_batch}"
        )
        raise CheckpointError(
            f"{path} was written with a global batch of {saved_batch} blocks per micro-batch "
            f"({saved_batch // saved_processes} x {saved_processes} processes) and this run's is "
            f"{batch_size} x {processes}; the data order depends on it: resume with {fix}"
        )
    if strategy == "fsdp" and (manifest or {}).get("layout") != SHARDED:
        raise CheckpointError(f"{path} holds whole weights, not FSDP shards; resume it with parallel.strategy=ddp")


def _trainer_state_problem(state: Any) -> str | None:
    """What is wrong with a checkpoint's trainer state for a resume, or None. It holds one entry
    per part of the run (``saving.trainer_state``); the guard's and the health monitor's are
    checked as they are loaded (``damaged_state_message``)."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    if "run" not in state and "step" in state:
        return "its layout is an earlier lmdistill's, one flat object"
    for part in ("run", "data_cursor", "guard", "health"):
        if not isinstance(state.get(part), dict):
            return f"{part} is {state.get(part)!r}, not an object"
    run, cursor = state["run"], state["data_cursor"]
    for key, value, least in (
        ("step", run.get("step"), 0),
        ("micro_batches", cursor.get("micro_batches"), 0),
        *((key, run.get(key, 1), 1) for key in ("processes", "global_batch", "total_steps")),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            return f"{key} is {value!r}, not a whole number >= {least}"
    if run.get("initial_eval") is not None and not isinstance(run["initial_eval"], dict):
        return f"initial_eval is {run['initial_eval']!r}, not an object"
    return None


def damaged_state_message(path: Path, problem: str) -> str:
    return (
        f"{Path(path) / TRAINER_STATE_FILE} is damaged or was not written by lmdistill ({problem}); move the "
        f"checkpoint {path} away to resume from an older one, or start over with --overwrite"
    )


def restore_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizer,
    processes: int,
    batch_size: int,
    projection: torch.nn.Module | None = None,
    strategy: str = "ddp",
    verified: bool = False,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``model`` (and the hidden-state ``projection``) and
    ``optimizer`` and restore the RNGs; its trainer state. ``verified``: its hashes were just
    checked (``resume_point``), only the sizes are checked again.

    A sharded checkpoint loads onto any number of processes, sharded (``strategy`` fsdp) or not:
    DCP reshards it. Any checkpoint resumes with another process count as long as the global
    micro-batch is the same (``check_resumable``)."""
    check_resumable(path, processes, batch_size, strategy, total_steps)
    ckpt = load_checkpoint(path, check_hashes=not verified)
    try:
        _restore_projection(path, ckpt, projection)  # first: a mismatch is said plainly
        if ckpt.sharded:
            load_shards(path, model, optimizer)
        else:
            model.load_state_dict(ckpt.model_state)
            problem = optimizer_state_problem(ckpt.optimizer_state, optimizer)
            if problem is not None:  # a wrong-shaped state crashes the fused AdamW step (signal 11)
                raise CheckpointError(
                    f"{path / OPTIMIZER_FILE}: the checkpoint's optimizer state is damaged or "
                    f"not lmdistill's ({problem}); move the checkpoint {path} away to resume "
                    "from an older one, or start over with --overwrite"
                )
            optimizer.load_state_dict(ckpt.optimizer_state)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{path} does not fit this student ({str(exc).splitlines()[0][:160]}); resume with "
            "the run's own model settings"
        ) from None
    if ckpt.rng_state is not None:
        try:
            restore_rng_state(ckpt.rng_state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path / RNG_FILE} is damaged or was not written by lmdistill ({exc!r}); move "
                f"the checkpoint {path} away to resume from an older one, or start over with "
                "--overwrite"
            ) from None
    return ckpt.trainer_state


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def optimizer_state_problem(state: Any, optimizer) -> str | None:
    """What is wrong with a saved ``optimizer.state_dict()`` for ``optimizer``, or None: every
    per-parameter tensor must have its parameter's shape, the step and settings sane numbers."""
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("state"), dict)
        or not isinstance(state.get("param_groups"), list)
    ):
        return f"a {type(state).__name__}, not an optimizer state dict"
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        return f"{len(groups)} parameter group(s), the optimizer has {len(optimizer.param_groups)}"
    params = {}
    for saved, group in zip(groups, optimizer.param_groups):
        if (
            not isinstance(saved, dict)
            or not isinstance(saved.get("params"), list)
            or len(saved["params"]) != len(group["params"])
            or not all(isinstance(i, int) for i in saved["params"])
        ):
            return "parameter groups that do not match the optimizer's"
        params.update(zip(saved["params"], group["params"]))
        lr, betas, eps, decay = (saved.get(k) for k in ("lr", "betas", "eps", "weight_decay"))
        if not _finite(lr) or float(lr) < 0:
            return f"lr {lr!r}"
        if betas is not None and (
            not isinstance(betas, (list, tuple))
            or len(betas) != 2
            or not all(_finite(b) and 0 <= float(b) < 1 for b in betas)
        ):
            return f"betas {betas!r}"
        if eps is not None and (not _finite(eps) or float(eps) <= 0):
            return f"eps {eps!r}"
        if decay is not None and not _finite(decay):
            return f"weight_decay {decay!r}"
    for key, entries in state["state"].items():
        if key not in params or not isinstance(entries, dict):
            return f"state for unknown parameter {key!r}"
        for name, value in entries.items():
            if name == "step":
                if not _finite(value) or float(value) < 0:
                    return f"step {value!r} of parameter {key!r}"
            elif isinstance(value, torch.Tensor) and value.shape != params[key].shape:
                return (
                    f"{name} of parameter {key!r} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(params[key].shape)}"
                )
    return None


def _restore_projection(path: Path, ckpt: LoadedCheckpoint, projection: torch.nn.Module | None) -> None:
    wanted = bool(projection_file(projection))
    stored = PROJECTION_FILE in ckpt.extra_files
    if wanted != stored:
        raise CheckpointError(
            f"{path} was written {'without' if wanted else 'with'} a trained hidden-state projection and this run "
            f"{'has' if wanted else 'has none'}; resume with the run's own distill.hidden settings"
        )
    if wanted:
        from safetensors.torch import load

        projection.load_state_dict(load(ckpt.extra_files[PROJECTION_FILE]))


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """State of Python ``random``, NumPy's global RNG, torch CPU and (if present) CUDA.

    Only tensors, ints, floats, strings, tuples and dicts, so ``torch.load(...,
    weights_only=True)`` can read it back. This is the calling process's state only:
    under DDP each rank has its own.
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch_cpu": torch.get_rng_state()}
    if np is not None:
        np_state = np.random.get_state(legacy=False)
        key = np_state["state"]["key"]
        state["numpy"] = {
            "bit_generator": np_state["bit_generator"],
            # int64 because weights_only loading accepts tensors but not numpy arrays.
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``capture_rng_state`` captured; parts absent from ``state`` are left as is."""
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].cpu())
    if "numpy" in state and np is not None:
        saved = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": saved["bit_generator"],
                "state": {"key": saved["key"].cpu().numpy().astype(np.uint32), "pos": saved["pos"]},
                "has_gauss": saved["has_gauss"],
                "gauss": saved["gauss"],
            }
        )
    if "torch_cuda" in state and torch.cuda.is_available():
        saved_cuda = [s.cpu() for s in state["torch_cuda"]]
        if len(saved_cuda) != torch.cuda.device_count():
            # Different GPU count than at save time: restore the devices both runs have,
            # so the run resumes, but it will not be bit-identical to an uninterrupted one.
            logger.warning(
                "checkpoint has CUDA RNG states for %d device(s), this process sees %d; restoring the first %d",
                len(saved_cuda),
                torch.cuda.device_count(),
                min(len(saved_cuda), torch.cuda.device_count()),
            )
        for index, cuda_state in enumerate(saved_cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device=index)


# --------------------------------------------------------------------------- hashing
