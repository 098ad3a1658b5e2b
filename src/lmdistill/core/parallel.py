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

Checkpoints of a sharded student are sharded too (``training/sharded.py``).
"""

from __future__ import annotations

import sys
import warnings

import torch

from lmdistill.core.errors import LmdistillError


def find_decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The repeated blocks of a transformers causal LM (``model.layers``, or ``h`` for GPT-2 style),
    inside a LoRA wrapper too; None where there is no such list."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(inner, "base_model", inner)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``find_decoder_layers``, which FSDP needs: refused in one line where there are none."""
    layers = find_decoder_layers(model)
    if layers is None:
        raise LmdistillError(
            f"parallel.strategy = fsdp cannot find the decoder layers of {type(model).__name__}; use "
            "parallel.strategy=ddp"
        )
    return layers


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
    # transformers returns views among a model's outputs (hidden states), and FSDP warns that an
    # in-place change of one would skip a gather. Nothing here changes a model output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (without importing FSDP into runs that
    never shard: no model can be an FSDPModule before torch.distributed.fsdp is imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard, any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (a collective: every process calls it), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU of every process (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_fsdp(cfg, world: int) -> None:
    """What parallel.strategy = fsdp does not support yet: one line each, before anything runs."""
    if world < 2:
        raise LmdistillError(
            "parallel.strategy = fsdp shards over several processes and this is one: launch with "
            "torchrun --nproc_per_node N (docs/distributed.md), or use parallel.strategy=ddp"
        )
    if cfg.distill.hidden.weight > 0:
        raise LmdistillError(
            "parallel.strategy = fsdp does not support the hidden-state term (distill.hidden.weight "
            "> 0) yet; use parallel.strategy=ddp"
        )


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
