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

import time
from dataclasses import dataclass

import torch

from lmdistill.core.batch import Batch
from lmdistill.core.errors import LmdistillError
from lmdistill.loss.views import TeacherView
from lmdistill.teacher.generation import (
    Generator,
    HFGenerator,
    Sampling,
    continue_prompts,
    draw_seed,
    eos_and_pad,
    prompts_of,
    uniform_draw,
)
from lmdistill.teacher.judge import judge_held_out
from lmdistill.teacher.signals import TeacherSignal


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` is on-policy: drawn from (seed, step) alone."""
    return fraction >= 1.0 or (fraction > 0.0 and uniform_draw("on-policy", seed, step) < fraction)


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
            out.update(
                generated_tokens=self.generated_tokens,
                mean_generated_length=self.generated_tokens / max(self.rows, 1),
                generation_tokens_per_s=self.generated_tokens / max(self.seconds, 1e-9),
                generation_seconds=self.seconds,
                generation_share=self.seconds / max(step_seconds, 1e-9),
            )
        return out


class OnPolicy(TeacherSignal):
    """The live teacher signal, on the student's own continuations on on-policy steps."""

    def __init__(
        self,
        inner: TeacherSignal,
        generator: Generator,
        sampling: Sampling,
        prompt_tokens: int,
        fraction: float,
        seed: int,
        rank: int,
        eos_token_id: int,
        device: torch.device | str = "cpu",
        reduce=None,
        pad_token_id: int | None = None,
    ):
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
            rolled = continue_prompts(
                self.generator,
                prompts_of(batch, self.prompt_tokens),
                self.sampling,
                draw_seed("rollout", self.seed, step, self.rank, index),
                self.eos,
                self.pad,
                self.device,
            )
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

    def judge(self, student, teacher, eval_blocks, tokenizer, vocab_size: int, prompts: int = 16) -> dict:
        """At an evaluation: the teacher's judgement of the student's continuations of held-out
        prompts, with the rollouts' own settings (``judge.judge_held_out``)."""
        return judge_held_out(
            student,
            teacher,
            eval_blocks,
            tokenizer,
            vocab_size,
            prompts=prompts,
            prompt_tokens=self.prompt_tokens,
            sampling=self.sampling,
            seed=self.seed,
            eos=self.eos,
            pad=self.pad,
        )


def on_policy_signal(
    cfg, inner: TeacherSignal, student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, data, accelerator
) -> OnPolicy:
    """The run's on-policy signal (``distill.on_policy``) around its live teacher signal: checked
    against the models' positions, generating under the run's autocast, its counts summed over
    the processes."""

    settings = cfg.distill.on_policy
    check_lengths(
        settings, cfg.data.block_size, any(s.store.chat for s in data.sources), {"student": student, "teacher": teacher}
    )
    reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None

    eos, pad = eos_and_pad(tokenizer)
    if eos is None:
        raise LmdistillError(
            "distill.on_policy needs the tokenizer's EOS token to end the student's generations, "
            "and this tokenizer has none; set its eos_token or turn on-policy off"
        )
    sampling = Sampling(settings.max_new_tokens, settings.sample_temperature, settings.top_p)
    return OnPolicy(
        inner,
        HFGenerator(student, eos, pad, accelerator.autocast),
        sampling,
        settings.prompt_tokens,
        settings.fraction,
        cfg.run.seed,
        accelerator.process_index,
        eos,
        accelerator.device,
        reduce,
        pad,
    )


def check_lengths(settings, block_size: int, chat: bool, models: dict) -> None:
    """A prompt and its continuation must fit every model's positions: the longest prompt is
    ``prompt_tokens`` for packed text, and up to a block for chat data."""

    longest = (block_size - 1 if chat else settings.prompt_tokens) + settings.max_new_tokens
    for role, model in models.items():
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and longest > limit:
            raise LmdistillError(
                f"on-policy rows reach {longest} tokens (prompt up to "
                f"{longest - settings.max_new_tokens} + distill.on_policy.max_new_tokens "
                f"{settings.max_new_tokens}), more than the {role}'s {limit} positions; lower "
                "distill.on_policy.max_new_tokens"
                + (" or data.block_size" if chat else " or distill.on_policy.prompt_tokens")
            )
