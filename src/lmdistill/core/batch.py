"""What one micro-batch carries through the training step.

Position i of a sequence predicts ``targets[:, i]``, the token at position i + 1, or nothing
(``IGNORE_INDEX``, -100): a padding position, a prompt the loss should not train on, the
last position of a sequence. Every loss term is summed over the valid targets only and
divided by the global count of them, so a batch of packed text blocks (all valid) and a
batch of padded generations (many ignored) are normalised alike.

The count of valid targets is taken on the host when the batch is built, before it moves to
the device, so the trainer learns the normaliser without waiting for the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the target of a position the loss does not train on (torch's cross_entropy default)


@dataclass
class TeacherTokens:
    """The teacher's own tokenization of a batch's text, for a teacher with another tokenizer.

    batch: the teacher's tokens of the same stretches of text, one row per student row
        (padded on the right; its ``targets`` are the teacher's next tokens).
    teacher_positions, student_positions: (K,) flat indices into the (B * (Lt - 1)) teacher
        and (B * (L - 1)) student predicting positions: the pairs where both models are about
        to write the same text (``data/alignment.py``).
    teacher_bytes: UTF-8 bytes of the text the teacher's targets cover (bits per byte are
        comparable across tokenizers; perplexities are not; the student's are ``Batch.target_bytes``).
    continuations: (C, 3) student positions inside a span the teacher writes in one token:
        (flat student position, index of the pair at the span's start, student tokens read
        since that pair), on the host.
    longer: (S, 2) pairs whose next student token the teacher writes in several tokens: (index
        of the pair, how many), on the host.
    """

    batch: Batch
    teacher_positions: torch.Tensor
    student_positions: torch.Tensor
    teacher_bytes: int
    continuations: torch.Tensor | None = None
    longer: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTokens:
        return TeacherTokens(
            self.batch.to(device, non_blocking),
            self.teacher_positions.to(device, non_blocking=non_blocking),
            self.student_positions.to(device, non_blocking=non_blocking),
            self.teacher_bytes,
            self.continuations,
            self.longer,
        )

    def pin_memory(self) -> TeacherTokens:
        return dataclasses.replace(
            self,
            batch=self.batch.pin_memory(),
            teacher_positions=self.teacher_positions.pin_memory(),
            student_positions=self.student_positions.pin_memory(),
        )


@dataclass
class Batch:
    """One micro-batch.

    input_ids: (B, L) token ids.
    attention_mask: (B, L) 1 for real tokens, 0 for padding; None when every position is real.
    targets: (B, L - 1) next-token ids for positions 0 .. L - 2, ``IGNORE_INDEX`` where none.
    num_targets: number of valid entries of ``targets`` (a host int).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    targets: torch.Tensor
    num_targets: int
    rows: torch.Tensor | None = None  # the blocks' rows in the run's train (or eval) blocks, when they came from there
    generated: bool = False  # prompts continued by the student (an on-policy step): the objective's on-policy loss
    teacher_tokens: TeacherTokens | None = None  # the teacher's tokens of the same text, when its tokenizer differs
    target_bytes: int | None = None  # UTF-8 bytes of the text the targets cover, when the store knows it

    @property
    def all_valid(self) -> bool:
        """Every position has a target (packed text): the losses can skip their masking."""
        return self.num_targets == self.targets.numel()

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor) -> Batch:
        """Packed text blocks (B, L): every token but the first is the target of the one before."""
        targets = blocks[:, 1:]
        return cls(blocks, None, targets, targets.numel())

    @classmethod
    def from_ids(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None
    ) -> Batch:
        """Sequences with padding (attention_mask 0) or positions without loss (loss_mask 0).

        ``loss_mask`` (B, L) marks the tokens to be predicted (e.g. a completion after its
        prompt); a target is valid where its token is real and in the loss mask.
        """
        targets = input_ids[:, 1:].clone()
        keep = torch.ones_like(targets, dtype=torch.bool)
        if attention_mask is not None:
            keep &= attention_mask[:, 1:].bool()
        if loss_mask is not None:
            keep &= loss_mask[:, 1:].bool()
        targets[~keep] = IGNORE_INDEX
        return cls(input_ids, attention_mask, targets, int(keep.sum()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device``; ``non_blocking``: an asynchronous copy, for pinned host memory."""
        mask = self.attention_mask.to(device, non_blocking=non_blocking) if self.attention_mask is not None else None
        paired = self.teacher_tokens.to(device, non_blocking) if self.teacher_tokens is not None else None
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            mask,
            self.targets.to(device, non_blocking=non_blocking),
            self.num_targets,
            self.rows,
            self.generated,
            paired,
            self.target_bytes,
        )

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (a CUDA device copies from it asynchronously)."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory() if self.attention_mask is not None else None,
            targets=self.targets.pin_memory(),
            teacher_tokens=self.teacher_tokens.pin_memory() if self.teacher_tokens is not None else None,
        )
