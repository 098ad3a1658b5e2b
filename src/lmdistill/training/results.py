"""What a training step and a whole run hand back: ``StepResult`` (and its metrics line) and ``RunResult``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmdistill.training.guards import Decision, StepStats


@dataclass
class RunResult:
    run_dir: Path
    status: str
    steps: int
    initial: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)
    student_dir: Path | None = None


@dataclass
class StepResult:
    """What one optimizer step did, for logging and the progress bar."""

    step: int
    epoch: int
    temperature: float
    lr: float
    stats: StepStats
    decision: Decision
    tokens_per_s: float
    seconds: float = 0.0  # the step's wall-clock time

    def record(self) -> dict:
        """The step's line in metrics.jsonl."""
        s = self.stats
        line = {
            "step": self.step,
            "epoch": self.epoch,
            "temperature": self.temperature,
            "lr": self.lr,
            "loss": s.loss,
            "kd_loss": s.kd,
            "kd_loss_unscaled": s.kd_unscaled,
            "ce_loss": s.ce,
            "grad_norm": s.grad_norm,
            "tokens_per_s": self.tokens_per_s,
        }
        if s.hidden is not None:
            line["hidden_loss"] = s.hidden
        if not self.decision.applies_update:
            line = {
                "step": self.step,
                "skipped": True,
                "reason": self.decision.reason,
                **{k: v for k, v in line.items() if k != "step"},
            }
        return line
