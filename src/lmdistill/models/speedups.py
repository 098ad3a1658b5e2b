"""The models' own speed-ups: torch.compile of their decoder layers, and Liger's Triton kernels.

A distillation step's time is the two models' forwards and the student's backward; the loss is a
small share of it at real sizes (docs/performance.md). Two things the ecosystem ships speed the
models themselves up, and both leave a model's weights, names and saved files as they were:

``compile_layers``  each decoder layer's ``forward`` replaced, in place, by a ``torch.compile``d
                    one. Per layer, because that is the unit FSDP2 shards (its hooks around a layer
                    stay outside the compiled code) and the inner module a DDP wrapper holds, as
                    torch's guidance has it; all layers of one class share one compiled program.
                    In place, because ``torch.compile(model)`` returns a wrapper whose state dict
                    names every weight ``_orig_mod.``: checkpoints, exports, LoRA adapters and
                    resumes would all see other names.
``apply_liger``     liger-kernel's patches (RMSNorm, RoPE, SwiGLU / GeGLU, by architecture) on a
                    model instance, through its ``_apply_liger_kernel_to_instance``; never its
                    fused linear cross-entropy: lmdistill's loss is its own.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools

import torch

from lmdistill.core.parallel import find_decoder_layers

# Liger's SwiGLU computes silu(gate) * up; a model whose MLP activation is another one keeps its own MLP.
_SWIGLU_ACTS = ("silu", "swish")


def compile_layers(model: torch.nn.Module) -> int:
    """Compile ``model``'s decoder layers in place (``find_decoder_layers``); how many there are (0:
    none found, nothing changed). Calling it again changes nothing."""
    layers = find_decoder_layers(model) or []
    for layer in layers:
        if not getattr(layer.forward, "lmdistill_compiled", False):
            layer.forward = _compiled_forward(layer.forward, type(layer).__name__)
    return len(layers)


def compiled_layers(model: torch.nn.Module) -> int:
    """How many of ``model``'s decoder layers run compiled (``compile_layers``)."""
    return sum(getattr(layer.forward, "lmdistill_compiled", False) for layer in find_decoder_layers(model) or [])


def _compiled_forward(eager, name: str):
    """``eager`` (a layer's bound forward) compiled, with two ways back to it.

    A call that carries a KV cache (generation: on-policy steps, eval.generate, eval.draft) runs
    eagerly: the cache grows by one position per token, and a compiled layer would recompile for
    every length. Static shapes otherwise (``dynamic=False``): a training step's blocks are all
    of one shape, and each new shape (an evaluation's last, shorter batch) is compiled once.
    A compiler failure (a layer dynamo cannot trace) is said once and its class runs eagerly from
    then on: the run goes on as it would have without the switch."""
    from transformers.cache_utils import Cache

    compiled = torch.compile(eager, dynamic=False)
    broken = _BROKEN

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if name in broken or any(isinstance(v, Cache) for v in itertools.chain(args, kwargs.values())):
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:  # (a real error: eager raises it again)
            broken.add(name)
            print(f"warning: torch.compile failed on {name} ({type(exc).__name__}); its layers run eagerly")
            return eager(*args, **kwargs)

    forward.lmdistill_compiled = True
    return forward


_BROKEN: set[str] = set()  # layer classes whose compilation failed in this process


def liger_version() -> str | None:
    """The installed liger-kernel's version when its transformers patches import (they need Triton
    and a transformers it supports), else None."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # not installed, no Triton, a transformers it refuses: all mean "not usable here"
        return None
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def liger_problem(model: torch.nn.Module) -> str | None:
    """Why Liger has no patches for ``model`` (its ``model_type`` is not one it knows), or None.
    Call only where ``liger_version()`` is not None."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(_plain(model).config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for the architecture {model_type!r}"
    return None


def apply_liger(model: torch.nn.Module) -> None:
    """Liger's kernels patched into ``model`` (in place; a LoRA student's own model under its
    adapters). Its loss patches are turned off: lmdistill computes the loss from the logits or
    the hidden states itself. Liger also replaces the architecture's rotary-embedding function in
    transformers' module for the whole process, as it does wherever it is used."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    plain = _plain(model)
    swiglu = getattr(plain.config, "hidden_act", "silu") in _SWIGLU_ACTS
    _apply_liger_kernel_to_instance(
        model=plain, cross_entropy=False, fused_linear_cross_entropy=False, rope=True, rms_norm=True, swiglu=swiglu
    )


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model itself: under a LoRA wrapper, the model the adapters sit in."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
