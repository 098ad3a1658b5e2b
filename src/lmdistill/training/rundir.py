"""The run directory: where a run's files go, and the rules for reusing one.

Layout (tools and tests read it)::

    runs/NAME/
      .lmdistill-run     the marker, written first: this directory is an lmdistill run
      .lmdistill.lock    held (flock) by the process writing the run; the OS releases it on exit
      config.yaml        the resolved config (of the latest start, resumes included)
      metrics.jsonl      one JSON object per line (training, eval, skipped steps, health events)
      health.json        each health check: passed, fired (at which steps) or not reached
      run.json           status, models, data, final numbers, the resumes
      checkpoints/       step-N/ with a SHA-256 manifest (checkpoint.py)
      tokenizer/         the tokenizer, once per run: with a checkpoint it makes a model
      student/           the final student: save_pretrained + tokenizer
      tensorboard/       event files
      report.md, plots/

A directory is reused only on purpose: ``--resume`` continues an unfinished run, and
``--overwrite`` replaces a run, removing only what lmdistill wrote: never a directory
without the marker, one holding files lmdistill does not write (anywhere in its tree:
checkpoints/, student/ and the other subdirectories are checked file by file), the current
directory, one of its parents, or the home directory. Anything else that is not empty is
refused. One process writes a run at a time: a second one (train, resume or overwrite) is
refused with the pid and host of the one that holds the lock. The lock and the marker are
never opened through a symbolic link (a planted link would have its target rewritten).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from lmdistill.config import Config, load_yaml
from lmdistill.core.errors import LmdistillError
from lmdistill.core.files import first_nonfinite_tensor
from lmdistill.core.paths import (
    LockHeld,
    atomic_write,
    atomic_write_json,
    claim_lock,
    is_plain_file,
    open_no_link,
    protected_place,
)
from lmdistill.models.loading import save_model_dir
from lmdistill.report.metrics import read_metrics
from lmdistill.training.layout import LOCK, MARKER, _foreign_below, _top_level, _written_by_us

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; one writer is on the user
    fcntl = None

_HELD: dict[Path, object] = {}  # run directories whose lock this process holds -> lock file descriptor

# Keys that change how the models compute, not what: a resume that changes them continues the run
# (compiled or Liger-patched layers compute the same function, to float precision; the startup line
# says what runs).
SAME_COMPUTATION = ("model.compile", "model.liger")


class RunDirectory:
    """One run's directory; the trainer writes it through these methods (main process only, but
    for ``record_abandoned``)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ what is there
    def entries(self) -> list[str]:
        """Names in the directory, the lock file aside (it exists while anyone looks)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK or not is_plain_file(p))

    def is_run(self) -> bool:
        """A directory lmdistill wrote: its marker, or (written before the marker existed) a
        run.json of a training run beside only files lmdistill writes."""
        if is_plain_file(self.path / MARKER):  # a link named like the marker proves nothing
            return True
        legacy = self.read_json("run.json").get("command") == "train"
        return legacy and all(_written_by_us(name) for name in self.entries())

    def foreign_entries(self) -> list[str]:
        """Paths (relative, the whole tree) that lmdistill did not write: what --overwrite must
        not delete. Links count as foreign (lmdistill writes none)."""
        if not self.path.is_dir():
            return []
        return _foreign_below(self.path, _top_level)

    def status(self) -> str | None:
        return self.read_json("run.json").get("status")

    # ------------------------------------------------------------------ choosing
    @classmethod
    def for_config(cls, cfg) -> RunDirectory:
        """The run directory for ``cfg``, refusing to clobber anything unless asked, and never
        to clobber what lmdistill did not write. Checks only; nothing is written here."""
        if cfg.run.output_dir is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            base = Path("runs") / f"{cfg.run.name}-{stamp}"
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
            return cls(path)
        run = cls(Path(cfg.run.output_dir).expanduser())
        run.check_reuse(cfg)
        run.check_writable()
        return run

    def check_writable(self) -> None:
        """The directory, or the nearest existing one above it, must take new files (checked now,
        before minutes of loading; a read-only file system counts as not writable)."""
        existing = self.path.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
            raise LmdistillError(
                f"cannot write the run directory '{self.path}': {existing} is not writable (or on a "
                "read-only file system); choose another --output-dir"
            )

    def refuse_if_in_use(self) -> None:
        """LmdistillError naming the holder when another process holds the run's lock."""
        holder = self._holder()
        if holder is not None:
            raise LmdistillError(
                f"output directory '{self.path}' is in use by another lmdistill process ({holder}); "
                "wait for it to end, or choose another --output-dir"
            )

    def check_reuse(self, cfg) -> None:
        """The rules for an existing ``output_dir``; LmdistillError when they refuse."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise LmdistillError(f"output directory '{path}' is a file; choose another --output-dir")
        self.refuse_if_in_use()
        if cfg.run.overwrite:
            _refuse_protected(path)
        if not self.entries():
            return  # a new run (--resume too: a restart loop can always pass it)
        if not self.is_run():
            raise LmdistillError(
                f"output directory '{path}' is not empty and is not an lmdistill run; choose another --output-dir"
            )
        status = self.status()
        finished = status == "finished" or (path / "student").exists()
        if cfg.run.resume:
            if finished:
                raise LmdistillError(
                    f"the run in '{path}' already finished; there is nothing to resume (its "
                    f"student is in {path / 'student'})"
                )
            if self.checkpoints.exists() and not self.checkpoints.is_dir():
                raise LmdistillError(
                    f"'{self.checkpoints}' is a file, not the run's checkpoint directory; rename "
                    "or remove it, then resume (without a checkpoint the run starts again from "
                    "step 0)"
                )
            return
        if cfg.run.overwrite:
            foreign = self.foreign_entries()
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise LmdistillError(
                    f"output directory '{path}' holds files lmdistill did not write ({shown}); "
                    "--overwrite only replaces what lmdistill wrote: move them, or choose another "
                    "--output-dir"
                )
            return
        if finished:
            raise LmdistillError(
                f"output directory '{path}' already holds a finished run; choose another "
                "--output-dir or pass --overwrite to replace it"
            )
        raise LmdistillError(
            f"output directory '{path}' holds an unfinished run (status: {status or 'unknown'}); pass --resume "
            "to continue it from its newest checkpoint, --overwrite to start it over, or another --output-dir"
        )

    # ------------------------------------------------------------------ writing
    def open_for_writing(self, cfg) -> None:
        """Take the run's lock (creating the directory), then check the reuse rules again under
        it: another process may have written here since ``for_config`` looked."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LmdistillError(
                f"cannot create the run directory '{self.path}': {exc.strerror}; choose a writable --output-dir"
            ) from None
        self._lock()
        self.check_reuse(cfg)

    def _holder(self) -> str | None:
        """Who holds this run's lock, when another process does (a probe: taken and let go)."""
        lock = self.path / LOCK
        if fcntl is None or self.path.resolve() in _HELD or not os.path.lexists(lock):
            return None
        try:
            fd = open_no_link(lock, os.O_RDONLY, "run lock")  # a link there: one line naming it
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _lock(self) -> None:
        key = self.path.resolve()
        if fcntl is None or key in _HELD:
            return
        try:
            _HELD[key] = claim_lock(self.path / LOCK, "run lock")
        except LockHeld as held:
            raise LmdistillError(
                f"output directory '{self.path}' is in use by another lmdistill process "
                f"({held.holder}); wait for it to end, or choose another --output-dir"
            ) from None
        except OSError as exc:
            raise LmdistillError(
                f"cannot write in the run directory '{self.path}': {exc.strerror}; choose a writable --output-dir"
            ) from None

    def release(self) -> None:
        """Let go of the lock (the end of a run; the OS does it too when the process ends)."""
        fd = _HELD.pop(self.path.resolve(), None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def record_abandoned(self, reason: str) -> bool:
        """For a process that does not write the run, after another one died: mark run.json
        "failed" with ``reason`` if it still says "running" and no process holds the run's lock,
        i.e. the main process is gone (the OS let go of its lock). A live main process records
        the run itself. Returns whether run.json was marked."""
        if not is_plain_file(self.path / "run.json"):
            return False  # (not written yet, or on a file system this machine does not share)
        try:
            self._lock()
        except LmdistillError:
            return False
        try:
            info = self.read_json("run.json")
            if info.get("status") != "running":
                return False
            info.update(
                status="failed",
                exit_reason=reason,
                finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            self.write_json("run.json", info)
            return True
        finally:
            self.release()

    def create(self, cfg) -> None:
        """Start the run afresh: under --overwrite, remove what the old run wrote (the lock
        stays: this process holds it); then the marker, first, and the config."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if cfg.run.overwrite:
                for name in self.entries():
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
            self.mark()
            atomic_write(self.path / "config.yaml", cfg.to_run_yaml())
        except OSError as exc:
            raise LmdistillError(
                f"cannot write the run directory '{self.path}': {exc.strerror}; choose a writable --output-dir"
            ) from None

    def mark(self) -> None:
        if not is_plain_file(self.path / MARKER):  # (the rename replaces a link, never writes through it)
            atomic_write_json(
                self.path / MARKER,
                {
                    "format": "lmdistill-run",
                    "version": 1,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                },
            )

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def read_json(self, name: str) -> dict:
        try:
            data = json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_json(self.path / name, data)

    def trim_metrics(self, step: int, total_steps: int | None = None) -> None:
        """Drop the metrics lines a resumed run writes again: training lines from ``step`` on, and
        evaluations after it. The evaluation at ``step`` was written just before the checkpoint
        the run resumes from and stays, unless it is the final one, which is done again."""

        if not self.metrics.exists():
            return
        keep_eval_at_step = step > 0 and step != total_steps
        kept = [
            r
            for r in read_metrics(self.metrics)
            if r.get("step", 0) < step
            or (keep_eval_at_step and step == r.get("step") and ("eval_ce_loss" in r or r.get("health") == "eval_ppl"))
        ]
        atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def save_student(self, model, tokenizer) -> Path:
        """save_pretrained + tokenizer into ``student/``, atomically, refusing non-finite weights."""

        bad = first_nonfinite_tensor(model.state_dict())
        if bad is not None:
            raise LmdistillError(
                f"refusing to save the student: tensor '{bad}' holds NaN or Inf; the previous files are kept"
            )
        final = self.path / "student"
        try:
            return save_model_dir(model, tokenizer, final)
        except OSError as exc:
            raise LmdistillError(
                f"could not save the student in '{final}': {exc.strerror}; fix that (free disk "
                "space?), then run again with --resume: the final checkpoint is kept"
            ) from None

    def warn_if_resume_differs(
        self, checkpoint: Path, cfg, teacher_ref: dict | None, data_layout: dict | None = None, processes: int = 1
    ) -> list[str]:
        """Warn when a resume would not continue the same run (a changed config, teacher or
        data); the changed config keys. Another batch size for another number of processes
        (the same global batch) and another parallel strategy are noted, not warned about: the
        run continues with the same blocks, to float precision."""

        changed = []
        state = json.loads((checkpoint / "trainer_state.json").read_text())["run"]
        saved_path = self.path / "config.yaml"
        if saved_path.is_file():
            saved, now = Config.from_dict(load_yaml(saved_path)).to_dict(), cfg.to_dict()
            for key in ("resume", "overwrite"):
                saved["run"][key] = now["run"][key]
            changed = [
                f"{section}.{key}"
                for section in now
                for key in now[section]
                if saved.get(section, {}).get(key) != now[section][key]
            ]
            layout = [key for key in ("train.batch_size", "parallel.strategy") if key in changed]
            if layout and state.get("global_batch") == cfg.train.batch_size * processes:
                print(
                    f"note: resuming on {processes} process(es) x batch {cfg.train.batch_size} with "
                    f"parallel.strategy = {cfg.parallel.strategy} (the checkpoint's: {state.get('processes')} x "
                    f"{saved['train']['batch_size']}, {saved['parallel']['strategy']}): the same blocks in the "
                    "same order; the numbers follow the uninterrupted run to float precision"
                )
                shown = [key for key in changed if key not in layout]
            else:
                shown = changed
            shown = [key for key in shown if key not in SAME_COMPUTATION]
            if shown:
                print(
                    f"warning: resuming with a changed config ({', '.join(shown)}); the resumed run will "
                    "not match an uninterrupted one"
                )
        saved_data = state.get("data") or {}
        now = data_layout or {}
        moved = any(saved_data.get(key) != now.get(key) for key in ("train", "teacher_stores"))
        if now and saved_data.get("train") and moved:  # (the teacher's tokens: across tokenizers)
            print(
                "warning: the training blocks differ from the checkpoint's (the data, its tokenization or the "
                "block layout changed); the resumed run will not see the blocks an uninterrupted one would"
            )
        if teacher_ref:
            saved_teacher = state.get("teacher") or {}
            if saved_teacher.get("hash") and saved_teacher.get("hash") != teacher_ref.get("hash"):
                print(
                    f"warning: the teacher at {teacher_ref['source']} changed since the checkpoint was written "
                    f"(content hash differs); resuming with the changed teacher"
                )
        return changed


def _refuse_protected(path: Path) -> None:
    """--overwrite never empties the current directory, one of its parents, or the home directory."""
    what = protected_place(path)
    if what is not None:
        raise LmdistillError(
            f"refusing --overwrite of '{path}': it is {what}; give the run's own directory (e.g. runs/NAME)"
        )
