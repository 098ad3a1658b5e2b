"""LoRA students through peft (``model.lora``).

The student's own weights stay frozen and low-rank adapters on its linear layers are trained.
The wrapped model is a ``peft.PeftModel``: its forward, ``generate`` and output layer are the
student's, so the loss paths, the guard, on-policy steps and evaluation take it as they take a
plain student. Its ``state_dict`` holds the frozen weights and the adapters under peft's names;
a checkpoint saves it whole with the adapters' settings beside it (``ADAPTER_FILE``), which is
what ``rebuild`` needs to load it again. The final ``student/`` and ``lmdistill export`` write the
merged model (the adapters folded into the weights: an ordinary transformers model), or with
``--adapter`` the adapters alone, which peft loads onto the base model they were trained on.
"""

from __future__ import annotations

import copy
import json
import warnings

import torch

from lmdistill.core.errors import LmdistillError

# The adapters' settings, as peft writes them, in a checkpoint of a LoRA run.
ADAPTER_FILE = "adapter_config.json"


def add_adapters(student: torch.nn.Module, lora, base: str | None) -> torch.nn.Module:
    """``student`` wrapped in LoRA adapters as ``lora`` (config.LoraConfig) says; the student
    itself when ``lora.r`` is 0. The student's own weights are frozen. ``base``: where the
    student was loaded from (``model.student``), recorded with the adapters; None for a student
    built inside the run, which its adapters cannot be used without."""
    if lora.r == 0:
        return student
    from peft import LoraConfig

    settings = LoraConfig(
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
        r=lora.r,
        lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.r,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    try:
        return _wrap(student, settings)
    except ValueError as exc:  # target modules that match nothing
        names = sorted({n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LmdistillError(
            f"model.lora.target_modules = {lora.target_modules!r} does not fit the student ({_first_line(exc)}); "
            f"its linear layers are {', '.join(names)}: use all-linear or some of those"
        ) from None


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """An ordinary transformers model with the adapters folded into its weights (a copy: the
    trained model keeps its adapters); a model without adapters as it is."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def adapter_settings(model: torch.nn.Module) -> dict[str, bytes]:
    """``{ADAPTER_FILE: the adapters' settings}`` for a checkpoint; empty without adapters."""
    if not is_lora(model):
        return {}
    settings = model.peft_config["default"].to_dict()
    settings["target_modules"] = _json_able(settings.get("target_modules"))
    return {ADAPTER_FILE: json.dumps(settings, default=_json_able, indent=2).encode()}


def rebuild(base: torch.nn.Module, settings: bytes) -> torch.nn.Module:
    """``base`` wrapped in adapters with the settings ``adapter_settings`` saved, ready to take
    the state dict of the model that was saved."""
    from peft import LoraConfig

    record = json.loads(settings)
    known = set(LoraConfig.__dataclass_fields__)
    return _wrap(base, LoraConfig(**{k: v for k, v in record.items() if k in known}))


def base_of(model: torch.nn.Module) -> str | None:
    """Where a LoRA student's base model was loaded from, as recorded with its adapters."""
    return model.peft_config["default"].base_model_name_or_path


def _wrap(model: torch.nn.Module, settings) -> torch.nn.Module:
    from peft import get_peft_model

    base = settings.base_model_name_or_path  # (peft replaces it with the model's own name)
    with warnings.catch_warnings():
        # peft asks for a property transformers renamed, and notes that the recorded base differs
        # from the model's own name (for a student cut out of the teacher, which it names).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*", category=UserWarning)
        model = get_peft_model(model, settings)
    model.peft_config["default"].base_model_name_or_path = base
    return model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trained parameters, all parameters), each tied tensor counted once."""
    seen: dict[int, torch.nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    trained = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trained, sum(p.numel() for p in seen.values())


def _json_able(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
