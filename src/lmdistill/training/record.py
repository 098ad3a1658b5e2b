"""``run.json``: what a run was (models, data, plan), how it went, and how it ended.

Written when the run starts, on every resume, and at its end, finished or not; the report and
``lmdistill eval`` read it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone

from lmdistill.core.errors import PeerLost, TrainingStopped
from lmdistill.models.loading import ModelInfo
from lmdistill.models.lora import parameter_counts
from lmdistill.training.interrupts import Interrupted

EVAL_SUMMARY_KEYS = (
    "eval_ce_loss",
    "eval_ppl",
    "eval_kd_loss",
    "eval_kl",
    "top1_agreement",
    "draft_acceptance",
    "teacher_ce_loss",
    "teacher_ppl",
    # a teacher with another tokenizer: bits per byte of the held-out text, and the student
    # positions aligned with one of the teacher's
    "eval_bpb",
    "teacher_bpb",
    "aligned_fraction",
    # the student's own text judged by the teacher (eval.generate, on-policy runs)
    "gen_teacher_nll",
    "gen_reverse_kl",
    # the student drafting for the teacher (eval.draft)
    "draft_greedy_accepted_per_forward",
    "draft_sampled_accepted_per_forward",
    "draft_greedy_speedup",
    "draft_sampled_speedup",
    "draft_cost",
)


class RunRecord:
    """The content of ``run.json``; only the main process writes it."""

    def __init__(self, parts, is_main: bool):
        self.run, self.is_main = parts.run, is_main
        self.started = time.perf_counter()
        self.info = {"status": "running", "started_at": utcnow(), "command": "train", **_describe(parts)}
        resumed = parts.resumed
        if resumed.checkpoint is not None:
            self.info["resumed_from_step"] = resumed.step
            earlier = self.run.read_json("run.json").get("resumes", []) if is_main else []
            change = {"from_step": resumed.step, "at": utcnow(), "changed_config": list(resumed.changed_config)}
            self.info["resumes"] = [*earlier, change]
        self.write()

    def write(self) -> None:
        if self.is_main:
            self.run.write_json("run.json", self.info)

    def ended(self, status: str, reason: str) -> None:
        self.info.update(status=status, exit_reason=reason)

    def ended_by(self, exc: BaseException) -> str:
        """Record why a run ended early, from the exception that ended it; its status."""
        if isinstance(exc, PeerLost):
            status, reason = "failed", str(exc)
        elif isinstance(exc, Interrupted):
            status, reason = "interrupted", str(exc)
        elif isinstance(exc, TrainingStopped):
            status, reason = "stopped", str(exc)
        elif isinstance(exc, KeyboardInterrupt):
            status, reason = "interrupted", "interrupted by the user (Ctrl-C)"
        else:
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
        self.ended(status, reason)
        return status

    def finished(self, initial: dict, final: dict, totals: dict, rates: dict[bool, list[float]]) -> None:
        rate, on_policy_rate = (statistics.median_high(r) if r else None for r in (rates[False], rates[True]))
        self.info.update(
            status="finished",
            initial=eval_summary(initial),
            final={
                **eval_summary(final),
                **totals,
                "tokens_per_s": rate,
                **({"on_policy_tokens_per_s": on_policy_rate} if on_policy_rate is not None else {}),
            },
        )

    def close(self, steps_done: int, verdict: str) -> None:
        self.info.update(
            finished_at=utcnow(),
            wall_time_s=round(time.perf_counter() - self.started, 2),
            steps_done=steps_done,
            health_verdict=verdict,
        )
        self.write()


def _describe(parts) -> dict:
    models, cache, accelerator = parts.models, parts.cache, parts.accelerator
    teacher = models.teacher
    return {
        "teacher": asdict(ModelInfo.of(teacher, models.teacher_name)) if teacher is not None else None,
        "teacher_cache": (
            {
                "path": str(cache.path),
                "mode": cache.mode,
                "capture_temperature": cache.temperature,
                "teacher": cache.manifest["teacher"].get("source"),
            }
            if cache is not None
            else None
        ),
        "student": {**asdict(ModelInfo.of(parts.prepared.raw, models.student_name)), **_trained(parts)},
        "data": parts.data.describe(),
        "plan": {
            **asdict(parts.plan),
            "loss_impl": parts.loss_impl,
            **parts.strategy.speedups.record(),  # compile, liger: as resolved on this machine
            "processes": accelerator.num_processes,
            "strategy": parts.cfg.parallel.strategy,
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "vocab_size": parts.vocab_size,
        },
    }


def _trained(parts) -> dict:
    """How the student started (cut out of the teacher: which layers and channels) and how much
    of it trains: all of it, or LoRA adapters (``model.lora``)."""
    models, prune = parts.models, parts.cfg.model.prune
    start: dict = {}
    if models.student_layers is not None:
        init = {"layers": models.student_layers, "layer_choice": prune.layers}
        teacher_width = models.teacher.config.hidden_size if models.teacher is not None else None
        if models.student_channels is not None and teacher_width and len(models.student_channels) < teacher_width:
            init["width"] = f"{len(models.student_channels)} of the teacher's {teacher_width} hidden channels"
            init["width"] += f" (chosen by {prune.width})"
        start = {"init": init}
    trained, _ = parameter_counts(parts.prepared.raw)
    lora = parts.cfg.model.lora
    if not lora.r:
        return {**start, "trained_params": trained}
    alpha = lora.alpha if lora.alpha is not None else 2 * lora.r
    adapters = {"r": lora.r, "alpha": alpha, "dropout": lora.dropout, "target_modules": lora.target_modules}
    return {**start, "trained_params": trained, "lora": adapters}


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def eval_summary(result: dict) -> dict:
    return {k: result[k] for k in EVAL_SUMMARY_KEYS if k in result}
