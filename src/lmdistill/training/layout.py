"""The names lmdistill writes in a run directory and its checkpoints, and which files there are its own.

A run directory holds what training writes (``WRITTEN``) and, possibly, files a user put
there. ``--overwrite`` and checkpoint retention delete only lmdistill's own: every entry is
claimed by a rule (``_foreign_below``), and what no rule claims -- links included -- is the
user's and stays.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lmdistill.report.card import CARD, LOSS_PLOT
from lmdistill.report.plots import OPTIONAL_PLOT_FILES, PLOT_FILES

MARKER = ".lmdistill-run"


LOCK = ".lmdistill.lock"


# Everything lmdistill writes at the top of a run directory (and the temporary names of its
# atomic writes, ".<name>.tmp-<pid>"): --overwrite removes these and nothing else.
WRITTEN = frozenset(
    {
        MARKER,
        LOCK,
        "config.yaml",
        "metrics.jsonl",
        "health.json",
        "run.json",
        "checkpoints",
        "tokenizer",
        "student",
        "tensorboard",
        "report.md",
        "plots",
        ".student.tmp",
        ".student.old",
    }
)


_TEMPORARY = re.compile(r"^\.[^/]+\.tmp-\d+$")


# What lmdistill writes below the top level, directory by directory (see _foreign_below).
_TOP_FILES = frozenset({MARKER, LOCK, "config.yaml", "metrics.jsonl", "health.json", "run.json", "report.md"})


_SCRATCH_DIRS = frozenset({".student.tmp", ".student.old"})  # save_model_dir's own: it deletes them itself


_MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        CARD,  # the model card, and the loss plot it shows (report/card.py)
        LOSS_PLOT,
        # the vocabulary files transformers' tokenizer classes save (their VOCAB_FILES_NAMES)
        "bpe.codes",
        "byte_maps.json",
        "dict.txt",
        "emoji.json",
        "entity_vocab.json",
        "merges.txt",
        "normalizer.json",
        "prophetnet.tokenizer",
        "sentencepiece.bpe.model",
        "sentencepiece.model",
        "source.spm",
        "spiece.model",
        "spm.model",
        "spm_char.model",
        "target.spm",
        "target_vocab.json",
        "tokenizer.model",
        "vocab-src.json",
        "vocab-tgt.json",
        "vocab.json",
        "vocab.txt",
        "word_pronunciation.json",
        "word_shape.json",
    }
)


_MODEL_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


_STEP_DIR = re.compile(r"^step-\d+$")


_DCP_SHARD = re.compile(r"^__\d+_\d+\.distcp$")


def _written_by_us(name: str) -> bool:
    return name in WRITTEN or bool(_TEMPORARY.match(name))


def _foreign_below(directory: Path, accept, prefix: str = "") -> list[str]:
    """Relative paths under ``directory`` that ``accept`` does not claim. ``accept(entry)`` says
    True for a file (or a scratch directory) of lmdistill's, a rule like itself for a directory
    of lmdistill's whose contents are checked in turn, or False. Links are never claimed."""
    found = []
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            verdict = False if entry.is_symlink() else accept(entry)
            if callable(verdict):
                found += _foreign_below(Path(entry.path), verdict, f"{prefix}{entry.name}/")
            elif not verdict:
                found.append(prefix + entry.name)
    return found


def _top_level(entry):
    name = entry.name
    if not entry.is_dir(follow_symlinks=False):
        return entry.is_file(follow_symlinks=False) and (name in _TOP_FILES or bool(_TEMPORARY.match(name)))
    if name in _SCRATCH_DIRS:
        return True
    if name == "checkpoints":
        return _in_checkpoints
    if name in ("student", "tokenizer"):
        return _in_model_dir
    if name == "tensorboard":
        return lambda e: e.is_file(follow_symlinks=False) and e.name.startswith("events.out.tfevents.")
    if name == "plots":
        names = set(PLOT_FILES) | set(OPTIONAL_PLOT_FILES)
        return lambda e: (
            e.is_file(follow_symlinks=False)
            and (e.name in names or bool(_TEMPORARY.match(e.name) and e.name[1:].rsplit(".tmp-", 1)[0] in names))
        )
    return False


def _in_checkpoints(entry):
    if not entry.is_dir(follow_symlinks=False):
        return False

    if is_leftover(entry.name):
        return True  # an interrupted save's or clean-up's: the next save deletes it anyway
    if not _STEP_DIR.match(entry.name):
        return False

    names = {
        MANIFEST_FILE,
        MODEL_FILE,
        OPTIMIZER_FILE,
        RNG_FILE,
        TRAINER_STATE_FILE,
        SHARDS_METADATA_FILE,
        PROJECTION_FILE,
        "config.yaml",
        "student_config.json",
    }
    try:  # and whatever else the checkpoint's own manifest lists
        listed = json.loads((Path(entry.path) / MANIFEST_FILE).read_text()).get("files")
        names |= set(listed) if isinstance(listed, dict) else set()
    except (OSError, ValueError, AttributeError):
        pass
    return lambda e: e.is_file(follow_symlinks=False) and (e.name in names or bool(_DCP_SHARD.match(e.name)))


def foreign_in_checkpoint(step_dir: Path) -> list[str]:
    """Paths (relative to its ``checkpoints`` directory) inside checkpoint ``step_dir`` that lmdistill
    did not write (not listed in its manifest): what pruning it must not delete."""
    found = _foreign_below(step_dir.parent, lambda e: e.name != step_dir.name or _in_checkpoints(e))
    return [path for path in found if path.startswith(f"{step_dir.name}/")]


def _in_model_dir(entry):
    """save_pretrained's files: the model's, the tokenizer's, and the code of a remote-code model."""
    if entry.is_dir(follow_symlinks=False):
        return entry.name == "additional_chat_templates" and (
            lambda e: e.is_file(follow_symlinks=False) and e.name.endswith(".jinja")
        )
    if not entry.is_file(follow_symlinks=False):
        return False
    name = entry.name
    return (
        name in _MODEL_FILES
        or bool(_MODEL_SHARD.match(name))
        or (name.endswith(".py") and name in _remote_code(Path(entry.path).parent))
    )


def _remote_code(directory: Path) -> set[str]:
    """The .py files a remote-code model's config.json / tokenizer_config.json name in ``auto_map``."""
    files = set()
    for config in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((directory / config).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for value in auto_map.values() if isinstance(auto_map, dict) else ():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and "." in ref:
                    files.add(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return files


MANIFEST_FILE = "manifest.json"


MODEL_FILE = "model.safetensors"


OPTIMIZER_FILE = "optimizer.pt"


RNG_FILE = "rng_state.pt"


TRAINER_STATE_FILE = "trainer_state.json"


SHARDS_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's map of the shards


PROJECTION_FILE = "hidden_projection.safetensors"


# Exactly the scratch directories lmdistill makes (``.tmp-step-N-<pid>``, ``.tmp-step-N-shards``,
# ``.trash-step-N-<pid>``): only these are deleted as leftovers; any other name is the user's.
_LEFTOVER = re.compile(r"^\.(tmp|trash)-step-\d+-(\d+|shards)$")


def is_leftover(name: str) -> bool:
    return bool(_LEFTOVER.match(name))
