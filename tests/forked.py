"""The lmdistill command in processes forked from a warm server: real processes (a SIGKILL or a
kill drill's ``os._exit`` ends only them) without paying the imports again for each one.

multiprocessing's forkserver starts one fresh interpreter that imports torch, transformers,
accelerate, datasets and lmdistill once; every ``start_cli`` forks it. The server itself never
runs a torch operation, so each child starts with clean thread pools.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

_PRELOAD = [
    "forked",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "safetensors.torch",
    "tokenizers",
    "transformers.models.llama.modeling_llama",
    "torch.utils.tensorboard",
    "lmdistill.cli",
    "lmdistill.training.trainer",
    "lmdistill.report",
]
_context = None


def _ctx():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def start_cli(*args: str, log: str | None = None) -> multiprocessing.Process:
    """Start ``lmdistill ARGS`` in a forked process; its stdout and stderr go to ``log`` (or nowhere).
    ``exitcode`` is the command's exit code, or -9 after a SIGKILL."""
    process = _ctx().Process(target=_run, args=(list(args), log), daemon=True)
    process.start()
    return process


def run_cli_forked(*args: str, log: str | None = None, timeout: float = 600) -> int:
    """Run ``lmdistill ARGS`` in a forked process to the end; its exit code."""
    process = start_cli(*args, log=log)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        raise TimeoutError(f"lmdistill {' '.join(args)} did not end within {timeout} s")
    return process.exitcode


def _run(argv: list[str], log: str | None) -> None:
    fd = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    from lmdistill.cli import main

    sys.exit(main(argv))
