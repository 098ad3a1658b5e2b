"""The ``lmdistill`` command: train, eval, report, export, prune, cache-teacher,
config-reference. Each command's flags and its call into ``lmdistill.jobs`` (or the trainer) are in
its own module here; this one parses, dispatches, and turns errors into one line and an exit code.

User errors (``LmdistillError``) end as one line on stderr and a non-zero exit code;
a traceback means a bug in lmdistill.

Exit codes: 0 success, 2 bad input or environment, 3 training stopped by a guard
(too many consecutive non-finite steps or rollbacks), 128 + the signal after SIGTERM, SIGINT or
SIGHUP (143, 130, 129), 141 when the reader of the output went away.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import os
import sys

from lmdistill.cli import eval as eval_command
from lmdistill.cli import tools
from lmdistill.cli import train as train_command
from lmdistill.core.errors import LmdistillError

COMMANDS = {
    "train": train_command.run,
    "eval": eval_command.run,
    "report": tools.report,
    "export": tools.export,
    "prune": tools.prune,
    "cache-teacher": tools.cache_teacher,
    "config-reference": tools.config_reference,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdistill", description="Knowledge distillation for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    train_command.add_parser(sub)
    eval_command.add_parser(sub)
    tools.add_parsers(sub)
    return parser


def _torch_oom() -> type:
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not faulthandler.is_enabled():
        # One process of a launch dying in native code (an abort in a collective library) otherwise
        # leaves only the launcher's exit code; this writes every thread's Python stack to stderr.
        faulthandler.enable()
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        if sys.stdout is not None:  # None when the process was started with stdout closed
            sys.stdout.flush()  # a reader that went away (| head) shows here, not as a warning at exit
        return code
    except BrokenPipeError:  # the reader of our output went away: nothing to say, and no one to say it to
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a process the pipe ended
    except LmdistillError as exc:
        print(f"lmdistill: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (MemoryError, _torch_oom()) as exc:  # a failed allocation on the CPU or the GPU
        first = (str(exc).splitlines() or ["out of memory"])[0][:160]
        print(
            f"lmdistill: error: out of memory ({first}); lower train.batch_size (raise train.grad_accum to keep "
            "the batch), use loss.impl=chunked, or a smaller data.block_size",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("lmdistill: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a write (or read) the file system refused: say where and why
        print(f"lmdistill: error: {os_error_message(exc)}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at os.devnull, so that the flush at exit does not fail again on the closed pipe
    (the pattern of Python's signal documentation, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured, or closed)
        pass


def os_error_message(exc: OSError) -> str:
    """One line for a file-system error: the path, the cause, what to do."""
    path = exc.filename or "standard output or a file"
    reason = exc.strerror or str(exc) or type(exc).__name__
    disk = f"the disk that holds {path}" if exc.filename else "its disk"
    advice = {
        errno.ENOSPC: f"free space on {disk}; files written before are kept",
        errno.EDQUOT: f"free space on {disk}; files written before are kept",
        errno.EROFS: "write somewhere else: that file system is read-only",
        errno.EACCES: "choose a path you may write to, or change its permissions",
        errno.EPERM: "choose a path you may write to, or change its permissions",
        errno.EISDIR: "it is a directory; give a file name",
        errno.ENOTDIR: "a part of the path is a file, not a directory; fix the path",
        errno.ENOENT: "check the path",
    }.get(exc.errno, "check the path and the file system")
    return f"{reason}: {path}; {advice}"


if __name__ == "__main__":
    sys.exit(main())
