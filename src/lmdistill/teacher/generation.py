"""The student writes: prompts cut from blocks, continued by a generator, packed back into batches.

Samples are reproducible: every draw is seeded from a key (``draw_seed``: the run's seed, the
step, the process, the micro-batch), so a resumed run writes the same continuations from the
same weights and a checkpoint needs no sampler state. The generator sits behind a small
interface (``Generator``) so that a faster engine can replace transformers' ``generate``
without touching the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch

from lmdistill.core.batch import Batch
from lmdistill.core.parallel import is_sharded


def uniform_draw(*key) -> float:
    """A uniform number in [0, 1) that depends only on ``key``."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def draw_seed(*key) -> int:
    return int(uniform_draw(*key) * 2**63)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


class Generator(Protocol):
    """``generator(prompts, sampling, seed, attention_mask) -> (B, P + N) ids``: each row's prompt
    (B, P; shorter prompts padded on the left, ``attention_mask`` 0 there) continued by up to N
    sampled tokens; rows that ended early are padded after their EOS."""

    def __call__(
        self, prompts: torch.Tensor, sampling: Sampling, seed: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class HFGenerator:
    """transformers' ``generate`` on the (unwrapped) student: KV cache, batched, no gradients, in
    eval mode (the student goes back to train mode after), the torch RNG forked and seeded,
    under the run's autocast. Only the sampling settings given here apply: the model's own
    ``generation_config`` (a repetition penalty, min_p, ... shipped with a checkpoint) is set
    aside for the call, so the tokens are drawn from the student's distribution as trained."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, autocast=None):
        # A LoRA student (a peft wrapper): generate with the model it wraps, adapters active in it.
        # peft's own generate copies the wrapper's generation config into that model and leaves it
        # there, which would replace the config the student is saved with.
        inner = getattr(model, "get_base_model", None)
        self.model = inner() if inner is not None else model
        self.eos, self.pad = eos_token_id, pad_token_id
        self.autocast = autocast or contextlib.nullcontext

    def config(self, sampling: Sampling, use_cache: bool = True):
        from transformers import GenerationConfig

        # remove_invalid_values: a student whose logits went NaN still writes (tokens of no
        # meaning) instead of failing in the sampler; the step's loss then decides, and a NaN
        # loss is skipped by the guard on every process alike.
        return GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            use_cache=use_cache,
            remove_invalid_values=True,
        )

    def __call__(
        self,
        prompts: torch.Tensor,
        sampling: Sampling,
        seed: int,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
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
                return self.model.generate(
                    input_ids=prompts,
                    attention_mask=mask,
                    synced_gpus=is_sharded(self.model),
                    generation_config=self.config(sampling, use_cache),
                )
        finally:
            self.model.generation_config = own
            self.model.train(was_training)


def eos_and_pad(tokenizer) -> tuple[int | None, int | None]:
    """The ids generation stops at and pads with: the tokenizer's EOS, and its pad token, else EOS."""
    eos = tokenizer.eos_token_id
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


def left_padded(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one (B, P) batch padded on the left, and its mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
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
    real = (
        batch.attention_mask.sum(1).tolist()
        if batch.attention_mask is not None
        else [batch.input_ids.shape[1]] * len(batch.input_ids)
    )
    for ids, targets, length in zip(batch.input_ids, batch.targets, real):
        valid = torch.nonzero(targets != -100)
        first = int(valid[0]) if len(valid) else 0
        prompts.append(ids[: first + 1] if first > 0 else ids[: min(prompt_tokens, max(int(length) - 1, 1))])
    return prompts


def continue_prompts(
    generator: Generator,
    prompts: list[torch.Tensor],
    sampling: Sampling,
    seed: int,
    eos_token_id: int,
    pad_token_id: int,
    device,
) -> Batch:
    """One batched generation (left-padded where prompts differ) and its training batch."""
    ids, mask = left_padded(prompts, pad_token_id)
    sequences = generator(ids.to(device), sampling, seed, attention_mask=mask.to(device)).cpu()
    return rollout_batch(prompts, sequences[:, ids.shape[1] :], eos_token_id, pad_token_id)
