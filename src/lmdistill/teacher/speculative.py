"""The student as a draft model for the teacher: speculative decoding, measured.

transformers' assisted generation (``teacher.generate(..., assistant_model=draft)``): the draft
writes a few tokens ahead, the teacher checks them all in one forward and keeps the longest run
its own decoding agrees with, then adds one token of its own. Greedy, the text is exactly the
teacher's; sampled, it is drawn from the teacher's distribution (speculative sampling). What it
gains depends on two things, both measured here on held-out prompts, one prompt at a time (as
assisted generation runs):

- ``accepted_per_forward``: draft tokens kept per teacher forward, (new tokens - teacher
  forwards) / teacher forwards (each forward keeps the accepted tokens and adds one; the last
  one may be cut short by the token limit);
- ``draft_cost``: the draft's time per token written alone over the teacher's (both greedy).

``speedup`` is the teacher's time per new token alone over its time per new token with the
draft, each the median of ``repeats`` timed passes over the same prompts with the same settings
and seed. How far the draft writes ahead is set here, at transformers' defaults for an assistant:
up to 20 tokens, fewer when its own top probability falls below 0.4.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from lmdistill.core.errors import LmdistillError

MODES = ("greedy", "sampled")


@dataclass(frozen=True)
class DraftSettings:
    """How the drafting is measured: prompts (held-out blocks' first ``prompt_tokens`` tokens),
    tokens written per prompt, timed passes (the median is kept), the sampling seed."""

    prompts: int = 8
    prompt_tokens: int = 32
    max_new_tokens: int = 64
    repeats: int = 3
    seed: int = 0
    draft_tokens: int = 20  # the most the draft writes ahead per teacher forward
    confidence_threshold: float = 0.4  # it stops sooner when its top probability falls below this (0: never)


class _Calls:
    """Counts a module's forward calls while active."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.count, self.handle = module, 0, None

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hit)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hit(self, module, args):
        self.count += 1


@dataclass
class _Pass:
    seconds: float
    new_tokens: int
    teacher_forwards: int
    draft_forwards: int
    outputs: list[list[int]]


def check_draft_pair(draft, teacher, how: str) -> None:
    """transformers' assisted generation needs the two models' vocabularies of the same size
    (their configs' ``vocab_size``, padding included); one line otherwise, before any work."""
    sizes = (draft.config.vocab_size, teacher.config.vocab_size)
    if sizes[0] != sizes[1]:
        raise LmdistillError(
            f"{how}: the student's config.vocab_size is {sizes[0]} and the teacher's {sizes[1]}; transformers' assisted "
            "generation needs them equal (the same tokenizer is not enough when one model pads its vocabulary), so "
            "this pair cannot be measured drafting; the expected acceptance (without it) still is"
        )


def _generation_config(mode: str, max_new_tokens: int, eos: int, pad: int):
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if mode == "sampled" else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)


@contextlib.contextmanager
def _drafting_as(draft, settings: DraftSettings):
    """The draft's assistant settings (read from its generation config by transformers) for the
    measurement, and its models in eval mode, put back afterwards; transformers' notes quiet."""
    from transformers.utils import logging as hf_logging

    config = draft.generation_config
    keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    saved = {k: getattr(config, k, None) for k in keys}
    config.num_assistant_tokens = settings.draft_tokens
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = settings.confidence_threshold
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        for key, value in saved.items():
            setattr(config, key, value)


@torch.no_grad()
def _one_pass(model, prompts: list[torch.Tensor], config, seed: int, assistant=None) -> _Pass:
    """``model`` continues every prompt alone (with ``assistant`` drafting, if given), timed."""
    device = next(model.parameters()).device
    outputs, new_tokens, seconds = [], 0, 0.0
    draft_calls = _Calls(assistant) if assistant is not None else contextlib.nullcontext()
    devices = [device] if device.type == "cuda" else []
    # the seeds are set for these passes only: the caller's random state (a run's) is put back
    with torch.random.fork_rng(devices=devices), _Calls(model) as teacher_calls, draft_calls:
        for i, prompt in enumerate(prompts):
            ids = prompt.view(1, -1).to(device)
            torch.manual_seed(seed + i)
            started = time.perf_counter()
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=config, assistant_model=assistant
            )
            seconds += time.perf_counter() - started
            written = out[0, ids.shape[1] :].tolist()
            outputs.append(written)
            new_tokens += len(written)
    drafts = draft_calls.count if assistant is not None else 0
    return _Pass(seconds, new_tokens, teacher_calls.count, drafts, outputs)


def _timed(model, prompts, config, settings: DraftSettings, assistant=None) -> tuple[_Pass, float]:
    """The first pass (its counts: the same seeds give the same tokens in every pass) and the
    median seconds per new token over ``settings.repeats`` passes."""
    passes = [_one_pass(model, prompts, config, settings.seed, assistant) for _ in range(settings.repeats)]
    return passes[0], statistics.median(p.seconds / max(p.new_tokens, 1) for p in passes)


def measure_drafting(draft, teacher, prompts: list[torch.Tensor], settings: DraftSettings, eos: int, pad: int) -> dict:
    """Assisted generation of ``teacher`` with ``draft`` on ``prompts``, greedy and sampled, against
    the teacher alone (see the module docstring for each number)."""
    modes = {draft: draft.training, teacher: teacher.training}
    for model in modes:
        model.eval()
    try:
        with _drafting_as(draft, settings):
            return _measure(draft, teacher, prompts, settings, eos, pad)
    finally:
        for model, was_training in modes.items():
            model.train(was_training)


def _measure(draft, teacher, prompts, settings: DraftSettings, eos: int, pad: int) -> dict:
    result: dict = {}
    greedy = _generation_config("greedy", settings.max_new_tokens, eos, pad)
    _, draft_rate = _timed(draft, prompts, greedy, settings)
    for mode in MODES:
        config = _generation_config(mode, settings.max_new_tokens, eos, pad)
        alone, alone_rate = _timed(teacher, prompts, config, settings)
        assisted, assisted_rate = _timed(teacher, prompts, config, settings, assistant=draft)
        forwards = max(assisted.teacher_forwards, 1)
        result[f"draft_{mode}_accepted_per_forward"] = (assisted.new_tokens - forwards) / forwards
        result[f"draft_{mode}_draft_forwards_per_teacher_forward"] = assisted.draft_forwards / forwards
        result[f"draft_{mode}_speedup"] = alone_rate / assisted_rate
        result[f"draft_{mode}_new_tokens"] = assisted.new_tokens
        result[f"draft_{mode}_teacher_forwards"] = assisted.teacher_forwards
        if mode == "greedy":  # greedy assisted generation must write the teacher's own text
            same = sum(a == b for a, b in zip(assisted.outputs, alone.outputs))
            result["draft_greedy_identical"] = same / max(len(prompts), 1)
            result["draft_cost"] = draft_rate / alone_rate
    result["draft_settings"] = {
        "prompts": len(prompts),
        "prompt_tokens": settings.prompt_tokens,
        "max_new_tokens": settings.max_new_tokens,
        "repeats": settings.repeats,
        "seed": settings.seed,
        "draft_tokens": settings.draft_tokens,
        "confidence_threshold": settings.confidence_threshold,
        "device": str(next(teacher.parameters()).device),
    }
    return result


def describe_drafting(result: dict) -> list[str]:
    """``measure_drafting``'s numbers as a few lines for the terminal."""
    s = result["draft_settings"]
    lines = [
        f"assisted generation (the model drafting for the teacher): {s['prompts']} held-out prompts of "
        f"{s['prompt_tokens']} tokens, up to {s['max_new_tokens']} new tokens, median of {s['repeats']} pass{'es' if s['repeats'] != 1 else ''} "
        f"on {s['device']}; the draft costs {result['draft_cost']:.2f}x the teacher per token"
    ]
    for mode in MODES:
        lines.append(
            f"  {mode}: {result[f'draft_{mode}_accepted_per_forward']:.2f} draft tokens accepted per teacher "
            f"forward; speedup {result[f'draft_{mode}_speedup']:.2f}x over the teacher alone"
        )
    return lines
