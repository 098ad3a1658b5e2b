"""Fully sharded data parallelism (``parallel.strategy: fsdp``) with torch's FSDP2.

``fully_shard`` is applied to every decoder layer and then to the whole model, for the student
(trained) and the teacher (forward only). Each process then holds 1/N of every weight, and of
the student's gradients and AdamW state. A layer's weights are gathered for its forward and
backward and freed after (``reshard_after_forward``). The root (embeddings, final norm,
lm_head) stays gathered from the forward to the end of the backward. So the chunked loss,
which multiplies the student's hidden states by ``lm_head.weight`` outside the model's
forward, sees the whole matrix, and its gradient is reduce-scattered with the rest.

On a GPU the parameters compute in bf16 (``run.mixed_precision: bf16``) and gradients are
reduced in fp32. The CPU (gloo) computes in fp32.

Checkpoints are sharded: every process writes its own shard of the student and of its AdamW
state through ``torch.distributed.checkpoint`` (DCP) into the checkpoint's staging directory,
then the main process adds the rest and the manifest with the atomic protocol of
``checkpoint.py``. DCP records each tensor's global shape and every shard's place in it, so a
checkpoint loads onto any number of processes, sharded or not (``load_shards``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from .errors import LmdistillError


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (``model.layers``, or ``h`` for GPT-2 style)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise LmdistillError(f"parallel.strategy = fsdp cannot find the decoder layers of {type(model).__name__}; "
                         "use parallel.strategy=ddp")


def precision_policy(mixed_precision: str, device: torch.device):
    """FSDP's mixed precision for ``run.mixed_precision``: on a GPU with bf16, parameters are
    gathered and computed in bf16 and gradients reduced in fp32; otherwise fp32 throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: torch.nn.Module, mixed_precision: str, device: torch.device) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root; in place, returns the model."""
    from torch.distributed.fsdp import fully_shard

    policy = precision_policy(mixed_precision, device)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (without importing FSDP into runs that
    never shard: no model can be an FSDPModule before torch.distributed.fsdp is imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (a collective: every process calls it), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU of every process (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def training_state(model: torch.nn.Module, optimizer=None) -> dict:
    """``{"model": ..., "optimizer": ...}`` keyed by parameter names: this process's shards of a
    sharded model (DTensors), whole tensors of an ordinary one. The optimizer's state is created
    if no step made it yet, so the dict is also the template that ``load_shards`` fills."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_shards(directory: Path, model: torch.nn.Module, optimizer, step: int) -> None:
    """Every process writes its shards of ``model`` and ``optimizer`` after ``step`` into
    ``directory`` (which exists); a collective. Refused on every process, before anything is written, if any shard
    holds NaN or inf."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from .checkpoint import CheckpointError, first_nonfinite_tensor

    state = training_state(model, optimizer)
    local = _map_tensors(state, lambda t: t.to_local() if isinstance(t, DTensor) else t)
    bad = first_nonfinite_tensor(local)
    flag = torch.tensor([0.0 if bad is None else 1.0], device=_device_of(model))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = f"{bad} has" if bad is not None else "another process's shard has"
        raise CheckpointError(f"refusing to save the checkpoint of step {step}: {where} non-finite "
                              "value(s); earlier checkpoints are untouched, resume from the last valid one")
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, sync_files=True))
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint shards into {directory}: {exc.strerror or exc}; free disk "
                              "space or make it writable, then resume (earlier checkpoints are untouched)") from None


def load_shards(directory: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Fill ``model`` (and ``optimizer``) from the shards in ``directory``, whatever the number of
    processes that wrote them and that read them now; a collective when a process group is up."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = training_state(model, optimizer)
    with warnings.catch_warnings():  # (one process reading alone is meant, and DCP would say so)
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_fsdp(cfg, world: int) -> None:
    """What parallel.strategy = fsdp does not support yet: one line each, before anything runs."""
    if world < 2:
        raise LmdistillError("parallel.strategy = fsdp shards over several processes and this is one: launch with "
                             "torchrun --nproc_per_node N (docs/distributed.md), or use parallel.strategy=ddp")
    for unsupported, what in ((cfg.guard.spike == "rollback", "guard.spike = rollback"),
                              (cfg.distill.hidden.weight > 0, "the hidden-state term (distill.hidden.weight > 0)"),
                              (cfg.distill.on_policy.fraction > 0, "on-policy steps (distill.on_policy.fraction > 0)")):
        if unsupported:
            raise LmdistillError(f"parallel.strategy = fsdp does not support {what} yet; use parallel.strategy=ddp")


def whole_model(model: torch.nn.Module, is_main: bool) -> torch.nn.Module | None:
    """The sharded ``model`` gathered into an ordinary one on the main process (None elsewhere);
    every process must call it."""
    state = full_model_state(model)
    return unsharded_copy(model, state) if is_main else None


def unsharded_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An ordinary (unsharded) model of ``model``'s class and config holding ``state``, on the CPU:
    what ``save_pretrained`` writes as a plain Hugging Face directory."""
    from torch.distributed.fsdp import FSDPModule

    plain = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule) and issubclass(c, torch.nn.Module))
    copy = plain(model.config)
    copy.load_state_dict(state)
    return copy.eval()
