"""``lmdistill export CHECKPOINT OUT_DIR``: a Hugging Face model directory from any checkpoint.

A checkpoint holds the student's weights (in one file, or in the shards of an FSDP run's
processes) and its model config (``student_config.json``); the tokenizer is saved once per run
in ``RUN_DIR/tokenizer``. Together they make a directory that
``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from lmdistill.core.errors import LmdistillError
from lmdistill.core.paths import is_hub_id, protected_place
from lmdistill.models.loading import save_model_dir
from lmdistill.models.lora import ADAPTER_FILE, base_of, is_lora, merged, rebuild
from lmdistill.report.card import CARD, write_model_card
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


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, adapter: bool = False, push_to: str | None = None
) -> Path:
    """The student of ``checkpoint`` (or of a run directory's newest valid checkpoint) as a model
    directory in ``out_dir`` with its model card: a LoRA student merged into an ordinary model,
    or with ``adapter`` its adapters alone (peft's format, naming the base model they belong to).
    ``push_to``: a hub repository to upload it to; the hub is asked first, so that a push that
    cannot happen fails before anything is written."""
    check_new_model_dir(out_dir, "output")
    if push_to is not None:
        push_to = check_hub(push_to)  # OWNER/NAME
    checkpoint, out_dir = _checkpoint_to_export(Path(checkpoint)), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LmdistillError(f"output '{out_dir}' is a file; give the name of a new directory for the model")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LmdistillError(f"output directory '{out_dir}' is not empty; choose a new directory")
    ckpt = load_checkpoint(checkpoint, optimizer=False)  # the weights only: optimizer.pt may be gone
    model = _student_of(ckpt)
    if adapter:
        model = _adapters_alone(model, ckpt)
        base = base_of(model)
        if push_to is not None and Path(base).exists():
            print(
                f"warning: the adapters' base model is the local '{base}': whoever loads them from the hub needs "
                "that model too (train the adapters on a hub model for adapters that stand on their own)"
            )
    else:
        model = merged(model)
    tokenizer = _run_tokenizer(checkpoint)
    name = push_to or str(out_dir)  # where the card's example code loads it from
    card = functools.partial(_card, checkpoint.parent.parent, step=ckpt.step, adapter=adapter, name=name)
    try:
        save_model_dir(model, tokenizer, out_dir, also=card)
    except OSError as exc:
        raise LmdistillError(
            f"could not write the model to '{out_dir}': {exc.strerror}; choose a writable place with free space"
        ) from None
    if push_to is not None:
        push(out_dir, push_to)
    return out_dir


def _card(run_dir: Path, model_dir: Path, *, step: int, adapter: bool, name: str) -> None:
    try:
        write_model_card(run_dir, model_dir, step=step, adapter=adapter, name=name)
    except LmdistillError:  # a checkpoint copied out of its run: no run files to describe it with
        (model_dir / CARD).unlink(missing_ok=True)  # (peft writes a template card of its own)
        print(f"warning: no model card: '{run_dir}' is not the run directory the checkpoint came from")


def check_hub(name: str) -> str:
    """The hub is reachable and knows who pushes (``hf auth login``), and ``name`` is a repository
    name; one line otherwise. Returns the repository as OWNER/NAME (the one logged in owns a bare NAME)."""
    from huggingface_hub import HfApi

    if not is_hub_id(name):
        raise LmdistillError(f"--push-to-hub '{name}' is not a repository name; give NAME or OWNER/NAME")
    try:
        user = HfApi().whoami()["name"]
    except Exception as exc:  # offline mode, no network, no token, a refused token: all stop here
        raise LmdistillError(
            f"cannot push to the Hugging Face hub ({_reason(exc)}); nothing was written; check the network "
            "connection and log in with hf auth login, or export without --push-to-hub"
        ) from None
    return name if "/" in name else f"{user}/{name}"


def push(model_dir: Path, name: str) -> None:
    """Upload ``model_dir`` to the hub repository ``name`` (created if new)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(name, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(model_dir), repo_id=repo.repo_id, repo_type="model")
    except Exception as exc:
        raise LmdistillError(
            f"the push to '{name}' failed ({_reason(exc)}); the export is complete in '{model_dir}': upload it "
            f"again with hf upload {name} {model_dir}"
        ) from None
    print(f"pushed {model_dir} -> https://huggingface.co/{repo.repo_id}")


def _reason(exc: BaseException) -> str:
    """The exception's first sentence, on one line."""
    text = " ".join(str(exc).split()).split(". ")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _checkpoint_to_export(checkpoint: Path) -> Path:
    """The checkpoint directory: ``checkpoint`` itself, or a run directory's newest valid one."""
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
    return checkpoint


def _student_of(ckpt):
    """The student the checkpoint holds, built from its recorded config (with its adapters when
    it is a LoRA student) and loaded with its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "student_config.json" not in ckpt.extra_files:
        raise LmdistillError(
            f"checkpoint '{ckpt.path}' does not record the student's model config; export needs "
            "student_config.json (it was written by an older lmdistill)"
        )
    config_dict = json.loads(ckpt.extra_files["student_config.json"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    if ADAPTER_FILE in ckpt.extra_files:
        model = rebuild(model, ckpt.extra_files[ADAPTER_FILE])
    if ckpt.sharded:  # the shards of every process that wrote them, gathered into this one model
        load_shards(ckpt.path, model)  # every weight, with its shape, or a one-line refusal
        missing, unexpected = [], []
    else:
        missing, unexpected = model.load_state_dict(ckpt.model_state, strict=False)
    if unexpected or [k for k in missing if k not in set(ckpt.tied_weights) | _tied_names(model)]:
        raise LmdistillError(
            f"checkpoint weights do not match the recorded config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model


def _adapters_alone(model, ckpt):
    """The LoRA student, its adapters to be saved alone and pointing at the model they were
    trained on; refused for a full student, or when that model exists only inside the run."""
    if not is_lora(model):
        raise LmdistillError(
            f"checkpoint '{ckpt.path}' is of a fully trained student, not a LoRA one (model.lora.r = 0); "
            "export it without --adapter"
        )
    if not base_of(model):
        raise LmdistillError(
            "the adapters were trained on a student built inside the run (cut out of the teacher or "
            "initialised fresh), which exists nowhere else, so they cannot be used alone; export the merged "
            "model (drop --adapter), or save the starting student first (lmdistill prune --out BASE) and "
            "train the adapters on model.student: BASE"
        )
    return model


def _run_tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    tokenizer_dir = checkpoint.parent.parent / "tokenizer"
    if tokenizer_dir.is_dir():
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    print(f"warning: no tokenizer at {tokenizer_dir}; the exported model has none")
    return None


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
