"""Fault injection for tests and drills (the ``debug`` config section).

Faults are installed around a ``Trainer`` from the outside and never appear in its code:

  teacher_logits, student_logits   a forward hook on the model poisons the first element of
                                   its output (the logits, or the final hidden states that
                                   the chunked loss uses in their place);
  loss                             the objective is wrapped: the first micro-batch's loss is
                                   poisoned;
  grad                             gradient clipping is wrapped: the first element of the
                                   first gradient is poisoned just before the norm is taken;
  loss_multiplier                  the objective is wrapped: the step's loss is scaled (a
                                   fake spike);
  exit_after_step                  the end-of-step bookkeeping is wrapped: once step N and
                                   its checkpoint are done the process ends as a SIGKILL
                                   would end it (exit code 137, no clean-up);
  exit_rank                        with exit_after_step: only that rank ends, at once, and the
                                   others go on to find a dead peer in their next collective.

Hooks only fire inside the training step they target, never during evaluation.
"""

from __future__ import annotations

import os
from dataclasses import replace


class FaultInjector:
    """The faults of ``debug`` for the process of rank ``rank``; ``active`` is False when there are none."""

    def __init__(self, debug_cfg, rank: int = 0):
        self.faults: dict[tuple[int, str], float] = {}
        for item in debug_cfg.inject:
            if item.get("rank", rank) == rank:
                self.faults[(item["step"], item["where"])] = float(str(item.get("value", "nan")).lower())
        self.loss_multiplier = {int(k): float(v) for k, v in debug_cfg.loss_multiplier.items()}
        self.exit_after_step = debug_cfg.exit_after_step
        self.exit_rank, self.rank = debug_cfg.exit_rank, rank  # exit_rank None: every process ends
        self.step: int | None = None  # the training step running now; None outside of one
        self._micro_batch = 0

    @property
    def active(self) -> bool:
        return bool(self.faults or self.loss_multiplier or self.exit_after_step is not None)

    def describe(self) -> str:
        parts = [f"step {s}: {w}={v}" for (s, w), v in sorted(self.faults.items())]
        parts += [f"step {s}: loss x{f}" for s, f in sorted(self.loss_multiplier.items())]
        if self.exit_after_step is not None:
            on = f" on rank {self.exit_rank}" if self.exit_rank is not None else ""
            parts.append(f"exit (code 137) after step {self.exit_after_step}{on}")
        return "; ".join(parts)

    def value(self, step: int | None, where: str) -> float | None:
        """The value injected at ``where`` in training step ``step``, or None."""
        return None if step is None else self.faults.get((step, where))

    def _value(self, where: str) -> float | None:
        return self.value(self.step, where)

    # ------------------------------------------------------------------ installation
    def install(self, trainer) -> None:
        """Wrap the trainer's step, objective, gradient clipping and end-of-step, and hook its models."""
        if not self.active:
            return
        step_fn, objective, clip, end_step = (
            trainer.train_step,
            trainer.objective,
            trainer.clip_gradients,
            trainer.end_step,
        )

        def train_step(step: int):
            self.step, self._micro_batch = step, 0
            try:
                return step_fn(step)
            finally:
                self.step = None

        def poisoned_objective(*args, **kwargs):
            parts = objective(*args, **kwargs)
            total = parts.total
            if self.step in self.loss_multiplier:
                total = total * self.loss_multiplier[self.step]
            if self._micro_batch == 0:
                total = poison(total, self._value("loss"))
            self._micro_batch += 1
            return replace(parts, total=total)

        def poisoned_clip():
            value = self._value("grad")
            if value is not None:
                first = next(p for p in trainer.raw_student.parameters() if p.grad is not None)
                first.grad.view(-1)[0] = value
            return clip()

        def end_step_then_exit(result, *args, **kwargs):
            out = end_step(result, *args, **kwargs)
            if self.exit_after_step == result.step + 1 and self.exit_rank in (None, self.rank):
                import torch.distributed as dist

                if self.exit_rank is None and dist.is_available() and dist.is_initialized():
                    # Every process past the step first (its checkpoint published by the main one):
                    # the drill is a crash after step N, not a race between one rank's exit and
                    # the launcher stopping the others mid-save.
                    dist.barrier()
                os._exit(137)  # the drill: no finally blocks, no flushes beyond what is already on disk
            return out

        trainer.train_step, trainer.objective = train_step, poisoned_objective
        trainer.clip_gradients, trainer.end_step = poisoned_clip, end_step_then_exit
        trainer.raw_student.register_forward_hook(self._output_hook("student_logits"))
        if trainer.teacher is not None:
            trainer.teacher.register_forward_hook(self._output_hook("teacher_logits"))

    def _output_hook(self, where: str):
        def hook(module, args, output):
            value = self._value(where)
            if value is None:
                return output
            # Both: the full path reads the logits, the chunked path the final hidden states.
            output.logits = poison(output.logits, value)
            if output.hidden_states is not None:
                output.hidden_states = (*output.hidden_states[:-1], poison(output.hidden_states[-1], value))
            return output

        return hook


def poison(tensor, value: float | None):
    """``tensor`` with its first element replaced by ``value`` (a copy; the graph is kept)."""
    if value is None:
        return tensor
    out = tensor.clone()
    out.view(-1)[0] = value
    return out
