"""GGUF model files (llama.cpp's format) as teachers and students.

transformers reads a GGUF file itself: ``from_pretrained(dir, gguf_file=name)`` parses the
metadata into a config and a tokenizer and dequantizes every tensor. For a 135M model that
takes about 30 s on two CPU cores, most of it parsing metadata in Python, and the result
still carries a ``quantization_config`` that ``save_pretrained`` refuses. So a GGUF file is
converted once into an ordinary Hugging Face directory (fp32 safetensors, the tokenizer with
its chat template, no quantization settings), kept under
``$LMDISTILL_HOME/gguf/<first 16 hex digits of the file's SHA-256>``; every later start
finds it by the file's content and loads it in seconds. A different file, even under the same
name, gets its own directory; a renamed or moved copy of the same file finds the old one.

The conversion is written into a temporary directory and renamed into place with its
record (``lmdistill-gguf.json``) written last, under a file lock, so a killed conversion is
never used and two processes (the ranks of one launch) convert once between them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch

from lmdistill.core.errors import LmdistillError, last_line
from lmdistill.core.paths import atomic_write_json, cache_home, exclusive_lock, replace_dir, sha256_file

RECORD = "lmdistill-gguf.json"
FORMAT_VERSION = 1
_digests: dict[tuple, str] = {}  # (path, size, mtime, inode) -> SHA-256, for one process


def gguf_file_of(source: str, role: str) -> Path | None:
    """The GGUF file ``source`` names: the file itself, or the one ``.gguf`` file of a directory
    that has no config.json. None when ``source`` is not a GGUF model."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve() if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise LmdistillError(
            f"{role} '{source}' holds {len(found)} GGUF files ({names}); give the one to use: {role} {found[0]}"
        )
    return found[0].resolve() if found else None


def sha256_of(path: Path) -> str:
    """The file's SHA-256 (hex), computed once per process for an unchanged file."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def conversions_home() -> Path:

    return cache_home() / "gguf"


def converted_dir(path: Path, role: str, *, home: Path | None = None, say=print) -> Path:
    """The Hugging Face directory converted from the GGUF file ``path``, converted now if it has
    not been yet."""
    if importlib.util.find_spec("gguf") is None:
        raise LmdistillError(
            f"{role} '{path}' is a GGUF file, and reading one needs the gguf package: pip install 'lmdistill[gguf]'"
        )
    digest = sha256_of(path)
    home = home or conversions_home()
    final = home / digest[:16]
    if _is_complete(final, digest):
        return final
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmdistillError(
            f"cannot write the converted GGUF model in '{home}' ({exc.strerror or exc}); set "
            "LMDISTILL_HOME to a writable directory"
        ) from None
    with exclusive_lock(
        home / f"{final.name}.lock",
        "GGUF conversion lock",
        lambda holder: say(f"waiting for another process ({holder}) to finish converting {path.name}"),
    ):
        if _is_complete(final, digest):  # converted by the process we waited for
            return final
        for stale in home.glob(f".{final.name}.tmp-*"):  # a killed conversion's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # no record: not ours, or damaged; a rename cannot go over it
            raise LmdistillError(
                f"'{final}' exists but is not a finished conversion of '{path}'; remove it and start again"
            )
        size = path.stat().st_size
        say(
            f"converting the GGUF file {path.name} ({role}, {size / 2**20:,.0f} MiB) to a Hugging Face model in "
            f"{final} (once: later starts load the converted copy)"
        )
        started = time.perf_counter()
        tmp = home / f".{final.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            info = _convert(path, tmp, role)
            atomic_write_json(
                tmp / RECORD,
                {
                    "format": "lmdistill-gguf-conversion",
                    "version": FORMAT_VERSION,
                    "source": str(path),
                    "sha256": digest,
                    "bytes": size,
                    **info,
                },
                fsync=True,
            )
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(
            f"converted in {time.perf_counter() - started:.1f} s: {info['architecture']}, "
            f"{info['parameters']:,} parameters"
        )
    return final


def _is_complete(final: Path, digest: str) -> bool:
    try:
        record = json.loads((final / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("sha256") == digest and record.get("version") == FORMAT_VERSION


def _convert(path: Path, out: Path, role: str) -> dict:
    """Load ``path`` with transformers' GGUF reader and save it, tokenizer included, as an
    ordinary model in ``out``. Returns what the record says about it."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the reader's errors: unsupported architecture, bad magic, truncated data, ...
        raise _read_error(path, role, exc) from None
    # The loaded model is dequantized, but it is marked as quantized (config and quantizer), which
    # save_pretrained refuses. An ordinary model of the same config, without that mark, takes its
    # weights: what is saved is a plain fp32 model, as if it had never been a GGUF file.
    config = AutoConfig.for_model(
        **{k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "model_type")},
        model_type=loaded.config.model_type,
    )
    torch.manual_seed(0)  # the fresh weights are all overwritten; a seed keeps even that repeatable
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for one file is noise
    try:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "parameters": model.num_parameters(),
        "transformers": transformers.__version__,
    }


def _read_error(path: Path, role: str, exc: Exception) -> LmdistillError:
    text = last_line(exc)
    if "is not supported yet" in text or "Unknown gguf model_type" in text:
        import transformers

        return LmdistillError(
            f"{role} '{path}': {text.rstrip('.')} by transformers {transformers.__version__}'s "
            "GGUF reader; use the model's Hugging Face directory (safetensors) instead, or a "
            "transformers release that reads it"
        )
    return LmdistillError(
        f"{role} '{path}' could not be read as a GGUF model ({text}); the file may be damaged or "
        "incomplete: download it again"
    )
