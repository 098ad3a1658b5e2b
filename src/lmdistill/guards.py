"""Protection of the weights: non-finite checks, spike detection, in-memory rollback.

The order of a guarded step is: forward and backward for every micro-batch, then
compute the gradient norm, then *decide*, and only then call ``optimizer.step()``.
A skipped step drops its gradients and leaves parameters and optimizer state
bit-identical. The step counter, both schedules and the data cursor still advance
past it (docs/stability.md), so a run with a skipped step stays aligned with the
same run without the fault.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass

import torch

from .config import DebugConfig

# The terms checked before every optimizer step, in the order they are reported.
CHECKED_TERMS = ("teacher_logits", "kd", "ce", "loss", "grad")


def first_nonfinite(values: dict[str, float]) -> str | None:
    """Name of the first non-finite entry in ``values`` (ordered as CHECKED_TERMS), else None."""
    for name in CHECKED_TERMS:
        if name in values and not math.isfinite(values[name]):
            return name
    return None


class SpikeDetector:
    """A loss is a spike when it is far above the median of the recent window.

    Median and median absolute deviation (MAD) instead of mean and std: one spike
    must not inflate the baseline that judges the next one. Both conditions must
    hold: loss > median * factor (relative size, the seed's 17 -> 25 is 1.47x) and
    loss - median > mad_k * MAD (outside the normal noise of small batches).
    """

    def __init__(self, window: int, warmup: int, factor: float, mad_k: float):
        self.window = window
        self.warmup = warmup
        self.factor = factor
        self.mad_k = mad_k
        self.history: deque[float] = deque(maxlen=window)

    def median(self) -> float:
        values = sorted(self.history)
        n = len(values)
        return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])

    def judge(self, loss: float) -> tuple[bool, float]:
        """(is_spike, median) for ``loss``; does not record it."""
        if len(self.history) < max(self.warmup, 3) or not math.isfinite(loss):
            return False, float("nan")
        med = self.median()
        mad = sorted(abs(x - med) for x in self.history)[len(self.history) // 2]
        mad = max(mad, 1e-3 * abs(med), 1e-8)
        return (loss > med * self.factor and loss - med > self.mad_k * mad), med

    def observe(self, loss: float) -> None:
        if math.isfinite(loss):
            self.history.append(loss)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)


@dataclass
class Snapshot:
    step: int
    model: dict
    optimizer: dict


class RollbackStore:
    """Known-good copies of the student and optimizer state, held on the CPU.

    Costs ``keep`` x (weights + optimizer state) of host memory, which is why it is
    only filled when the spike policy is ``rollback``.
    """

    def __init__(self, keep: int, interval: int):
        self.interval = interval
        self.snapshots: deque[Snapshot] = deque(maxlen=keep)

    def maybe_save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step % self.interval:
            return
        to_cpu = lambda obj: copy.deepcopy(  # noqa: E731 - a one-off mapper
            {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in obj.items()}
        )
        opt_state = optimizer.state_dict()
        opt_copy = {"param_groups": copy.deepcopy(opt_state["param_groups"]),
                    "state": {k: to_cpu(v) for k, v in opt_state["state"].items()}}
        self.snapshots.append(Snapshot(step, to_cpu(model.state_dict()), opt_copy))

    def restore_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        """Load the newest snapshot into ``model`` and ``optimizer``; its step, or None if empty."""
        if not self.snapshots:
            return None
        snap = self.snapshots[-1]
        model.load_state_dict(snap.model)
        optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        return snap.step


@dataclass
class GuardState:
    """Counters that must survive a checkpoint."""

    consecutive_skips: int = 0
    total_skips: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0


class FaultInjector:
    """Debug faults from ``debug.inject`` and ``debug.loss_multiplier``; silent when empty."""

    def __init__(self, cfg: DebugConfig, rank: int = 0):
        self.faults: dict[tuple[int, str], float] = {}
        for item in cfg.inject:
            if item.get("rank", rank) == rank:
                self.faults[(item["step"], item["where"])] = float(str(item.get("value", "nan")).lower())
        self.loss_multiplier = {int(k): float(v) for k, v in cfg.loss_multiplier.items()}

    @property
    def active(self) -> bool:
        return bool(self.faults or self.loss_multiplier)

    def value(self, step: int, where: str) -> float | None:
        return self.faults.get((step, where))

    def poison(self, tensor: torch.Tensor, step: int, where: str) -> torch.Tensor:
        """``tensor`` with its first element replaced by the injected value (a copy, graph kept)."""
        value = self.value(step, where)
        if value is None:
            return tensor
        out = tensor.clone()
        out.view(-1)[0] = value
        return out

    def describe(self) -> str:
        parts = [f"step {s}: {w}={v}" for (s, w), v in sorted(self.faults.items())]
        parts += [f"step {s}: loss x{f}" for s, f in sorted(self.loss_multiplier.items())]
        return "; ".join(parts)


NONFINITE_ADVICE = {
    "teacher_logits": "the teacher itself produces non-finite logits: check the teacher's weights and dtype "
                      "(try model.teacher_dtype=float32)",
    "kd": "the KD term went non-finite: check the teacher's logits and the data; lower train.lr",
    "ce": "the student's cross-entropy went non-finite: lower train.lr or use mixed_precision=no",
    "loss": "the total loss went non-finite: lower train.lr or check the data",
    "grad": "the gradient norm went non-finite: lower train.lr, keep train.max_grad_norm set, or use "
            "mixed_precision=no",
    "spike": "the loss stays far above its recent median (a lasting level shift, not a spike): lower train.lr, "
             "check the data, or use guard.spike=warn",
}


def stop_message(term: str, count: int) -> str:
    what = "loss spikes" if term == "spike" else f"non-finite {term}"
    return (f"stopped after {count} consecutive skipped steps: {what}; "
            f"{NONFINITE_ADVICE.get(term, 'lower train.lr')}. The last good checkpoint is kept")
