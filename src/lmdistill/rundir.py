"""The run directory: where a run's files go, and the rules for reusing one.

Layout (tools and tests read it)::

    runs/NAME/
      config.yaml        the resolved config
      metrics.jsonl      one JSON object per line (training, eval, skipped steps, health events)
      health.json        each health check: passed, fired (at which steps) or not reached
      run.json           status, models, data, final numbers
      checkpoints/       step-N/ with a SHA-256 manifest (checkpoint.py)
      tokenizer/         the tokenizer, once per run: with a checkpoint it makes a model
      student/           the final student: save_pretrained + tokenizer
      tensorboard/       event files
      report.md, plots/

A directory is reused only on purpose: ``--resume`` continues an unfinished run,
``--overwrite`` replaces a run; anything else that is not empty is refused.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from .errors import LmdistillError
from .paths import atomic_write, atomic_write_json, replace_dir

_RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "checkpoints")


class RunDirectory:
    """One run's directory; the trainer writes it through these methods (main process only)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ choosing
    @classmethod
    def for_config(cls, cfg) -> "RunDirectory":
        """The run directory for ``cfg``, refusing to clobber an existing run unless asked."""
        if cfg.run.output_dir is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            base = Path("runs") / f"{cfg.run.name}-{stamp}"
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
            return cls(path)
        path = Path(cfg.run.output_dir).expanduser()
        run = cls(path)
        if path.exists() and not path.is_dir():
            raise LmdistillError(f"output directory '{path}' is a file; choose another --output-dir")
        if path.exists() and any(path.iterdir()) and not run.looks_like_a_run():
            # --overwrite deletes the directory: only ever one that lmdistill wrote.
            raise LmdistillError(
                f"output directory '{path}' is not empty and is not an lmdistill run; choose another --output-dir"
            )
        if cfg.run.resume:
            if run.read_json("run.json").get("status") == "finished":
                raise LmdistillError(f"the run in '{path}' already finished; there is nothing to resume (its student "
                                     f"is in {path / 'student'})")
            return run  # a missing or empty directory simply starts from step 0
        if path.exists() and any(path.iterdir()) and not cfg.run.overwrite:
            status = run.read_json("run.json").get("status")
            if status == "finished" or (path / "student").exists():
                raise LmdistillError(
                    f"output directory '{path}' already holds a finished run; choose another --output-dir or pass "
                    "--overwrite to replace it"
                )
            raise LmdistillError(
                f"output directory '{path}' holds an unfinished run (status: {status or 'unknown'}); pass --resume "
                "to continue it from its newest checkpoint, --overwrite to start it over, or another --output-dir"
            )
        return run

    def looks_like_a_run(self) -> bool:
        """A directory lmdistill wrote (possibly killed before its first file was complete)."""
        return any((self.path / name).exists() for name in _RUN_FILES)

    # ------------------------------------------------------------------ writing
    def create(self, cfg) -> None:
        """Start the directory afresh (replacing a run under --overwrite) with the config in it."""
        if self.path.exists() and cfg.run.overwrite:
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path / "config.yaml", cfg.to_run_yaml())
        except OSError as exc:
            raise LmdistillError(f"cannot write the run directory '{self.path}': {exc.strerror}; choose a writable "
                                 "--output-dir") from None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def read_json(self, name: str) -> dict:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_json(self.path / name, data)

    def trim_metrics(self, step: int) -> None:
        """Drop metrics lines a resumed run will write again (training lines from ``step`` on).

        The eval at ``step`` was written just before the checkpoint it resumes from; it stays.
        """
        from .tracking import read_metrics

        if not self.metrics.exists():
            return
        kept = [r for r in read_metrics(self.metrics) if r.get("step", 0) < step
                or (0 < step == r.get("step") and ("eval_ce_loss" in r or r.get("health") == "eval_ppl"))]
        atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def save_student(self, model, tokenizer) -> Path:
        """save_pretrained + tokenizer into ``student/``, atomically, refusing non-finite weights."""
        from transformers.utils import logging as hf_logging

        from .checkpoint import first_nonfinite_tensor

        bad = first_nonfinite_tensor(model.state_dict())
        if bad is not None:
            raise LmdistillError(f"refusing to save the student: tensor '{bad}' holds NaN or Inf; the previous "
                                 "files are kept")
        final, tmp = self.path / "student", self.path / ".student.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        hf_logging.disable_progress_bar()  # one tiny file does not need a "Writing model shards" bar
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final, aside_name=".student.old")
        return final

    def warn_if_resume_differs(self, checkpoint: Path, cfg, teacher_ref: dict | None) -> None:
        """Warn when a resume would not continue the same run: a changed config or teacher."""
        from .config import Config, load_yaml

        saved_path = self.path / "config.yaml"
        if saved_path.is_file():
            saved, now = Config.from_dict(load_yaml(saved_path)).to_dict(), cfg.to_dict()
            for key in ("resume", "overwrite"):
                saved["run"][key] = now["run"][key]
            changed = [f"{section}.{key}" for section in now for key in now[section]
                       if saved.get(section, {}).get(key) != now[section][key]]
            if changed:
                print(f"warning: resuming with a changed config ({', '.join(changed)}); the resumed run will not match "
                      "an uninterrupted one")
        if teacher_ref:
            saved_teacher = json.loads((checkpoint / "trainer_state.json").read_text()).get("teacher") or {}
            if saved_teacher.get("hash") and saved_teacher.get("hash") != teacher_ref.get("hash"):
                print(f"warning: the teacher at {teacher_ref['source']} changed since the checkpoint was written "
                      f"(content hash differs); resuming with the changed teacher")
