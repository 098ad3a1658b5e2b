"""metrics.jsonl and TensorBoard, written side by side from the main process.

Every line goes to metrics.jsonl first (flushed at once, so a killed run keeps all
lines up to the kill) and every numeric value also becomes a TensorBoard scalar
under the same name. Skipped steps and health events become TensorBoard text.
metrics.jsonl is strict JSON: a non-finite value is written as null, with its key listed in
the line's ``nonfinite`` field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Scalars grouped under a TensorBoard section so the dashboard reads well.
_TB_SECTIONS = {
    "loss": "train",
    "kd_loss": "train",
    "kd_loss_unscaled": "train",
    "ce_loss": "train",
    "grad_norm": "train",
    "temperature": "schedule",
    "lr": "schedule",
    "tokens_per_s": "speed",
}


def tb_tag(key: str) -> str:
    if key.startswith(("eval_", "teacher_", "top1")):
        return f"eval/{key}"
    return f"{_TB_SECTIONS.get(key, 'other')}/{key}"


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, accelerator=None):
        self.enabled = enabled
        self._accelerator = accelerator  # extra trackers (wandb, mlflow, ...) via accelerate.log
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run; close() closes it)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self._file.flush()
        step = int(record.get("step", 0))
        numeric = {
            k: v
            for k, v in record.items()
            if k not in ("step", "epoch") and not isinstance(v, bool) and isinstance(v, (int, float))
        }
        if self._accelerator is not None and numeric:
            self._accelerator.log(numeric, step=step)
        if self._tb is None:
            return
        if record.get("skipped"):
            self._tb.add_scalar("events/skipped_step", 1.0, step)
            self._tb.add_text("events/skipped", f"step {step}: {record.get('reason')}", step)
        if "health" in record:
            self._tb.add_scalar(f"health/{record['health']}", 1.0, step)
            self._tb.add_text("events/health", f"step {step}: [{record['health']}] {record.get('message', '')}", step)
        if "event" in record:
            self._tb.add_text("events/other", f"step {step}: {record['event']} {record.get('message', '')}", step)
        for key, value in numeric.items():
            self._tb.add_scalar(tb_tag(key), value if math.isfinite(value) else float("nan"), step)

    def close(self) -> None:
        if self._accelerator is not None:
            self._accelerator.end_training()
            self._accelerator = None
        if self._file:
            self._file.close()
            self._file = None
        if self._tb:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def strict_json(record: dict) -> dict:
    """``record`` as strict JSON allows: a NaN or infinite value becomes null, and its key is
    listed under ``nonfinite`` (a NaN loss is a fact worth keeping, not a parse error)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}


def read_metrics(path: Path, bad_lines: list[int] | None = None) -> list[dict]:
    """The JSON objects of a metrics.jsonl, in order. A line that does not parse (the last
    one, cut short by a kill) is skipped; its 1-based number is appended to ``bad_lines``."""
    records = []
    if not path.exists():
        return records
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif bad_lines is not None:
                bad_lines.append(lineno)
    return records
