"""The original report's "what to monitor" list as live, named health checks with a verdict.

The original report's list -> check name:
  total loss > 20 at start          -> start_loss
  spikes such as 17 -> 25 -> 17     -> loss_spike   (detector in guards.SpikeDetector)
  any NaN warning                   -> nonfinite
  perplexity > 1M after step 5000   -> eval_ppl     (5000 of 25000 steps = 20% of the run)
  loss not decreasing steadily      -> loss_plateau
and one more, because a distillation is only as good as its teacher:
  teacher worse than a uniform guess -> teacher_ppl (held-out perplexity above the vocabulary size)
Each check fires with one warning line and a health event in metrics.jsonl; the
final state of every check goes to health.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmdistill.config import HealthConfig


@dataclass
class Check:
    name: str
    description: str
    status: str = "passed"  # passed | fired | not_reached
    steps: list = field(default_factory=list)
    messages: list = field(default_factory=list)

    def fire(self, step: int, message: str) -> tuple[str, str]:
        self.status = "fired"
        self.steps.append(step)
        self.messages.append(message)
        return self.name, message


class HealthMonitor:
    def __init__(self, cfg: HealthConfig, total_steps: int, vocab_size: int | None = None):
        self.cfg = cfg
        self.ppl_after_step = cfg.ppl_after_step if cfg.ppl_after_step is not None else int(0.2 * total_steps)
        self.window = cfg.plateau_window or max(10, total_steps // 10)
        self.checks = {
            "start_loss": Check("start_loss", f"first training loss at most {cfg.start_loss_max:g}"),
            "loss_spike": Check("loss_spike", "no loss spike (a jump well above the recent median)"),
            "nonfinite": Check("nonfinite", "no NaN or Inf in the loss terms or the gradient"),
            "eval_ppl": Check("eval_ppl", f"eval perplexity at most {cfg.ppl_max:g} after step {self.ppl_after_step}"),
            "loss_plateau": Check(
                "loss_plateau",
                f"mean loss falls from one {self.window}-step window to the next "
                f"(fires after {cfg.plateau_patience} windows without a new low)",
            ),
            "teacher_ppl": Check(
                "teacher_ppl",
                f"the teacher's held-out perplexity is below a uniform guess over the vocabulary ({vocab_size or 'V'})",
            ),
        }
        self.vocab_size = vocab_size
        self._first_loss_seen = False
        self._teacher_judged = False
        self._eval_checked = False
        self._window_losses: list[float] = []
        self._best_window_mean = math.inf
        self._windows_without_low = 0
        self._windows_done = 0

    # Each hook returns the (check, message) pairs that fired, for the caller to print and log.
    def on_train_loss(self, step: int, loss: float) -> list[tuple[str, str]]:
        fired = []
        if not self._first_loss_seen and math.isfinite(loss):
            self._first_loss_seen = True
            if loss > self.cfg.start_loss_max:
                fired.append(
                    self.checks["start_loss"].fire(
                        step,
                        f"start loss {loss:.2f} is above {self.cfg.start_loss_max:g}: check the temperature "
                        "(T^2 scales the KD term), kd_weight and the teacher",
                    )
                )
        if math.isfinite(loss):
            self._window_losses.append(loss)
        if len(self._window_losses) >= self.window:
            mean = sum(self._window_losses) / len(self._window_losses)
            self._window_losses = []
            self._windows_done += 1
            if mean < self._best_window_mean:
                self._best_window_mean = mean
                self._windows_without_low = 0
            else:
                self._windows_without_low += 1
                if self._windows_without_low >= self.cfg.plateau_patience:
                    self._windows_without_low = 0
                    fired.append(
                        self.checks["loss_plateau"].fire(
                            step,
                            f"mean loss {mean:.3f} over the last {self.window} steps is not below the best "
                            f"window ({self._best_window_mean:.3f}) for {self.cfg.plateau_patience} windows: "
                            "lower train.lr or check the data",
                        )
                    )
        return fired

    def on_spike(self, step: int, loss: float, median: float, action: str) -> list[tuple[str, str]]:
        return [
            self.checks["loss_spike"].fire(
                step, f"loss spike at step {step}: {loss:.3f} against a recent median of {median:.3f} ({action})"
            )
        ]

    def on_nonfinite(self, step: int, term: str) -> list[tuple[str, str]]:
        return [
            self.checks["nonfinite"].fire(step, f"non-finite {term} at step {step}: step skipped, weights untouched")
        ]

    def on_eval(self, step: int, ppl: float, teacher_ppl: float | None = None) -> list[tuple[str, str]]:
        fired = []
        if teacher_ppl is not None and self.vocab_size and not self._teacher_judged:
            self._teacher_judged = True  # once: a frozen teacher on fixed blocks gives the same figure
            if not teacher_ppl <= self.vocab_size:  # NaN too
                fired.append(
                    self.checks["teacher_ppl"].fire(
                        step,
                        f"the teacher's held-out perplexity {teacher_ppl:.4g} is worse than a uniform guess over "
                        f"its {self.vocab_size} tokens: check the teacher (its weights, its tokenizer, "
                        "model.teacher_dtype)",
                    )
                )
        return fired + self._on_student_eval(step, ppl)

    def _on_student_eval(self, step: int, ppl: float) -> list[tuple[str, str]]:
        if step < self.ppl_after_step:
            return []
        self._eval_checked = True
        if not (ppl <= self.cfg.ppl_max):  # catches NaN too
            return [
                self.checks["eval_ppl"].fire(
                    step, f"eval perplexity {ppl:.4g} is above {self.cfg.ppl_max:g} after step {self.ppl_after_step}"
                )
            ]
        return []

    def finalize(self) -> dict:
        if not self._eval_checked and self.checks["eval_ppl"].status == "passed":
            self.checks["eval_ppl"].status = "not_reached"
        if self._windows_done < self.cfg.plateau_patience + 1 and self.checks["loss_plateau"].status == "passed":
            self.checks["loss_plateau"].status = "not_reached"
        if not self._first_loss_seen:
            self.checks["start_loss"].status = "not_reached"
        if not self._teacher_judged and self.checks["teacher_ppl"].status == "passed":
            self.checks["teacher_ppl"].status = "not_reached"  # no teacher was evaluated
        fired = [c.name for c in self.checks.values() if c.status == "fired"]
        return {
            "verdict": "attention" if fired else "healthy",
            "fired": fired,
            "checks": [vars(c).copy() for c in self.checks.values()],
        }

    def state_dict(self) -> dict:
        return {
            "checks": {k: vars(c).copy() for k, c in self.checks.items()},
            "private": {k: v for k, v in vars(self).items() if k.startswith("_")},
        }

    def load_state_dict(self, state: dict) -> None:
        for name, values in state["checks"].items():
            self.checks[name] = Check(**values)
        for key, value in state["private"].items():
            setattr(self, key, value)


def verdict_line(health: dict) -> str:
    total = len(health["checks"])
    if health["verdict"] == "healthy":
        passed = sum(c["status"] == "passed" for c in health["checks"])
        return f"HEALTHY: no check fired ({passed} passed, {total - passed} not reached in this run)"
    return f"ATTENTION: {len(health['fired'])} of {total} checks fired: {', '.join(health['fired'])}"
