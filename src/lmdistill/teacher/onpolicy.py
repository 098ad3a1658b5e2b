"""On-policy distillation: on some steps the student learns on text it wrote itself.

Off-policy KD trains the student on text it would never write; at generation time its own
mistakes take it where it never trained (exposure bias). On an on-policy step the prompts of
the step's blocks (their first ``prompt_tokens`` tokens) are continued by the student, and
the teacher scores every written token (GKD, Agarwal et al. 2024; on-policy reverse KL as
in MiniLLM and the Qwen3 report).

How it plugs in: ``OnPolicy`` is a teacher signal that wraps the live one. Its ``prepare``
turns a step's batches into prompt + continuation batches when the step is drawn on-policy
(``is_on_policy``: a pure function of the run's seed and the step, the same on every
process), and the objective meets a generated batch with ``distill.on_policy.divergence``
(or the sampled-token estimator) in place of the off-policy loss. Every written token up to
and including the first EOS is a target; prompt, padding and everything after EOS are not.

Samples are reproducible: a micro-batch's generation is seeded from (run.seed, step, process,
micro-batch), so a resumed run writes the same continuations from the same weights, and the
checkpoint needs no sampler state.

The generator sits behind a small interface (``Generator``) so that a faster engine can
replace transformers' ``generate`` without touching the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from lmdistill.core.batch import Batch
from lmdistill.core.parallel import is_sharded
from lmdistill.teacher.signals import TeacherSignal, TeacherView


def _uniform(*key) -> float:
    """A uniform number in [0, 1) that depends only on ``key``."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _seed(*key) -> int:
    return int(_uniform(*key) * 2**63)


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` is on-policy: drawn from (seed, step) alone."""
    return fraction >= 1.0 or (fraction > 0.0 and _uniform("on-policy", seed, step) < fraction)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


class Generator(Protocol):
    """``generator(prompts, sampling, seed, attention_mask) -> (B, P + N) ids``: each row's prompt
    (B, P; shorter prompts padded on the left, ``attention_mask`` 0 there) continued by up to N
    sampled tokens; rows that ended early are padded after their EOS."""

    def __call__(self, prompts: torch.Tensor, sampling: Sampling, seed: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...


class HFGenerator:
    """transformers' ``generate`` on the (unwrapped) student: KV cache, batched, no gradients, in
    eval mode (the student goes back to train mode after), the torch RNG forked and seeded,
    under the run's autocast. Only the sampling settings given here apply: the model's own
    ``generation_config`` (a repetition penalty, min_p, ... shipped with a checkpoint) is set
    aside for the call, so the tokens are drawn from the student's distribution as trained."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, autocast=None):
        self.model, self.eos, self.pad = model, eos_token_id, pad_token_id
        self.autocast = autocast or contextlib.nullcontext

    def config(self, sampling: Sampling, use_cache: bool = True):
        from transformers import GenerationConfig

        # remove_invalid_values: a student whose logits went NaN still writes (tokens of no
        # meaning) instead of failing in the sampler; the step's loss then decides, and a NaN
        # loss is skipped by the guard on every process alike.
        return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos,
                                pad_token_id=self.pad, use_cache=use_cache, remove_invalid_values=True)

    def __call__(self, prompts: torch.Tensor, sampling: Sampling, seed: int,
                 attention_mask: torch.Tensor | None = None, use_cache: bool = True) -> torch.Tensor:
        from transformers import GenerationConfig

        was_training, own = self.model.training, getattr(self.model, "generation_config", None)
        self.model.eval()
        self.model.generation_config = GenerationConfig()  # neutral defaults under ours
        devices = [prompts.device] if prompts.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self.autocast():
                torch.manual_seed(seed)
                mask = attention_mask if attention_mask is not None else torch.ones_like(prompts)
                # A sharded student gathers its weights in every forward, on all processes together:
                # one whose rows have all ended keeps stepping until every process's rows have.
                return self.model.generate(input_ids=prompts, attention_mask=mask, synced_gpus=is_sharded(self.model),
                                           generation_config=self.config(sampling, use_cache))
        finally:
            self.model.generation_config = own
            self.model.train(was_training)


def left_padded(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one (B, P) batch padded on the left, and its mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def rollout_batch(prompts: list[torch.Tensor], written: torch.Tensor, eos_token_id: int, pad_token_id: int) -> Batch:
    """The training batch of prompts continued by the student, each row ``prompt + written`` from
    position 0 (padded on the right, as the generator's positions counted them). Targets are the
    written tokens up to and including each row's first EOS; prompt, padding and everything
    after EOS are not targets and not attended to."""
    is_eos = written == eos_token_id
    keep = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) == 0  # nothing but itself an EOS before it
    width = max(len(p) for p in prompts) + written.shape[1]
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        n, kept = len(prompt), int(keep[row].sum())
        ids[row, :n] = prompt
        ids[row, n : n + kept] = written[row, :kept]
        attention[row, : n + kept] = 1
        loss_mask[row, n : n + kept] = 1
    batch = Batch.from_ids(ids, attention, loss_mask)
    batch.generated = True
    return batch


def prompts_of(batch: Batch, prompt_tokens: int) -> list[torch.Tensor]:
    """Each row's prompt, decided row by row: where the row's first tokens are not targets (chat,
    prompt/completion: a masked prompt) everything before its first target, the first record's
    prompt; otherwise (packed text, ``loss_on: all``, the later piece of a split record) its
    first ``prompt_tokens`` tokens."""
    prompts = []
    real = batch.attention_mask.sum(1).tolist() if batch.attention_mask is not None else \
        [batch.input_ids.shape[1]] * len(batch.input_ids)
    for ids, targets, length in zip(batch.input_ids, batch.targets, real):
        valid = torch.nonzero(targets != -100)
        first = int(valid[0]) if len(valid) else 0
        prompts.append(ids[: first + 1] if first > 0 else ids[: min(prompt_tokens, max(int(length) - 1, 1))])
    return prompts


def continue_prompts(generator: Generator, prompts: list[torch.Tensor], sampling: Sampling, seed: int,
                     eos_token_id: int, pad_token_id: int, device) -> Batch:
    """One batched generation (left-padded where prompts differ) and its training batch."""
    ids, mask = left_padded(prompts, pad_token_id)
    sequences = generator(ids.to(device), sampling, seed, attention_mask=mask.to(device)).cpu()
    return rollout_batch(prompts, sequences[:, ids.shape[1]:], eos_token_id, pad_token_id)


@dataclass
class RolloutStats:
    """What the last step's generation did (empty on off-policy steps): tokens and rows over all
    processes, seconds of this process."""

    on_policy: bool = False
    generated_tokens: int = 0
    rows: int = 0
    seconds: float = 0.0

    def record(self, step_seconds: float) -> dict:
        out = {"on_policy": self.on_policy}
        if self.on_policy:
            out.update(generated_tokens=self.generated_tokens,
                       mean_generated_length=self.generated_tokens / max(self.rows, 1),
                       generation_tokens_per_s=self.generated_tokens / max(self.seconds, 1e-9),
                       generation_seconds=self.seconds, generation_share=self.seconds / max(step_seconds, 1e-9))
        return out


class OnPolicy(TeacherSignal):
    """The live teacher signal, on the student's own continuations on on-policy steps."""

    def __init__(self, inner: TeacherSignal, generator: Generator, sampling: Sampling, prompt_tokens: int,
                 fraction: float, seed: int, rank: int, eos_token_id: int, device: torch.device | str = "cpu",
                 reduce=None, pad_token_id: int | None = None):
        self.inner, self.generator, self.sampling, self.device = inner, generator, sampling, device
        self.reduce = reduce  # sums a tensor over processes (the logged counts are global); None: one process
        self.student_output = inner.student_output
        self.prompt_tokens, self.fraction, self.seed, self.rank = prompt_tokens, fraction, seed, rank
        self.eos = eos_token_id
        self.pad = pad_token_id if pad_token_id is not None else eos_token_id
        self.stats = RolloutStats()

    def prepare_step(self, batches: list[Batch], step: int) -> list[Batch]:
        """The step's batches: as they are off-policy, prompts continued by the student on-policy."""
        if not is_on_policy(self.seed, step, self.fraction):
            self.stats = RolloutStats()
            return batches
        t0 = time.perf_counter()
        out, written, rows = [], 0, 0
        for index, batch in enumerate(batches):
            rolled = continue_prompts(self.generator, prompts_of(batch, self.prompt_tokens), self.sampling,
                                      _seed("rollout", self.seed, step, self.rank, index), self.eos, self.pad,
                                      self.device)
            written += rolled.num_targets
            rows += len(rolled.input_ids)
            out.append(rolled)
        seconds = time.perf_counter() - t0
        if self.reduce is not None:
            written, rows = (int(x) for x in self.reduce(torch.tensor([written, rows], device=self.device)).tolist())
        self.stats = RolloutStats(True, written, rows, seconds)
        return out

    def __call__(self, batch: Batch, temperature: float) -> TeacherView | None:
        return self.inner(batch, temperature)

    def metrics(self, step_seconds: float) -> dict:
        return self.stats.record(step_seconds)

    def judge(self, student, teacher, eval_blocks, tokenizer, vocab_size: int, prompts: int = 16,
              shown: int = 3) -> dict:
        """At an evaluation: the student continues the prompts of the first ``prompts`` held-out
        blocks (the same ones, with the same seed, at every evaluation); the teacher-judged scores
        of ``generation_quality`` and ``shown`` prompt/continuation pairs as text."""
        heads = held_out_prompts(eval_blocks, prompts, self.prompt_tokens)
        n = len(heads)
        scores, written = generation_quality(student, teacher, heads, self.sampling, self.seed, self.eos, self.pad,
                                             vocab_size)
        samples = [{"prompt": tokenizer.decode(heads[i]), "continuation": tokenizer.decode(written[i])}
                   for i in range(min(shown, n))]
        return {**scores, "gen_prompts": n, "gen_samples": samples}


def on_policy_signal(cfg, inner: TeacherSignal, student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, data,
                     accelerator) -> OnPolicy:
    """The run's on-policy signal (``distill.on_policy``) around its live teacher signal: checked
    against the models' positions, generating under the run's autocast, its counts summed over
    the processes."""
    from lmdistill.core.errors import LmdistillError

    settings = cfg.distill.on_policy
    check_lengths(settings, cfg.data.block_size, any(s.store.chat for s in data.sources),
                  {"student": student, "teacher": teacher})
    reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None

    eos = tokenizer.eos_token_id
    if eos is None:
        raise LmdistillError("distill.on_policy needs the tokenizer's EOS token to end the student's generations, "
                             "and this tokenizer has none; set its eos_token or turn on-policy off")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = Sampling(settings.max_new_tokens, settings.sample_temperature, settings.top_p)
    return OnPolicy(inner, HFGenerator(student, eos, pad, accelerator.autocast), sampling, settings.prompt_tokens,
                    settings.fraction, cfg.run.seed, accelerator.process_index, eos, accelerator.device, reduce, pad)


def check_lengths(settings, block_size: int, chat: bool, models: dict) -> None:
    """A prompt and its continuation must fit every model's positions: the longest prompt is
    ``prompt_tokens`` for packed text, and up to a block for chat data."""
    from lmdistill.core.errors import LmdistillError

    longest = (block_size - 1 if chat else settings.prompt_tokens) + settings.max_new_tokens
    for role, model in models.items():
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and longest > limit:
            raise LmdistillError(f"on-policy rows reach {longest} tokens (prompt up to "
                                 f"{longest - settings.max_new_tokens} + distill.on_policy.max_new_tokens "
                                 f"{settings.max_new_tokens}), more than the {role}'s {limit} positions; lower "
                                 "distill.on_policy.max_new_tokens" + (" or data.block_size" if chat else
                                                                        " or distill.on_policy.prompt_tokens"))


# ---------------------------------------------------------------------------- the sampled-token loss
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] at every position, fp32 (0 where the target is -100)."""
    safe = targets.clamp(min=0).unsqueeze(-1)
    return torch.log_softmax(logits.float(), -1).gather(-1, safe).squeeze(-1)


def token_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, vocab_size: int, chunk_size: int = 1024) -> torch.Tensor:
    """The same from hidden states (..., H) and an output layer, one chunk of rows' logits at a
    time: under autograd each chunk is recomputed in backward (activation checkpointing), so
    no (tokens x vocab) tensor is kept."""
    from torch.utils.checkpoint import checkpoint

    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    w, b = weight[:vocab_size], (bias[:vocab_size] if bias is not None else None)

    def chunk(h, y):
        return token_logprobs(torch.nn.functional.linear(h, w, b), y)

    parts = []
    for start in range(0, len(flat_y), chunk_size):
        h, y = flat_h[start : start + chunk_size], flat_y[start : start + chunk_size]
        parts.append(checkpoint(chunk, h, y, use_reentrant=False) if torch.is_grad_enabled() else chunk(h, y))
    return torch.cat(parts).reshape(targets.shape)


def teacher_token_logprobs(view, targets: torch.Tensor, vocab_size: int, chunk_size: int = 1024) -> torch.Tensor:
    """log p_teacher(target) at every position (B, L-1), fp32, from a live teacher's view: its
    logits, or its hidden states and output layer (one chunk of rows' logits at a time)."""
    with torch.no_grad():
        if hasattr(view, "logits"):
            return token_logprobs(view.logits[..., :vocab_size], targets)
        return token_logprobs_from_hidden(view.hidden, view.weight, view.bias, targets, vocab_size, chunk_size)


def sampled_token_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, targets: torch.Tensor,
                       num_tokens: float):
    """The per-token reverse-KL estimator on the student's own samples.

    ``student_logp``: log q(x) of each written token x (with its graph); ``teacher_logp``:
    log p(x). ``k(x) = log q(x) - log p(x)`` (student minus teacher, at temperature 1) is a
    one-sample estimate of KL(q || p) at that position. Used as a fixed advantage on the
    student's log-probability, ``loss = k(x) log q(x)``, its gradient ``k(x) grad log q(x)`` has,
    over x ~ q, the expected value of the exact reverse-KL gradient (score function:
    ``sum_x q(x) grad log q(x) = 0``). Only the teacher's log-probability of the written token is
    needed. The value of ``total`` and ``kd`` is the mean of k (the per-token reverse-KL
    estimate); ``ce`` is the student's NLL of its own text (not trained).
    """
    from lmdistill.loss.dense import IGNORE_INDEX, LossParts, normaliser

    valid = targets != IGNORE_INDEX
    logq = student_logp
    advantage = (logq - teacher_logp).detach()
    denom = normaliser(num_tokens, int(valid.sum()))
    zero = logq.new_zeros(())
    # value: the mean of k (what is logged as the loss); gradient: k grad log q
    total = torch.where(valid, advantage * (1 + logq - logq.detach()), zero).sum() / denom
    kd = torch.where(valid, advantage, zero).sum() / denom
    ce = -torch.where(valid, logq, zero).sum().detach() / denom
    return LossParts(total=total, kd=kd, kd_unscaled=kd, ce=ce, num_valid=int(valid.sum()))


# ---------------------------------------------------------------------------- judging generations
def repeated_ngram_share(rows: list[list[int]], n: int = 4) -> float:
    """Share of the n-grams of the rows that repeat an earlier n-gram of the same row."""
    total = repeated = 0
    for row in rows:
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


@torch.no_grad()
def generation_quality(student: torch.nn.Module, teacher: torch.nn.Module, prompts: list[torch.Tensor],
                       sampling: Sampling, seed: int, eos_token_id: int, pad_token_id: int, vocab_size: int,
                       batch_size: int = 8) -> tuple[dict, list[list[int]]]:
    """The student continues ``prompts`` (token id rows) (seeded: the same prompts and seed give the same
    draws from the same weights); returns the teacher-judged score and the continuations.

    gen_teacher_nll: the teacher's NLL per written token (lower: text the teacher finds likely);
    gen_student_nll: the student's own NLL per written token; gen_reverse_kl: their difference,
    the mean of log q(x) - log p(x) over the student's own tokens x ~ q, a Monte Carlo estimate of
    KL(student || teacher) per written token (by the chain rule, summed over a row it estimates the
    KL of whole continuations; only when x is drawn from q itself: temperature 1, top_p 1);
    gen_repetition: the share of repeated 4-grams; gen_length: mean written tokens (up to and
    including EOS). A sharded student is judged on every process alike.
    """
    from lmdistill.teacher.signals import prediction_logits

    generator = HFGenerator(student, eos_token_id, pad_token_id)
    device = next(student.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64)  # teacher nll, student nll, tokens
    written: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = continue_prompts(generator, list(prompts[start : start + batch_size]), sampling,
                                 _seed("judge", seed, start), eos_token_id, pad_token_id, device).to(device)
        valid = batch.targets != -100
        safe = batch.targets.clamp(min=0).unsqueeze(-1)
        was_training = student.training
        student.eval()
        for i, model in enumerate((teacher, student)):
            logits = prediction_logits(model, batch, vocab_size).float()
            nll = -torch.log_softmax(logits, -1).gather(-1, safe).squeeze(-1)
            sums[i] += nll[valid].sum().double().cpu()
        student.train(was_training)
        sums[2] += valid.sum().cpu()
        for row, keep in zip(batch.input_ids[:, 1:], valid):
            written.append(row[keep].tolist())
    tokens = max(float(sums[2]), 1.0)
    return {"gen_teacher_nll": float(sums[0]) / tokens, "gen_student_nll": float(sums[1]) / tokens,
            "gen_reverse_kl": float(sums[0] - sums[1]) / tokens,
            "gen_repetition": repeated_ngram_share(written), "gen_length": float(sums[2]) / max(len(prompts), 1)}, \
        written


def held_out_prompts(blocks, count: int, prompt_tokens: int) -> list[torch.Tensor]:
    """The prompts (``prompts_of``) of the first ``count`` blocks, all of them when there are fewer:
    a fixed set, so that every judgement of a model with one seed sees the same prompts."""
    return prompts_of(blocks.batch(range(min(count, len(blocks)))), prompt_tokens)


# ---------------------------------------------------------------------------- lmdistill eval --generate
def judge_generations(student, teacher, blocks, tokenizer, vocab_size: int, block_size: int, prompts: int,
                      prompt_tokens: int, sampling: Sampling, seed: int, shown: int = 3) -> dict:
    """Any student's own text, judged by a teacher (``lmdistill eval --generate``): the student
    continues the prompts of the first ``prompts`` of ``blocks``, and ``generation_quality`` scores
    what it wrote. Returns those scores (``gen_reverse_kl`` among them: KL(student || teacher) on
    the student's own samples), the settings, and ``shown`` decoded samples.

    Seeded like an on-policy run's evaluation: the same model, prompts and seed give the same
    numbers. Settings that do not fit the models are one line each, before anything is generated."""
    from lmdistill.core.errors import LmdistillError

    if prompt_tokens >= block_size:
        raise LmdistillError(f"--prompt-tokens {prompt_tokens} must be shorter than a block ({block_size} tokens): "
                             "the prompts are each block's first tokens; lower --prompt-tokens or raise --block-size")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LmdistillError("--generate needs the tokenizer's EOS token to end the model's continuations, and this "
                             "tokenizer has none; set eos_token in its tokenizer_config.json")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    heads = held_out_prompts(blocks, prompts, prompt_tokens)
    longest_prompt = max(prompt_tokens, *(len(h) for h in heads))
    longest = longest_prompt + sampling.max_new_tokens
    for role, model in (("model", student), ("teacher", teacher)):
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None and longest > limit:
            raise LmdistillError(f"generated rows would reach {longest} tokens (prompts of up to {longest_prompt} + "
                                 f"--max-new-tokens {sampling.max_new_tokens}), more than the {role}'s {limit} "
                                 "positions; lower --max-new-tokens or --prompt-tokens")
    scores, written = generation_quality(student, teacher, heads, sampling, seed, eos, pad, vocab_size)
    samples = [{"prompt": tokenizer.decode(heads[i]), "continuation": tokenizer.decode(written[i])}
               for i in range(min(shown, len(heads)))]
    return {**scores, "gen_prompts": len(heads), "gen_prompt_tokens": prompt_tokens,
            "gen_max_new_tokens": sampling.max_new_tokens, "gen_sample_temperature": sampling.temperature,
            "gen_seed": seed, "gen_samples": samples}


def describe_generations(judged: dict) -> list[str]:
    """``judge_generations``' numbers as a few lines for the terminal."""
    t = judged["gen_sample_temperature"]
    caveat = "" if t == 1 else (f"; at temperature {t:g} the samples are not from the model's own distribution, so "
                                "this is not an estimate of that KL")
    sample = judged["gen_samples"][0] if judged["gen_samples"] else None
    lines = [f"generations: {judged['gen_prompts']} held-out prompts of {judged['gen_prompt_tokens']} tokens, up to "
             f"{judged['gen_max_new_tokens']} new tokens, temperature {t:g}, seed {judged['gen_seed']}",
             f"  teacher NLL of the model's samples {judged['gen_teacher_nll']:.4f} nats/token; the model's own NLL "
             f"{judged['gen_student_nll']:.4f}",
             f"  reverse KL(model || teacher) on its own samples: {judged['gen_reverse_kl']:.4f} nats/token "
             f"(teacher NLL - own NLL){caveat}",
             f"  repeated 4-grams {judged['gen_repetition']:.1%}; mean length {judged['gen_length']:.1f} tokens"]
    if sample is not None:
        lines.append(f"  e.g. {_one_line(sample['prompt'], 60)!r} -> {_one_line(sample['continuation'], 100)!r}")
    return lines


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
