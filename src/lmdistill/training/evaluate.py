"""Held-out evaluation: perplexity, KD divergence and top-1 agreement with the teacher.

Perplexity is exp(token-mean student cross-entropy on held-out blocks), never exp of
the total (KD-mixed) loss and never capped: a broken model shows as 2.3e+12, which
is what it is. Sums are taken over tokens and divided once, so batch size does not
change the numbers.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmdistill.core.batch import Batch
from lmdistill.core.progress import interactive
from lmdistill.loss.dense import IGNORE_INDEX, token_divergence
from lmdistill.loss.divergences import DivergenceParams
from lmdistill.loss.sparse import sparse_kd_sum
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
    teacher,
    blocks: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float,
    scale_by_t2: bool = True,
    divergence: str = "forward_kl",
    params: DivergenceParams = DivergenceParams(),
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast=None,
    reduce=None,
    teacher_cache: dict | None = None,
    desc: str = "eval",
    progress: bool = True,
    cached=None,
    forward_calls: int | None = None,
) -> dict:
    """Evaluate ``student`` (and ``teacher``, if given) on ``blocks``: a store's blocks (only
    their targets are scored: not padding, not a prompt under ``loss_on: assistant``) or a
    (num_blocks, block_size) tensor of packed ids.

    ``reduce`` sums a tensor across processes (data-parallel eval: each rank passes its
    own shard of ``blocks``). ``teacher_cache`` keeps the teacher's numbers between
    calls: a frozen teacher on fixed blocks gives the same answer every time.

    ``cached``: a teacher cache's signal for the eval split (``signals.CachedTeacher``) in place
    of ``teacher``; the teacher's CE then comes from ``teacher_cache`` (the cache's manifest).

    ``forward_calls``: run at least this many forwards (sharded models gather their weights in
    every forward, so every process must run as many); the extra ones score nothing.

    Returns eval_ce_loss, eval_ppl, eval_tokens and, with a teacher, eval_kd_loss
    (as trained: at ``temperature``, times T^2 when enabled), eval_kl (plain KL at
    T=1, comparable across runs), top1_agreement, teacher_ce_loss and teacher_ppl.
    """
    was_training = student.training
    student.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # ce, kd, kl_t1, agree, teacher_ce, tokens
    need_teacher_ce = teacher is not None and (teacher_cache is None or "teacher_ce_loss" not in teacher_cache)
    with_teacher = teacher is not None or cached is not None
    batches = range(0, len(blocks), batch_size)
    # A short bar, redrawn in place: only where a terminal shows it (a log gets the eval line).
    for start in tqdm(batches, desc=desc, leave=False, disable=not (progress and interactive()), unit="batch"):
        batch = _batch(blocks, start, batch_size)
        ids = batch.input_ids.to(device)
        targets = batch.targets.reshape(-1).to(device)
        keep = None if batch.all_valid else targets != IGNORE_INDEX  # padding, prompts: not scored
        with autocast() if autocast else contextlib.nullcontext():
            s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1, :vocab_size]
            t_logits = (
                teacher(input_ids=ids, use_cache=False).logits[:, :-1, :vocab_size] if teacher is not None else None
            )
        s_flat = s_logits.reshape(-1, vocab_size).float()
        sparse = None
        if cached is not None:
            view = cached(batch, temperature)
            if cached.cache.mode == "dense":
                t_logits = view.logits
            else:
                sparse = (view.targets, cached(batch, 1.0).targets if cached.cache.mode == "sampled" else None)
        if keep is not None:
            s_flat, targets = s_flat[keep], targets[keep]
            t_logits = t_logits.reshape(-1, vocab_size)[keep] if t_logits is not None else None
            sparse = tuple(t.rows(keep) if t is not None else None for t in sparse) if sparse else None
        if sparse is not None:
            sums[5] += targets.numel()
            sums[0] += F.cross_entropy(s_flat, targets, reduction="sum").item()
            sums[1:4] += _sparse_sums(s_flat, targets, sparse, temperature, scale_by_t2)
            continue
        sums[0] += F.cross_entropy(s_flat, targets, reduction="sum").item()
        sums[5] += targets.numel()
        if t_logits is not None:
            t_flat = t_logits.reshape(-1, vocab_size).float()
            kd = token_divergence(s_flat, t_flat, temperature, divergence, params=params).sum().item()
            sums[1] += kd * (temperature**2 if scale_by_t2 else 1.0)
            sums[2] += token_divergence(s_flat, t_flat, 1.0, "forward_kl").sum().item()
            sums[3] += (s_flat.argmax(-1) == t_flat.argmax(-1)).sum().item()
            if need_teacher_ce:
                sums[4] += F.cross_entropy(t_flat, targets, reduction="sum").item()
    for _ in range(len(batches), forward_calls or 0):
        ids = (
            _batch(blocks, 0, 1).input_ids.to(device)
            if len(blocks)
            else torch.zeros((1, 2), dtype=torch.long, device=device)
        )
        with autocast() if autocast else contextlib.nullcontext():
            for model in (student, teacher):
                if model is not None:
                    model(input_ids=ids, use_cache=False)
    if reduce is not None:
        sums = reduce(sums)
    if was_training:
        student.train()
    tokens = max(sums[5].item(), 1.0)
    ce = sums[0].item() / tokens
    out = {"eval_ce_loss": ce, "eval_ppl": perplexity(ce), "eval_tokens": int(sums[5].item())}
    if with_teacher:
        if need_teacher_ce:
            teacher_ce = sums[4].item() / tokens
            if teacher_cache is not None:
                teacher_cache["teacher_ce_loss"] = teacher_ce
        else:
            teacher_ce = teacher_cache["teacher_ce_loss"]
        out.update(
            eval_kd_loss=sums[1].item() / tokens,
            eval_kl=sums[2].item() / tokens,
            top1_agreement=sums[3].item() / tokens,
            teacher_ce_loss=teacher_ce,
            teacher_ppl=perplexity(teacher_ce),
        )
    return out


def _sparse_sums(s_flat, targets, sparse, temperature: float, scale_by_t2: bool) -> torch.Tensor:
    """KD (as trained), KL at T = 1 and top-1 agreement sums against a cache's sparse targets.

    KL at T = 1 comes from the draws re-weighted to T = 1 (sampled), or is the bucketed KL at
    the capture temperature (top-k, which has nothing else); the teacher's top-1 is its most
    likely cached id (exact for top-k; for sampled, whenever the argmax was drawn)."""

    at_t, at_one = sparse
    kd = sparse_kd_sum(s_flat, targets, at_t, temperature)
    kl = kd if at_one is None else sparse_kd_sum(s_flat, targets, at_one, 1.0)
    best = torch.where(at_t.weights > 0, at_t.logp, float("-inf")).argmax(-1, keepdim=True)
    agree = (s_flat.argmax(-1) == at_t.ids.gather(1, best).squeeze(1)).sum()
    return torch.stack([kd * (temperature**2 if scale_by_t2 else 1.0), kl, agree.double()]).double()


def _batch(blocks, start: int, size: int) -> Batch:
    """Rows [start, start + size) of a store's blocks, or of a (N, L) tensor of packed ids."""
    rows = range(start, min(start + size, len(blocks)))
    if isinstance(blocks, torch.Tensor):
        return Batch.from_blocks(blocks[rows.start : rows.stop])
    return blocks.batch(rows)


def summary_table(result) -> str:
    """The table a run prints at its end: held-out perplexity of teacher and student, before and after."""
    i, f = result.initial, result.final
    rows = []
    if "teacher_ppl" in f:
        rows.append(("teacher", f["teacher_ppl"], f["teacher_ce_loss"]))
    rows.append(("student before", i["eval_ppl"], i["eval_ce_loss"]))
    rows.append(("student after", f["eval_ppl"], f["eval_ce_loss"]))
    width = max(len(r[0]) for r in rows) + 2
    lines = ["", f"{'held-out':<{width}}{'perplexity':>14}{'CE nats/token':>16}"]
    lines += [f"{name:<{width}}{format_ppl(ppl):>14}{ce:>16.4f}" for name, ppl, ce in rows]
    if "top1_agreement" in f:
        lines.append(
            f"top-1 agreement with the teacher: {f['top1_agreement']:.1%}; "
            f"KL(teacher || student) at T=1: {f['eval_kl']:.4f} nats/token"
        )
    lines.append(f"health: {verdict_line(result.health)}")
    lines.append(f"run directory: {result.run_dir}")
    return "\n".join(lines)
