"""Held-out evaluation: perplexity, KD divergence and top-1 agreement with the teacher.

Perplexity is exp(token-mean student cross-entropy on held-out blocks), never exp of
the total (KD-mixed) loss and never capped: a broken model shows as 2.3e+12, which
is what it is. Sums are taken over tokens and divided once, so batch size does not
change the numbers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from lmdistill.core.batch import IGNORE_INDEX, Batch
from lmdistill.core.progress import interactive
from lmdistill.loss.objective import KDSpec, Objective
from lmdistill.loss.views import prediction_logits
from lmdistill.models.lora import is_lora
from lmdistill.teacher.generation import Sampling, eos_and_pad
from lmdistill.teacher.judge import held_out_prompts, judge_held_out
from lmdistill.teacher.onpolicy import OnPolicy
from lmdistill.teacher.signals import CachedTeacher, LiveAligned, LiveLogits, TeacherSignal
from lmdistill.teacher.speculative import DraftSettings, measure_drafting
from lmdistill.training.monitor import verdict_line


def perplexity(mean_ce: float) -> float:
    """exp(mean CE in nats/token); inf when that overflows a float, NaN stays NaN."""
    try:
        return math.exp(mean_ce)
    except OverflowError:
        return math.inf


def format_ppl(ppl: float) -> str:
    """A perplexity as it is: 61.23, 4102, 2.3e+12 -- never capped."""
    return f"{ppl:.4g}"


@torch.no_grad()
def evaluate(
    student,
    signal: TeacherSignal | None,
    blocks,
    *,
    vocab_size: int,
    temperature: float,
    spec: KDSpec | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast=None,
    reduce=None,
    teacher_ce: float | None = None,
    teacher_bpb: float | None = None,
    desc: str = "eval",
    progress: bool = True,
    forward_calls: int | None = None,
) -> dict:
    """Evaluate ``student`` (against the teacher ``signal``, if given) on ``blocks``: a store's
    blocks (only their targets are scored: not padding, not a prompt under ``loss_on:
    assistant``) or a (num_blocks, block_size) tensor of packed ids.

    The teacher comes through a ``TeacherSignal``, as in training (a live model, a cache's eval
    split), and the loss terms through the training ``Objective`` (``spec``: the divergence, its
    parameters and the T^2 scaling; its kd_weight is not used), under no_grad; each view adds its
    T = 1 diagnostics (``view.diagnostics``). A new signal needs no change here.
    ``reduce`` sums a tensor across processes (data-parallel eval: each rank passes its own
    shard of ``blocks``). ``teacher_ce``: the teacher's held-out CE when it is known already (a
    frozen teacher on fixed blocks, a cache's manifest); measured otherwise. ``teacher_bpb``: its
    bits per byte, from the manifest of a cache built across tokenizers.

    ``forward_calls``: run at least this many forwards (sharded models gather their weights in
    every forward, so every process must run as many); the extra ones score nothing.

    Returns eval_ce_loss, eval_ppl, eval_tokens and, with a teacher, eval_kd_loss (as trained:
    at ``temperature``, times T^2 when enabled), eval_kl (plain KL at T=1, comparable
    across runs), top1_agreement, teacher_ce_loss and teacher_ppl.
    """
    was_training = student.training
    student.eval()
    kd_weight = 1.0 if signal is not None else 0.0  # (only the terms are read, never their mix)
    objective = Objective(replace(spec or KDSpec(kd_weight), kd_weight=kd_weight), vocab_size, "logits", student)
    # Every process sums the same keys (one with no block too): the reduction is one stacked tensor.
    sums = dict.fromkeys(_SUMS, torch.zeros((), dtype=torch.float64))
    batches = range(0, len(blocks), batch_size)
    # A short bar, redrawn in place: only where a terminal shows it (a log gets the eval line).
    for start in tqdm(batches, desc=desc, leave=False, disable=not (progress and interactive()), unit="batch"):
        batch = _batch(blocks, start, batch_size).to(device)
        for name, value in _batch_sums(student, signal, objective, batch, temperature, autocast).items():
            sums[name] = sums[name] + value.double().cpu()
    for _ in range(len(batches), forward_calls or 0):
        _idle_forward(student, signal, blocks, vocab_size, temperature, device, autocast)
    if reduce is not None:
        sums = dict(zip(sums, reduce(torch.stack(list(sums.values()))).tolist()))
    if was_training:
        student.train()
    return _result({k: float(v) for k, v in sums.items()}, signal is not None, teacher_ce, teacher_bpb)


# What an evaluation sums over its batches (and reduces over processes), divided once at the end.
_SUMS = (
    "ce",
    "tokens",
    "kd",
    "kl",
    "agree",
    "paired",
    "accept",
    "accept_tokens",
    "teacher_ce",
    "teacher_ce_tokens",
    "bytes",
    "teacher_bytes",
)


def _batch_sums(student, signal, objective: Objective, batch: Batch, temperature: float, autocast) -> dict:
    """One batch's sums: the objective's CE and KD terms and the target count, and the teacher
    view's T = 1 diagnostics."""
    vocab_size = objective.vocab_size
    with autocast() if autocast else contextlib.nullcontext():
        logits = prediction_logits(student, batch, vocab_size)
        view = signal(batch, temperature) if signal is not None else None
    parts = objective.loss_from_logits(logits, batch, view, temperature, num_tokens=1.0)  # sums, not means
    out = {"ce": parts.ce, "kd": parts.kd, "tokens": torch.tensor(parts.num_valid)}
    if view is not None:
        targets = batch.targets.reshape(-1)
        keep = None if batch.all_valid else targets != IGNORE_INDEX  # padding, prompts: not scored
        student_flat = logits.reshape(-1, vocab_size).float()
        if keep is not None:
            student_flat, targets = student_flat[keep], targets[keep]
        at_one = signal.view_at_one(batch, view, temperature)
        out.update(view.diagnostics(student_flat, targets, keep, at_one, temperature))
        out.setdefault("paired", out["tokens"])  # positions KL and agreement are over (aligned pairs, else all)
        if "teacher_ce" in out:  # (sparse targets cannot give it, nor the acceptance: a whole distribution)
            out.setdefault("teacher_ce_tokens", out["tokens"])  # (a teacher with another tokenizer: its own)
        if "accept" in out:
            out["accept_tokens"] = out["tokens"]
    if batch.target_bytes is not None:  # the text the targets cover, for bits per byte (across tokenizers)
        out["bytes"] = torch.tensor(batch.target_bytes)
    if batch.teacher_tokens is not None:
        out["teacher_bytes"] = torch.tensor(batch.teacher_tokens.teacher_bytes)
    return out


def _idle_forward(student, signal, blocks, vocab_size: int, temperature: float, device, autocast) -> None:
    """A forward of every model that scores nothing (sharded models: every process runs as many)."""
    batch = _batch(blocks, 0, 1) if len(blocks) else Batch.from_blocks(torch.zeros((1, 2), dtype=torch.long))
    batch = batch.to(device)
    with autocast() if autocast else contextlib.nullcontext():
        prediction_logits(student, batch, vocab_size)
        if signal is not None:
            signal(batch, temperature)


def _result(sums: dict[str, float], with_teacher: bool, teacher_ce: float | None, teacher_bpb: float | None) -> dict:
    tokens = max(sums["tokens"], 1.0)
    ce = sums["ce"] / tokens
    out = {"eval_ce_loss": ce, "eval_ppl": perplexity(ce), "eval_tokens": int(sums["tokens"])}
    if sums["bytes"]:  # a teacher with another tokenizer: bits per byte compare where perplexities cannot
        out["eval_bpb"] = sums["ce"] / (math.log(2) * sums["bytes"])
    if with_teacher:
        measured = sums["teacher_ce_tokens"]  # the teacher's targets it was scored on
        if teacher_ce is None:  # measured here, else unknown (NaN): never a made-up 0
            teacher_ce = sums["teacher_ce"] / measured if measured else math.nan
        if sums["accept_tokens"]:
            out["draft_acceptance"] = sums["accept"] / sums["accept_tokens"]
        paired = max(sums["paired"], 1.0)
        out.update(
            eval_kd_loss=sums["kd"] / tokens,
            eval_kl=sums["kl"] / paired,
            top1_agreement=sums["agree"] / paired,
            teacher_ce_loss=teacher_ce,
            teacher_ppl=perplexity(teacher_ce),
        )
        if sums["teacher_bytes"]:  # measured on the teacher's own tokens of the held-out text
            teacher_bpb = teacher_ce * measured / (math.log(2) * sums["teacher_bytes"])
        if teacher_bpb is not None:
            out["teacher_bpb"] = teacher_bpb
            out["aligned_fraction"] = sums["paired"] / tokens
    return out


def _batch(blocks, start: int, size: int) -> Batch:
    """Rows [start, start + size) of a store's blocks, or of a (N, L) tensor of packed ids."""
    rows = range(start, min(start + size, len(blocks)))
    if isinstance(blocks, torch.Tensor):
        return Batch.from_blocks(blocks[rows.start : rows.stop])
    return blocks.batch(rows)


def summary_table(result) -> str:
    """The table a run prints at its end: held-out perplexity of teacher and student, before and after."""
    i, f = result.initial, result.final
    crossing = "teacher_bpb" in f  # a teacher with another tokenizer: only bits per byte compare
    rows = []  # (name, perplexity, CE, bits per byte)
    if "teacher_ppl" in f:
        name = "teacher (own tokens)" if crossing else "teacher"
        rows.append((name, f["teacher_ppl"], f["teacher_ce_loss"], f.get("teacher_bpb", math.nan)))
    rows.append(("student before", i["eval_ppl"], i["eval_ce_loss"], i.get("eval_bpb", math.nan)))
    rows.append(("student after", f["eval_ppl"], f["eval_ce_loss"], f.get("eval_bpb", math.nan)))
    width = max(len(r[0]) for r in rows) + 2
    lines = ["", f"{'held-out':<{width}}{'perplexity':>14}{'CE nats/token':>16}" + ("  bits/byte" if crossing else "")]
    for name, ppl, ce, bpb in rows:
        bits = f"{bpb:>11.4f}" if crossing else ""
        lines.append(f"{name:<{width}}{format_ppl(ppl):>14}{ce:>16.4f}{bits}")
    if "top1_agreement" in f and crossing:
        lines.append(
            f"at the {f['aligned_fraction']:.0%} of student positions aligned with the teacher's: top-1 agreement "
            f"{f['top1_agreement']:.1%}, cross-tokenizer divergence at T=1 {f['eval_kl']:.4f} nats"
        )
    elif "top1_agreement" in f:
        lines.append(
            f"top-1 agreement with the teacher: {f['top1_agreement']:.1%}; "
            f"KL(teacher || student) at T=1: {f['eval_kl']:.4f} nats/token"
        )
    lines.append(f"health: {verdict_line(result.health)}")
    lines.append(f"run directory: {result.run_dir}")
    return "\n".join(lines)


class RunEvaluator:
    """A training run's held-out evaluation: its student against the teacher as an evaluation
    meets it (the live model's logits, whatever loss path the training takes, or the cache's eval
    split), on this process's share of the eval blocks; with on-policy steps, the teacher's
    judgement of the student's own text too. The teacher's CE is measured once (a frozen teacher
    on fixed blocks) or read from the cache."""

    def __init__(self, parts, progress: bool):
        self.parts, self.progress = parts, progress
        cache = parts.cache
        known = cache.manifest["teacher_eval"] if cache is not None else {}
        self.teacher_ce, self.teacher_bpb = known.get("teacher_ce_loss"), known.get("teacher_bpb")
        self.aligned: LiveAligned | None = None  # the signal of a teacher with another tokenizer, made once

    def __call__(self, temperature: float, desc: str, *, ends: bool = False) -> dict:
        """The evaluation; ``ends``: the first or the last of the run (where ``eval.draft`` measures)."""
        p, d = self.parts, self.parts.cfg.distill
        accelerator, world = p.accelerator, p.accelerator.num_processes
        result = evaluate(
            p.prepared.raw,
            self._signal(),
            p.data.eval.subset(slice(accelerator.process_index, None, world)),
            vocab_size=p.vocab_size,
            temperature=temperature,
            spec=KDSpec(1.0, d.divergence, d.scale_by_t2, d.divergence_params),
            batch_size=p.plan.eval_batch_size,
            device=accelerator.device,
            autocast=accelerator.autocast,
            reduce=lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu(),
            teacher_ce=self.teacher_ce,
            teacher_bpb=self.teacher_bpb,
            desc=desc,
            progress=self.progress,
            forward_calls=p.strategy.eval_forward_calls(len(p.data.eval), world, p.plan.eval_batch_size),
        )
        if "teacher_ce_loss" in result and self.teacher_ce is None:
            self.teacher_ce = result["teacher_ce_loss"]
        if isinstance(p.signal, OnPolicy) or p.cfg.eval.generate:  # the student's own text, judged by the
            if accelerator.is_main_process or p.strategy.judges_everywhere:  # teacher: on one process, or on
                result.update(self._judged())  # all when the sharded models' forwards gather
            accelerator.wait_for_everyone()  # the others wait here, not inside a collective or at exit
        if ends and p.cfg.eval.draft:  # timed on the main process alone (sharded runs refuse eval.draft)
            if accelerator.is_main_process:
                result.update(self._drafted())
            accelerator.wait_for_everyone()
        return result

    def _judged(self) -> dict:
        p, e = self.parts, self.parts.cfg.eval
        student, teacher, tokenizer, vocab = p.prepared.raw, p.models.teacher, p.models.tokenizer, p.vocab_size
        if isinstance(p.signal, OnPolicy):
            return p.signal.judge(student, teacher, p.data.eval, tokenizer, vocab)
        eos, pad = eos_and_pad(tokenizer)
        return judge_held_out(
            student,
            teacher,
            p.data.eval,
            tokenizer,
            vocab,
            prompts=e.prompts,
            prompt_tokens=e.prompt_tokens,
            sampling=Sampling(e.max_new_tokens),
            seed=p.cfg.run.seed,
            eos=eos,
            pad=pad,
        )

    def _drafted(self) -> dict:
        p, e = self.parts, self.parts.cfg.eval
        tokenizer = p.models.tokenizer
        draft = p.prepared.raw.get_base_model() if is_lora(p.prepared.raw) else p.prepared.raw  # adapters active
        settings = DraftSettings(e.prompts, e.prompt_tokens, e.max_new_tokens, e.repeats, p.cfg.run.seed)
        eos, pad = eos_and_pad(tokenizer)
        prompts = held_out_prompts(p.data.eval, e.prompts, e.prompt_tokens)
        return measure_drafting(draft, p.models.teacher, prompts, settings, eos, pad)

    def _signal(self) -> TeacherSignal | None:
        p = self.parts
        if p.models.teacher_tokenizer is not None:  # a teacher with its own tokenizer (scored even at kd_weight 0)
            if self.aligned is None:
                self.aligned = (
                    p.signal.on_full_logits()
                    if isinstance(p.signal, LiveAligned)
                    else LiveAligned(p.models.teacher, p.models.teacher_tokenizer, p.models.tokenizer)
                )
            return self.aligned
        if p.models.teacher is not None:  # (scored even at kd_weight 0)
            return LiveLogits(p.models.teacher, p.vocab_size)
        return CachedTeacher(p.cache, "eval") if p.cache is not None else None
