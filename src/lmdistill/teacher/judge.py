"""Judging the student's own text with a teacher: ``lmdistill eval --generate`` and on-policy evaluations.

The student continues fixed held-out prompts (seeded: the same model, prompts and seed give the
same numbers), and the teacher scores every written token: its NLL, the student's own, and
their difference, a Monte Carlo estimate of KL(student || teacher) on the student's samples.
"""

from __future__ import annotations

import torch

from lmdistill.core.errors import LmdistillError
from lmdistill.loss.views import prediction_logits
from lmdistill.teacher.generation import HFGenerator, Sampling, continue_prompts, draw_seed, eos_and_pad, prompts_of
from lmdistill.teacher.signals import LiveLogits


def repeated_ngram_share(rows: list[list[int]], n: int = 4) -> float:
    """Share of the n-grams of the rows that repeat an earlier n-gram of the same row."""
    total = repeated = 0
    for row in rows:
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


@torch.no_grad()
def generation_quality(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: list[torch.Tensor],
    sampling: Sampling,
    seed: int,
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    batch_size: int = 8,
) -> tuple[dict, list[list[int]]]:
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

    generator = HFGenerator(student, eos_token_id, pad_token_id)
    teacher_signal = LiveLogits(teacher, vocab_size)  # the teacher as training meets it
    device = next(student.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64)  # teacher nll, student nll, tokens
    written: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = continue_prompts(
            generator,
            list(prompts[start : start + batch_size]),
            sampling,
            draw_seed("judge", seed, start),
            eos_token_id,
            pad_token_id,
            device,
        ).to(device)
        valid = batch.targets != -100
        safe = batch.targets.clamp(min=0).unsqueeze(-1)
        was_training = student.training
        student.eval()
        teacher_logits = teacher_signal(batch, 1.0).logits
        for i, logits in enumerate((teacher_logits, prediction_logits(student, batch, vocab_size))):
            logits = logits.float()
            nll = -torch.log_softmax(logits, -1).gather(-1, safe).squeeze(-1)
            sums[i] += nll[valid].sum().double().cpu()
        student.train(was_training)
        sums[2] += valid.sum().cpu()
        for row, keep in zip(batch.input_ids[:, 1:], valid):
            written.append(row[keep].tolist())
    tokens = max(float(sums[2]), 1.0)
    return {
        "gen_teacher_nll": float(sums[0]) / tokens,
        "gen_student_nll": float(sums[1]) / tokens,
        "gen_reverse_kl": float(sums[0] - sums[1]) / tokens,
        "gen_repetition": repeated_ngram_share(written),
        "gen_length": float(sums[2]) / max(len(prompts), 1),
    }, written


def held_out_prompts(blocks, count: int, prompt_tokens: int) -> list[torch.Tensor]:
    """The prompts (``prompts_of``) of the first ``count`` blocks, all of them when there are fewer:
    a fixed set, so that every judgement of a model with one seed sees the same prompts."""
    return prompts_of(blocks.batch(range(min(count, len(blocks)))), prompt_tokens)


def judge_held_out(
    student,
    teacher,
    eval_blocks,
    tokenizer,
    vocab_size: int,
    *,
    prompts: int,
    prompt_tokens: int,
    sampling: Sampling,
    seed: int,
    eos: int,
    pad: int,
    shown: int = 3,
) -> dict:
    """The student continues the prompts of the first ``prompts`` held-out blocks (the same ones,
    with the same seed, every time); the teacher-judged scores of ``generation_quality``, how
    many prompts, and ``shown`` prompt/continuation pairs as text."""
    heads = held_out_prompts(eval_blocks, prompts, prompt_tokens)
    scores, written = generation_quality(student, teacher, heads, sampling, seed, eos, pad, vocab_size)
    samples = [
        {"prompt": tokenizer.decode(heads[i]), "continuation": tokenizer.decode(written[i])}
        for i in range(min(shown, len(heads)))
    ]
    return {**scores, "gen_prompts": len(heads), "gen_samples": samples}


# ---------------------------------------------------------------------------- lmdistill eval --generate
def judge_generations(
    student,
    teacher,
    blocks,
    tokenizer,
    vocab_size: int,
    block_size: int,
    prompts: int,
    prompt_tokens: int,
    sampling: Sampling,
    seed: int,
    shown: int = 3,
) -> dict:
    """Any student's own text, judged by a teacher (``lmdistill eval --generate``): the student
    continues the prompts of the first ``prompts`` of ``blocks``, and ``generation_quality`` scores
    what it wrote. Returns those scores (``gen_reverse_kl`` among them: KL(student || teacher) on
    the student's own samples), the settings, and ``shown`` decoded samples.

    Seeded like an on-policy run's evaluation: the same model, prompts and seed give the same
    numbers. Settings that do not fit the models are one line each, before anything is generated."""

    eos, pad = check_generation_fits(
        student, teacher, blocks, tokenizer, block_size, prompts, prompt_tokens, sampling.max_new_tokens
    )
    judged = judge_held_out(
        student,
        teacher,
        blocks,
        tokenizer,
        vocab_size,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        sampling=sampling,
        seed=seed,
        eos=eos,
        pad=pad,
        shown=shown,
    )
    return {
        **judged,
        "gen_prompt_tokens": prompt_tokens,
        "gen_max_new_tokens": sampling.max_new_tokens,
        "gen_sample_temperature": sampling.temperature,
        "gen_seed": seed,
    }


def check_generation_fits(
    student, teacher, blocks, tokenizer, block_size: int, prompts: int, prompt_tokens: int, max_new_tokens: int
) -> tuple[int, int]:
    """Generation settings that the models and blocks cannot take are refused in one line each,
    before anything is generated; returns the (eos, pad) ids."""
    if prompt_tokens >= block_size:
        raise LmdistillError(
            f"--prompt-tokens {prompt_tokens} must be shorter than a block ({block_size} tokens): "
            "the prompts are each block's first tokens; lower --prompt-tokens or raise --block-size"
        )
    eos, pad = eos_and_pad(tokenizer)
    if eos is None:
        raise LmdistillError(
            "generating needs the tokenizer's EOS token to end the model's continuations, and this "
            "tokenizer has none; set eos_token in its tokenizer_config.json"
        )
    heads = held_out_prompts(blocks, prompts, prompt_tokens)
    longest_prompt = max(prompt_tokens, *(len(h) for h in heads))
    longest = longest_prompt + max_new_tokens
    for role, model in (("model", student), ("teacher", teacher)):
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None and longest > limit:
            raise LmdistillError(
                f"generated rows would reach {longest} tokens (prompts of up to {longest_prompt} + "
                f"--max-new-tokens {max_new_tokens}), more than the {role}'s {limit} "
                "positions; lower --max-new-tokens or --prompt-tokens"
            )
    return eos, pad


def describe_generations(judged: dict) -> list[str]:
    """``judge_generations``' numbers as a few lines for the terminal."""
    t = judged["gen_sample_temperature"]
    caveat = (
        ""
        if t == 1
        else (
            f"; at temperature {t:g} the samples are not from the model's own distribution, so "
            "this is not an estimate of that KL"
        )
    )
    sample = judged["gen_samples"][0] if judged["gen_samples"] else None
    lines = [
        f"generations: {judged['gen_prompts']} held-out prompts of {judged['gen_prompt_tokens']} tokens, up to "
        f"{judged['gen_max_new_tokens']} new tokens, temperature {t:g}, seed {judged['gen_seed']}",
        f"  teacher NLL of the model's samples {judged['gen_teacher_nll']:.4f} nats/token; the model's own NLL "
        f"{judged['gen_student_nll']:.4f}",
        f"  reverse KL(model || teacher) on its own samples: {judged['gen_reverse_kl']:.4f} nats/token "
        f"(teacher NLL - own NLL){caveat}",
        f"  repeated 4-grams {judged['gen_repetition']:.1%}; mean length {judged['gen_length']:.1f} tokens",
    ]
    if sample is not None:
        lines.append(f"  e.g. {_one_line(sample['prompt'], 60)!r} -> {_one_line(sample['continuation'], 100)!r}")
    return lines


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
