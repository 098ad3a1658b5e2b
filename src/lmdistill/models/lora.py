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

import json
import warnings

import torch

from lmdistill.core.errors import LmdistillError
from lmdistill.models.loading import num_params

# The adapters' settings, as peft writes them, in a checkpoint of a LoRA run.
ADAPTER_FILE = "adapter_config.json"


def add_adapters(student: torch.nn.Module, lora, base: str | None) -> torch.nn.Module:
    """``student`` wrapped in LoRA adapters as ``lora`` (config.LoraConfig) says; the student
    itself when ``lora.r`` is 0. The student's own weights are frozen. ``base``: where the
    student was loaded from (``model.student``, resolved), recorded with the adapters; None for a
    student built inside the run, which its adapters cannot be used without."""
    if lora.r == 0:
        return student
    from peft import LoraConfig

    _check_targets(student, lora.target_modules)
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
    except ValueError as exc:  # targets peft cannot adapt
        raise LmdistillError(
            f"model.lora.target_modules = {lora.target_modules!r} does not fit the student ({_first_line(exc)}); "
            f"its adaptable layers are {', '.join(_adaptable(student))}: use all-linear or some of those"
        ) from None


def _adaptable(student: torch.nn.Module) -> list[str]:
    """The names of the student's linear layers that can take adapters: not its output layer,
    whose weight the losses multiply by directly (and which a tied model shares with its input
    embedding)."""
    head = student.get_output_embeddings()
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    )


def _check_targets(student: torch.nn.Module, targets) -> None:
    """Every listed name must name an adaptable layer (peft matches a name by the last parts of a
    module's path); a typo would otherwise leave that layer without adapters, silently."""
    if targets == "all-linear":
        return
    modules = dict(student.named_modules())
    embeddings = {student.get_output_embeddings(), student.get_input_embeddings()}
    for target in targets:
        hits = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not hits:
            raise LmdistillError(
                f"model.lora.target_modules names '{target}', which is no layer of the student; its adaptable "
                f"layers are {', '.join(_adaptable(student))}"
            )
        if any(m in embeddings for m in hits):
            raise LmdistillError(
                f"model.lora.target_modules names '{target}', the student's embedding or output layer: the losses "
                "multiply by the output layer's weight directly (and a tied model shares it with the embedding), "
                f"so it stays as it is; choose among {', '.join(_adaptable(student))}"
            )


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """An ordinary transformers model with the adapters folded into its weights, in place (no
    second copy of the model in memory: the wrapper is spent afterwards); a model without
    adapters as it is."""
    if not is_lora(model):
        return model
    return model.merge_and_unload()


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


def resume_problem(saved: bytes | None, lora) -> str | None:
    """How the adapters a checkpoint saved (its ``ADAPTER_FILE``, None for a whole student) differ
    from ``lora`` (config.LoraConfig) in what changes the model; None when they do not."""
    if saved is None:
        return "it trained the whole student (model.lora.r 0)" if lora.r else None
    record = json.loads(saved)
    if not lora.r:
        return f"it trained LoRA adapters (model.lora.r {record['r']})"
    alpha = lora.alpha if lora.alpha is not None else 2 * lora.r
    mine = {"r": lora.r, "alpha": alpha, "dropout": lora.dropout}
    theirs = {"r": record["r"], "alpha": record["lora_alpha"], "dropout": record["lora_dropout"]}
    diff = [f"{k} {theirs[k]:g}" for k in mine if float(mine[k]) != float(theirs[k])]
    return f"its adapters have {', '.join(diff)}" if diff else None


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
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), num_params(model)


def _json_able(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
