"""``lmdistill export CHECKPOINT OUT_DIR``: a Hugging Face model directory from any checkpoint.

A checkpoint holds the student's weights (in one file, or in the shards of an FSDP run's
processes) and its model config (``student_config.json``); the tokenizer is saved once per run
in ``RUN_DIR/tokenizer``. Together they make a directory that
``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmdistill.core.errors import LmdistillError
from lmdistill.core.paths import protected_place
from lmdistill.models.loading import save_model_dir
from lmdistill.training.checkpoint import EXPORT_SKIP, find_latest_valid, load_checkpoint
from lmdistill.training.layout import MARKER
from lmdistill.training.sharded import load_shards


def check_new_model_dir(out_dir: str | Path, what: str) -> None:
    """Refuse a model output that is the current directory, one of its parents or the home
    directory (it would be replaced by the model directory), or an empty name."""
    if not str(out_dir).strip():  # (Path("") would read as ".")
        raise LmdistillError(f"{what} is an empty path; give the name of a new directory for the model")
    where = protected_place(out_dir)
    if where is not None:
        raise LmdistillError(
            f"{what} '{out_dir}' is {where}; give the name of a new directory for the model, e.g. exported-model"
        )


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_new_model_dir(out_dir, "output")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.exists():
        raise LmdistillError(f"'{checkpoint}' does not exist; give RUN_DIR/checkpoints/step-N or a run directory")
    is_run = (checkpoint / MARKER).is_file()
    if is_run and not any(p.name.startswith("step-") for p in _entries(checkpoint / "checkpoints")):
        raise LmdistillError(
            f"run '{checkpoint}' has no checkpoint yet (it stopped before its first one); nothing to "
            f"export; continue it with lmdistill train --resume {checkpoint} (checkpoint.every N "
            "writes one every N steps)"
        )
    if (checkpoint / "checkpoints").is_dir():  # a run directory: take its newest valid checkpoint
        newest, warnings = find_latest_valid(checkpoint / "checkpoints", skip=EXPORT_SKIP)
        for warning in warnings:
            print(f"warning: {warning}")
        if newest is None:
            raise LmdistillError(f"run directory '{checkpoint}' has no valid checkpoint to export")
        checkpoint = newest
    if not (checkpoint / "manifest.json").is_file():
        raise LmdistillError(
            f"'{checkpoint}' is not a checkpoint directory (no manifest.json); give "
            "RUN_DIR/checkpoints/step-N or a run directory"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise LmdistillError(f"output '{out_dir}' is a file; give the name of a new directory for the model")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LmdistillError(f"output directory '{out_dir}' is not empty; choose a new directory")
    ckpt = load_checkpoint(checkpoint, optimizer=False)  # the weights only: optimizer.pt may be gone
    if "student_config.json" not in ckpt.extra_files:
        raise LmdistillError(
            f"checkpoint '{checkpoint}' does not record the student's model config; export needs "
            "student_config.json (it was written by an older lmdistill)"
        )
    config_dict = json.loads(ckpt.extra_files["student_config.json"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    if ckpt.sharded:  # the shards of every process that wrote them, gathered into this one model
        load_shards(checkpoint, model)  # every weight, with its shape, or a one-line refusal
        missing, unexpected = [], []
    else:
        missing, unexpected = model.load_state_dict(ckpt.model_state, strict=False)
    if unexpected or [k for k in missing if k not in set(ckpt.tied_weights) | _tied_names(model)]:
        raise LmdistillError(
            f"checkpoint weights do not match the recorded config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tokenizer_dir = checkpoint.parent.parent / "tokenizer"
    tokenizer = None
    if tokenizer_dir.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        print(f"warning: no tokenizer at {tokenizer_dir}; the exported model has none")
    try:
        save_model_dir(model, tokenizer, out_dir)
    except OSError as exc:
        raise LmdistillError(
            f"could not write the model to '{out_dir}': {exc.strerror}; choose a writable place with free space"
        ) from None
    return out_dir


def _entries(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _tied_names(model) -> set[str]:
    """Parameter names that share storage with another (tied embeddings)."""
    seen, tied = {}, set()
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            tied.add(name)
        seen[key] = name
    return tied
