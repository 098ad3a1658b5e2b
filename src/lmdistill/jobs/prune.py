"""``lmdistill prune``: cut a student out of the teacher and save it, showing what was kept."""

from __future__ import annotations

import json
from pathlib import Path

from lmdistill.config import Config
from lmdistill.core.errors import LmdistillError
from lmdistill.data.sources import build_block_data
from lmdistill.default import resolve_default_teacher
from lmdistill.models.loading import load_models, num_params, save_model_dir
from lmdistill.models.prune import SUPPORTED


def prune_to(cfg: Config, out: Path) -> None:
    """Cut the student ``cfg`` describes out of its teacher and save it in ``out`` (new or empty)."""
    resolve_default_teacher(cfg)
    family = _model_type(cfg.model.teacher)
    if family is not None and family not in SUPPORTED:
        raise LmdistillError(
            f"lmdistill prune needs a teacher of the {', '.join(SUPPORTED)} families; "
            f"'{cfg.model.teacher}' is a {family} model"
        )
    models = load_models(cfg, train_blocks=lambda tokenizer: build_block_data(cfg.data, tokenizer).train)
    print("\n".join(_describe(cfg, models)))
    save_model_dir(models.student, models.tokenizer, out)
    print(f"wrote {out} (loads with AutoModelForCausalLM.from_pretrained; train it with --student {out})")


def _describe(cfg: Config, models) -> list[str]:
    teacher, student, importance = models.teacher, models.student, models.layer_importance
    lines = [
        f"teacher: {models.teacher_name} ({teacher.config.num_hidden_layers} layers, {num_params(teacher):,} "
        "parameters)",
        f"layers kept ({cfg.model.prune.layers}"
        + (", block influence = 1 - cos(layer input, layer output)" if importance else "")
        + "):",
    ]
    for layer in range(teacher.config.num_hidden_layers):
        score = f"  influence {importance[layer]:.4f}" if importance else ""
        kept = f"  -> student layer {models.student_layers.index(layer)}" if layer in models.student_layers else ""
        lines.append(f"  teacher layer {layer:>3}{score}{kept}")
    c = student.config
    lines.append(
        f"student: {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} key-value heads ({cfg.model.prune.width} width), "
        f"{num_params(student):,} parameters"
    )
    return lines


def _model_type(source: str) -> str | None:
    """``model_type`` from a local model directory's config.json (None for a hub id or no file)."""
    try:
        return json.loads((Path(source) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
