"""The optimizer, and the temperature and learning-rate schedules: pure functions of the step.

Being pure functions of ``step`` (never of how many updates were applied) keeps
resume and skipped steps simple: a skipped step still advances the step counter,
so the schedules carry on exactly as in a run without the fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmdistill.core.errors import LmdistillError


def _progress(step: int, total_steps: int) -> float:
    """Fraction of the run done at ``step``: 0 at step 0, 1 at ``total_steps``."""
    if total_steps <= 0:
        return 1.0
    return min(max(step / total_steps, 0.0), 1.0)


def temperature_at(step: int, total_steps: int, start: float, end: float, schedule: str = "linear") -> float:
    """KD temperature at ``step`` of a run of ``total_steps`` optimizer steps.

    ``linear`` goes straight from ``start`` to ``end``: with start 2.0, end 1.5 and
    25,000 steps it gives the original report's table 2.00, 1.90, ..., 1.50 at steps 0, 5000, ...,
    25000. ``cosine`` follows half a cosine; ``constant`` stays at ``start``.
    """
    if schedule == "constant":
        return start
    p = _progress(step, total_steps)
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown temperature schedule {schedule!r}")


def lr_at(
    step: int, total_steps: int, peak_lr: float, warmup_steps: int, schedule: str = "cosine", min_lr_ratio: float = 0.1
) -> float:
    """Learning rate: linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine or constant.

    Warmup starts at peak_lr / warmup_steps rather than 0 so that step 0 already moves
    the weights (a zero-LR first step would be a wasted batch).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}")
    decay_steps = max(total_steps - warmup_steps, 1)
    p = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    min_lr = peak_lr * min_lr_ratio
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Plan:
    """A run's length and cadence, derived once from the config and the data."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    eval_every: int
    eval_batch_size: int

    @classmethod
    def for_run(cls, cfg, micro_batches_per_epoch: int, world: int, train_blocks: int, vocab_size: int) -> Plan:
        t = cfg.train
        steps_per_epoch = micro_batches_per_epoch // t.grad_accum
        if steps_per_epoch == 0:
            raise LmdistillError(
                f"one optimizer step needs {t.batch_size * t.grad_accum * world} blocks (batch_size x grad_accum x "
                f"processes) but there are only {train_blocks} training blocks; lower train.batch_size or add data"
            )
        total = t.max_steps or t.epochs * steps_per_epoch
        warmup = t.warmup_steps if t.warmup_steps is not None else int(0.05 * total)
        # Eval builds full logits (no gradients): keep a batch's logits under the loss's size budget.
        eval_batch = max(
            1,
            min(
                max(t.batch_size, 8),
                int(cfg.loss.auto_threshold_mib * 2**20 // (cfg.data.block_size * vocab_size * 4 * 2)),
            ),
        )
        return cls(total, steps_per_epoch, warmup, t.eval_every or max(1, total // 10), eval_batch)


def make_optimizer(model, cfg, extra: torch.nn.Module | None = None):
    """AdamW; no weight decay on norms, biases and other 1-D parameters; torch's fused kernel on
    every device (on this project's 2-core CPU 5x faster than the per-parameter loop: 0.06 s
    against 0.30 s a step for an 81M-parameter student, 20% of a whole step).
    ``extra``: more trained parameters after the model's (the hidden-state projection)."""
    decay, no_decay = [], []
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=True)
