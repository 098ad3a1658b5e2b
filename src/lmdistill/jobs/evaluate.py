"""``lmdistill eval``: a saved model's held-out perplexity, its agreement with a teacher, and the
teacher's judgement of its own text.

The model is scored by ``training.evaluate`` exactly as a run scores its student, the teacher
through the same signal (``LiveLogits``) that trains against it; a teacher with another
tokenizer through ``LiveAligned``, both models then in bits per byte as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmdistill.config import Config, DataConfig, load_yaml
from lmdistill.core.errors import LmdistillError
from lmdistill.core.paths import atomic_write_json
from lmdistill.data.sources import block_data_of, build_block_data
from lmdistill.models.loading import (
    check_causal,
    check_context_length,
    check_vocab_covers,
    freeze,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
    tokenizer_difference,
)
from lmdistill.teacher.generation import eos_and_pad
from lmdistill.teacher.judge import check_generation_fits, describe_generations, held_out_prompts, judge_generations
from lmdistill.teacher.signals import LiveAligned, LiveLogits
from lmdistill.teacher.speculative import DraftSettings, check_draft_pair, describe_drafting, measure_drafting
from lmdistill.training.evaluate import evaluate, format_ppl
from lmdistill.training.layout import MARKER


@dataclass(frozen=True)
class EvalRequest:
    """What ``lmdistill eval`` was asked (its flags, checked by the command line)."""

    model: str
    data: str | None = None
    teacher: str | None = None
    text_field: str = "text"
    block_size: int | None = None
    batch_size: int = 8
    max_blocks: int | None = None
    temperature: float = 1.0
    generation: dict | None = None  # judge_generations' settings, with --generate
    draft: DraftSettings | None = None  # with --draft-for: the model drafting for the teacher
    json: Path | None = None
    progress: bool = True


def evaluate_model(request: EvalRequest) -> dict:
    """Score the model, print what was measured, write ``request.json``; returns the numbers."""
    source, run_cfg = _model_source(request.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(source, "model")
    model = _checked_model(source, "model", tokenizer, device)
    teacher = teacher_tokenizer = None
    if request.teacher:
        t_source = resolve_source(request.teacher, "--teacher")
        t_tokenizer = load_tokenizer(t_source, "teacher")
        if (problem := tokenizer_difference(t_tokenizer, tokenizer)) is not None:
            _check_cross_request(request, problem)
            teacher_tokenizer = t_tokenizer
        teacher = _checked_model(t_source, "teacher", t_tokenizer, device)
    blocks, block_size, description = _blocks(request, run_cfg, tokenizer, teacher_tokenizer)
    for m, role, name in ((model, "model", source), (teacher, "teacher", request.teacher)):
        if m is not None:
            check_context_length(m, block_size, role, name)
    judged = None
    if request.draft is not None:  # first: settings that do not fit the models are refused before the evaluation
        d = request.draft
        check_draft_pair(model, teacher, "--draft-for")
        check_generation_fits(
            model, teacher, blocks, tokenizer, block_size, d.prompts, d.prompt_tokens, d.max_new_tokens
        )
    if request.generation is not None:
        judged = judge_generations(model, teacher, blocks, tokenizer, len(tokenizer), block_size, **request.generation)
    signal = LiveLogits(teacher, len(tokenizer)) if teacher is not None else None
    if teacher_tokenizer is not None:
        signal = LiveAligned(teacher, teacher_tokenizer, tokenizer)
    result = evaluate(
        model,
        signal,
        blocks,
        vocab_size=len(tokenizer),
        temperature=request.temperature,
        batch_size=request.batch_size,
        device=device,
        progress=request.progress,
    )
    print(f"model: {source}\ndata: {description} ({len(blocks)} blocks of {block_size} tokens)")
    print("\n".join(_describe(result, teacher is not None)))
    if judged is not None:
        result.update(judged)
        print("\n".join(describe_generations(judged)))
    if request.draft is not None:
        drafted = _drafting(model, teacher, blocks, tokenizer, request.draft)
        result.update(drafted)
        print("\n".join(describe_drafting(drafted)))
    if request.json:
        atomic_write_json(request.json, result)
    return result


def _drafting(model, teacher, blocks, tokenizer, settings: DraftSettings) -> dict:
    eos, pad = eos_and_pad(tokenizer)
    prompts = held_out_prompts(blocks, settings.prompts, settings.prompt_tokens)
    return measure_drafting(model, teacher, prompts, settings, eos, pad)


def _model_source(model: str) -> tuple[str, Config | None]:
    """The model to load (a run directory means its final student) and the run's config, if any."""
    path = Path(model)
    if (path / "manifest.json").is_file():
        raise LmdistillError(
            f"'{path}' is a training checkpoint, not a model directory; export it first: lmdistill "
            f"export {path} OUT, then lmdistill eval OUT"
        )
    if (path / MARKER).is_file() and not (path / "student" / "config.json").is_file():
        raise LmdistillError(
            f"run '{path}' has no final student yet (the run did not finish); export its newest "
            f"checkpoint with lmdistill export {path} OUT and evaluate OUT, or finish the run with "
            f"lmdistill train --resume {path}"
        )
    run_cfg = None
    if (path / "student" / "config.json").is_file():  # a run: its student, on its own held-out blocks
        if (path / "config.yaml").is_file():
            run_cfg = Config.from_dict(load_yaml(path / "config.yaml"))
        path = path / "student"
    return resolve_source(str(path) if path.exists() else model, "model"), run_cfg


def _checked_model(source: str, role: str, tokenizer, device: str):
    model = freeze(load_causal_lm(source, role, torch.float32)).to(device)
    check_vocab_covers(model, len(tokenizer), role, source)
    check_causal(model, role, source, len(tokenizer))  # a perplexity of next-token predictions, as train
    return model


def _check_cross_request(request: EvalRequest, problem: str) -> None:
    """What ``lmdistill eval`` cannot do with a teacher of another tokenizer."""
    if request.generation is not None or request.draft is not None:
        flag = "--generate" if request.generation is not None else "--draft-for"
        raise LmdistillError(
            f"{flag} needs the teacher to read the model's tokens, and the two use different tokenizers ({problem}); "
            f"drop {flag}"
        )
    print(f"note: model and teacher use different tokenizers ({problem}): comparing them in bits per byte")


def _blocks(request: EvalRequest, run_cfg: Config | None, tokenizer, teacher_tokenizer=None):
    """(blocks, block size, description) of the text to score (with the teacher's tokens of each
    block's text, for a ``teacher_tokenizer`` that differs)."""
    data_cfg = run_cfg.data if run_cfg is not None else DataConfig()
    if request.data is None:
        # A run's own held-out blocks; for any other model, the held-out split a default run of the
        # embedded corpus keeps (not every block of it: the other 95% is what such a run trains on).
        if request.block_size is not None:
            data_cfg.block_size = request.block_size
        data = build_block_data(data_cfg, tokenizer, teacher_tokenizer=teacher_tokenizer)
        blocks, block_size = data.eval, data_cfg.block_size
        whose = "the run's" if run_cfg is not None else "the embedded corpus'"
        description = f"{whose} held-out blocks ({data.eval_source}; source: {data.source})"
    else:
        # Another text for a run's student: cut as the run cut its data (block size, stores, loss_on).
        data_cfg.path, data_cfg.text_field, data_cfg.sources = request.data, request.text_field, None
        block_size = data_cfg.block_size = request.block_size or (run_cfg.data.block_size if run_cfg else 128)
        blocks, description = block_data_of(
            request.data,
            data_cfg,
            tokenizer,
            role="--data",
            progress=request.progress,
            teacher_tokenizer=teacher_tokenizer,
        )
    if request.max_blocks is not None:
        blocks = blocks.subset(slice(0, request.max_blocks))
    if len(blocks) == 0:
        raise LmdistillError(
            f"--data '{request.data}' gives no block of {block_size} tokens; add text or lower --block-size"
        )
    return blocks, block_size, description


def _describe(result: dict, with_teacher: bool) -> list[str]:
    lines = [f"perplexity {format_ppl(result['eval_ppl'])}  (CE {result['eval_ce_loss']:.4f} nats/token)"]
    if "teacher_bpb" in result:  # a teacher with another tokenizer: only bits per byte compare
        return [
            f"bits per byte of the text: model {result['eval_bpb']:.4f}, teacher {result['teacher_bpb']:.4f}",
            lines[0],
            f"teacher perplexity over its own tokens {format_ppl(result['teacher_ppl'])}  "
            f"(CE {result['teacher_ce_loss']:.4f})",
            f"at the {result['aligned_fraction']:.0%} of positions aligned with the teacher's: top-1 agreement "
            f"{result['top1_agreement']:.1%}, cross-tokenizer divergence at T=1 {result['eval_kl']:.4f} nats",
        ]
    if with_teacher:
        lines.append(f"teacher perplexity {format_ppl(result['teacher_ppl'])}  (CE {result['teacher_ce_loss']:.4f})")
        lines.append(
            f"KL(teacher || model) at T=1: {result['eval_kl']:.4f} nats/token; "
            f"top-1 agreement {result['top1_agreement']:.1%}"
        )
        lines.append(
            f"as a draft model for the teacher: expected acceptance {result['draft_acceptance']:.1%} per token "
            "(speculative sampling, sum of min(p_teacher, p_model))"
        )
    return lines
