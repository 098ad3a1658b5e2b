"""Sharded checkpoints: every process writes and reads its own shards through torch.distributed.checkpoint.

A checkpoint of a sharded student (``parallel.strategy: fsdp``) holds each process's shard of
the weights and of the AdamW state, written by that process into the checkpoint's staging
directory (``save_shards``); the main process then adds the rest and the manifest with the
protocol of ``checkpoint.py``. DCP records each tensor's global shape and every shard's place
in it, so a checkpoint loads onto any number of processes, sharded or not (``load_shards``).
Its map of the shards is unpickled with only the classes such a map is made of, so a
checkpoint from elsewhere cannot run code when it is read.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from lmdistill.core.errors import CheckpointError
from lmdistill.core.files import file_record, first_nonfinite_tensor


def training_state(model: torch.nn.Module, optimizer=None) -> dict:
    """``{"model": ..., "optimizer": ...}`` keyed by parameter names: this process's shards of a
    sharded model (DTensors), whole tensors of an ordinary one. torch creates the optimizer's
    state if no step made it yet (with a zero step that counts as AdamW's first), so call it
    with an optimizer only when saving one that has stepped, or to make the template that
    ``load_shards`` fills."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_shards(directory: Path, model: torch.nn.Module, optimizer, step: int) -> dict[str, dict]:
    """Every process writes its shards of ``model`` and ``optimizer`` after ``step`` into
    ``directory`` (which exists); a collective. An optimizer that has not stepped yet is left out
    (its state is created by the first update, as in an uninterrupted run). Refused on every
    process, before anything is written, if any shard holds NaN or inf.

    Returns the manifest records (size, SHA-256) of every process's shard files: each process
    hashes its own, in parallel, so the main process does not read them all at each save."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = training_state(model, optimizer if optimizer.state else None)
    bad = first_nonfinite_tensor(state)  # (this process's shards)
    flag = torch.tensor([0.0 if bad is None else 1.0], device=_device_of(model))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = f"{bad} has" if bad is not None else "another process's shard has"
        raise CheckpointError(
            f"refusing to save the checkpoint of step {step}: {where} non-finite "
            "value(s); earlier checkpoints are untouched, resume from the last valid one"
        )
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, sync_files=True))
    except CheckpointException as exc:  # (a BaseException: what failed, on any process, is inside)
        if dist.get_rank() == 0:  # every process is past its writes: the half-written shards go
            shutil.rmtree(directory, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint shards into {directory}: {_first_failure(exc)}; free "
            "disk space or make it writable, then rerun with --resume (earlier checkpoints are "
            "untouched)"
        ) from None
    mine = {path.name: file_record(path) for path in sorted(Path(directory).glob(f"__{dist.get_rank()}_*.distcp"))}
    everyone: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    return {name: record for records in everyone for name, record in records.items()}


def load_shards(directory: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Fill ``model`` (and ``optimizer``, if the checkpoint holds its state) from the shards in
    ``directory``, whatever the number of processes that wrote them and that read them now; a
    collective when a process group is up. Every weight must be there with its shape: a
    checkpoint of another model is refused, not loaded in part."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    saved = read_shard_metadata(directory).state_dict_metadata
    with_optimizer = optimizer is not None and any(key.startswith("optimizer.") for key in saved)
    state = training_state(model, optimizer if with_optimizer else None)
    problem = _misfit(saved, state["model"])
    if problem:
        raise CheckpointError(
            f"{directory} does not fit this student ({problem}); resume with the run's own model settings"
        )
    try:
        with warnings.catch_warnings():  # (one process reading alone is meant, and DCP would say so)
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(
                state,
                storage_reader=_safe_reader(directory),
                planner=_safe_planner(),
                no_dist=not dist.is_initialized(),
            )
    except CheckpointException as exc:
        raise CheckpointError(
            f"cannot load the shards in {directory}: {_first_failure(exc)}; resume from an older checkpoint"
        ) from None
    set_model_state_dict(model, state["model"])
    if with_optimizer:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def read_shard_metadata(directory: Path):
    """DCP's map of the shards in ``directory`` (``.metadata``), unpickled with only the classes
    such a map is made of: a checkpoint from elsewhere cannot run code when it is read."""
    return _safe_reader(directory).read_metadata()


def shard_files(directory: Path) -> list[str]:
    """The files DCP wrote into ``directory``: its map and every file the map points into."""
    from torch.distributed.checkpoint.filesystem import _metadata_fn

    storage = read_shard_metadata(directory).storage_data or {}
    return sorted({info.relative_path for info in storage.values()} | {_metadata_fn})


def _misfit(saved: dict, wanted: dict) -> str | None:
    """What keeps the model's state ``wanted`` from being filled from checkpoint keys ``saved``."""
    have = {key.removeprefix("model."): meta for key, meta in saved.items() if key.startswith("model.")}
    missing, unexpected = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
    if missing or unexpected:
        return (
            f"{len(missing)} weight(s) missing, e.g. {missing[0]}"
            if missing
            else f"{len(unexpected)} weight(s) it does not have, e.g. {unexpected[0]}"
        )
    for name, tensor in wanted.items():
        size = getattr(have[name], "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            return f"{name} is {tuple(size)} in the checkpoint and {tuple(tensor.shape)} here"
    return None


def _first_failure(exc) -> str:
    """One line for DCP's CheckpointException: the first failure, of the lowest rank."""
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return str(exc).splitlines()[0][:200]
    rank = min(failures)
    error = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
    text = getattr(error, "strerror", None) or str(error)
    return f"{type(error).__name__} on rank {rank}: {text.splitlines()[0][:200] if text else ''}"


def _allowed_in_metadata(module: str, name: str) -> bool:
    import torch.distributed.checkpoint.metadata as dcp_metadata

    if module == "torch.distributed.checkpoint.metadata":
        return isinstance(getattr(dcp_metadata, name, None), type) or name == "_MEM_FORMAT_ENCODING"
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
    }


def _safe_unpickler(file):
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if not _allowed_in_metadata(module, name):
                raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's shard map")
            return super().find_class(module, name)

    return Unpickler(file)


def _safe_reader(directory: Path):
    """DCP's file reader, its shard map unpickled by ``_safe_unpickler``."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _metadata_fn
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / _metadata_fn
            try:
                with open(path, "rb") as file:
                    metadata = _safe_unpickler(file).load()
            except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
                raise CheckpointError(f"cannot read {path}: {exc}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(directory)


def _safe_planner():
    """DCP's load planner, with the non-tensor values (optimizer settings) read as weights-only."""
    import pickle

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                torch.load(value, weights_only=True)  # refuses anything but plain values and tensors
            except pickle.UnpicklingError:  # (never torch's advice to load it unsafely)
                raise ValueError(
                    f"{read_item.dest_index.fqn} holds Python objects, not only tensors: not a "
                    "checkpoint lmdistill wrote; it was not loaded"
                ) from None
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafePlanner()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
