"""The KD term between a teacher and a student that do not share a tokenizer.

Inputs come from ``data/alignment.py``: pairs of positions (teacher position, student position)
where both models have read the same text and are about to write the same text, and
``mapping``, for every teacher token the student token that the same text begins with
(``vocabulary_map``). At each pair the teacher's next-token distribution p is carried to the
student's vocabulary -- each teacher token's probability goes to the student token its text
begins with, so the teacher's " collection" counts for the student's " co" when that is how the
student starts to write it -- softened by T, and the term is forward KL from that carried
distribution to the student's q at T. Probability on teacher tokens that map to nothing (the
teacher's special tokens) is left out and the rest renormalised.

Inside a span the teacher writes in one token and the student in several (after the student's
" co", before its "ll" and "ection"), the teacher's distribution at the span's pair, narrowed to
the tokens the student writes beginning with what it has read, gives a sparse target for the
next student token (``alignment.ContinuationTargets``); those positions mix like the pairs.
Where the student writes in one token what the teacher writes in several ("123" against "1",
"2", "3"), the teacher's first token carries its probability to a shorter student token ("1")
than the one the student writes, which would get nothing. The teacher's probability of that
token's whole text is known, though: the product of its probabilities of its own tokens in the
span, from the same forward. That much is moved onto the student's token (``moves``). On
SmolLM2's tokens against the embedded tokenizer's this was 5% of the pairs, and the carried
distribution's NLL of the student's actual next token fell from 6.86 to 3.68 nats (the teacher's
own NLL there: 3.52). Where the teacher has nothing to say (inside a span it writes in several
tokens), the data's next token is the whole target.

With one tokenizer on both sides every token maps to itself, every position is a pair and the
term is the forward KL over the whole vocabulary: the ordinary KD term, value and gradient
(tested).

An earlier form kept forward KL on the tokens both vocabularies share and compared the rest with
ULD's sorted-probability distance (Boizard et al., 2024), as GOLD does. It did not help the
student (docs/cross-tokenizer.md): a shared short token means "this text, then a token boundary"
to the teacher, which puts its probability on the longer tokens the student lacks, so the KL
taught the student to avoid the very tokens it needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmdistill.core.batch import IGNORE_INDEX
from lmdistill.loss.dense import LossParts, check_loss_args, head_logits, normaliser


def carried_distribution(
    teacher_logits: torch.Tensor, mapping: torch.Tensor, vocab: int, temperature: float, moves: tuple | None = None
):
    """(K, vocab) fp32: the teacher's distribution carried to the student's vocabulary, then
    softened by T (carried at T = 1: what the teacher expects the student's next token to be).
    ``moves`` (``longer_token_moves``): mass moved from one student token to another per row,
    before softening."""
    p = F.softmax(teacher_logits.float(), dim=-1)
    mapped = mapping >= 0
    carried = p.new_zeros((p.shape[0], vocab)).index_add_(1, mapping[mapped], p[:, mapped])
    if moves is not None:
        token, source, mass = moves
        rows = torch.arange(len(carried), device=carried.device)
        carried[rows, source] -= mass.float()
        carried[rows, token] += mass.float()
        carried.clamp_min_(0.0)  # (the mass moved is never more than was there; rounding aside)
    if temperature != 1.0:
        carried = F.softmax(torch.log(carried) / temperature, dim=-1)
    return carried / carried.sum(-1, keepdim=True).clamp_min(torch.finfo(carried.dtype).tiny)


def span_rows(teacher_positions: torch.Tensor, longer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat teacher positions, the ``longer`` entry each belongs to): the positions whose
    predictions of the teacher's own tokens make up each span the student writes in one token
    (``longer`` (S, 2): pair index, teacher tokens in the span)."""
    counts = longer[:, 1]
    which = torch.repeat_interleave(torch.arange(len(longer)), counts)
    offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return teacher_positions.cpu()[longer[which, 0]] + offset, which


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 log-probabilities of ``tokens`` (N,) under ``logits`` (N, V)."""
    return F.log_softmax(logits.float(), dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)


def longer_token_moves(
    own_log_probs: torch.Tensor,
    which: torch.Tensor,
    longer: torch.Tensor,
    student_next: torch.Tensor,
    source: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, source, mass), each (K,) over the K pairs: at the pairs of ``longer`` the teacher's
    probability of the student's next token (``student_next``, (K,)) -- the product of its
    probabilities of its own tokens in the span, ``own_log_probs`` at ``span_rows`` (``which``
    names each one's span) -- moved from ``source`` (K,), the student token the teacher's first
    token there carries to; 0 elsewhere and where that carries to nothing."""
    device = student_next.device
    mass = torch.zeros(len(student_next), dtype=torch.float64, device=device)
    at = longer[:, 0].to(device)
    spans = torch.zeros(len(longer), dtype=torch.float64, device=device)
    spans.index_add_(0, which.to(device), own_log_probs.double())
    mass[at] = spans.exp()
    mass = torch.where(source >= 0, mass, 0.0)
    return student_next, source.clamp_min(0), mass.float()


def cross_tokenizer_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mapping: torch.Tensor,
    temperature: float,
    moves: tuple | None = None,
) -> torch.Tensor:
    """Per-pair KL(carried teacher || student) in nats, not multiplied by T^2.

    Args:
        student_logits: (K, Vs) the student's logits at the pairs' student positions.
        teacher_logits: (K, Vt) the teacher's logits at the pairs' teacher positions.
        mapping: (Vt,) int64, the student id each teacher id carries its probability to (-1: none).
        temperature: T > 0 for both.
        moves: ``longer_token_moves`` at the K pairs, or None.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    carried = carried_distribution(teacher_logits, mapping, log_q.shape[-1], temperature, moves)
    return (torch.xlogy(carried, carried) - carried * log_q).sum(-1)


def aligned_distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_positions: torch.Tensor,
    mapping: torch.Tensor,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool = True,
    num_tokens: int | float | None = None,
    continuation: tuple | None = None,
    moves: tuple | None = None,
) -> LossParts:
    """The distillation loss for a teacher with another tokenizer.

    At an aligned pair, the ordinary mix: ``kd_weight * T^2 * KD + (1 - kd_weight) * CE``, KD
    being ``cross_tokenizer_divergence`` (``teacher_logits`` (K, Vt) at the teacher's positions
    of the pairs; ``student_positions`` (K,) the student's, flat indices into its (B * (L - 1))
    predicting positions). At a student position without a partner (inside a stretch of text
    the two tokenizers cut differently) the teacher has no prediction to give, and the data's
    own next token is the whole target: CE with weight 1. So every position weighs as much as in
    an ordinary run, and with one tokenizer (every position a pair) this is the ordinary KD loss.
    ``continuation`` (positions, ids, weights): student positions inside a span the teacher
    writes in one token, with the teacher's sparse targets there; they mix as the pairs do.
    ``moves``: ``longer_token_moves`` at the pairs.
    Sums are divided by ``num_tokens``, the count of the student's targets. ``kd`` reports the KD
    term of the pairs and continuations; ``ce``, the CE of every target.
    """
    check_loss_args(temperature, kd_weight, "forward_kl")
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    y = targets.reshape(-1)
    num_valid = int((y != IGNORE_INDEX).sum())
    ce_each = F.cross_entropy(flat.float(), y, reduction="none", ignore_index=IGNORE_INDEX)  # 0 where ignored
    ce_sum = ce_each.sum()
    kd_unscaled_sum = ce_at_pairs = ce_sum.new_zeros(())
    if kd_weight > 0 and len(student_positions):
        kd_unscaled_sum = cross_tokenizer_divergence(
            flat[student_positions], teacher_logits, mapping, temperature, moves
        ).sum()
        ce_at_pairs = ce_each[student_positions].sum()
    if kd_weight > 0 and continuation is not None:
        positions = continuation[0]
        kd, _ = continuation_terms(flat[positions], y[positions], *continuation[1:], temperature)
        kd_unscaled_sum, ce_at_pairs = kd_unscaled_sum + kd, ce_at_pairs + ce_each[positions].sum()
    return _mixed(ce_sum, ce_at_pairs, kd_unscaled_sum, temperature, kd_weight, scale_by_t2, num_tokens, num_valid)


def continuation_terms(student_logits, targets, ids, weights, temperature: float):
    """(KD sum, CE sum) at continuation positions: forward KL from the teacher's sparse target
    (``weights`` over student ``ids``, (C, k), softened by T) to the student at T, and CE."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(1, ids)
    w = weights.float()
    if temperature != 1.0:
        w = torch.where(w > 0, w.clamp_min(1e-30) ** (1.0 / temperature), 0.0)
        w = w / w.sum(-1, keepdim=True)
    kd = (torch.xlogy(w, w) - w * log_q).sum()
    return kd, F.cross_entropy(student_logits.float(), targets, reduction="sum")


def _mixed(ce_sum, ce_at_pairs, kd_unscaled_sum, temperature, kd_weight, scale_by_t2, num_tokens, num_valid):
    """CE everywhere with weight 1, but at the pairs ``(1 - kd_weight) * CE + kd_weight * T^2 * KD``."""
    denom = normaliser(num_tokens, num_valid)
    kd_sum = kd_unscaled_sum * (temperature**2 if scale_by_t2 else 1.0)
    return LossParts(
        total=(ce_sum + kd_weight * (kd_sum - ce_at_pairs)) / denom,
        kd=(kd_sum / denom).detach(),
        kd_unscaled=(kd_unscaled_sum / denom).detach(),
        ce=(ce_sum / denom).detach(),
        num_valid=num_valid,
    )


def chunked_aligned_terms(
    student_hidden: torch.Tensor,
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    student_targets: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    mapping: torch.Tensor,
    *,
    temperature: float,
    vocab_sizes: tuple[int, int],
    chunk_size: int = 1024,
    moves: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD sum, CE sum) over K pairs, from the two models' final hidden states at the pairs
    ((K, Hs) and (K, Ht)), the student's targets there (K,), and their output layers ((weight,
    bias) each), with ``moves`` (``longer_token_moves``) at the pairs, holding ``chunk_size`` rows of each model's logits at a time: each chunk's
    logits are formed, reduced to its two sums and dropped, and formed again in the backward
    (activation checkpointing), so memory does not grow with K x the teacher's vocabulary.
    ``vocab_sizes``: (student, teacher) tokenizer lengths, where padded output layers are cut."""
    total = student_hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, len(student_hidden), chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(
            _chunk_terms,
            student_hidden[rows],
            *student_head,
            student_targets[rows],
            teacher_hidden[rows],
            *teacher_head,
            mapping,
            temperature,
            vocab_sizes,
            None if moves is None else tuple(m[rows] for m in moves),
            use_reentrant=False,
        )
    return total[0], total[1]


def _chunk_terms(s_hidden, s_weight, s_bias, targets, t_hidden, t_weight, t_bias, mapping, temperature, vocab, moves):
    student = head_logits(s_hidden, s_weight, s_bias, vocab[0])
    teacher = head_logits(t_hidden, t_weight, t_bias, vocab[1])
    kd = cross_tokenizer_divergence(student, teacher, mapping, temperature, moves).sum()
    return torch.stack([kd, F.cross_entropy(student.float(), targets, reduction="sum")])


def chunked_aligned_loss(ce: LossParts, kd_unscaled_sum, ce_at_pairs, spec, temperature: float, num_tokens):
    """``aligned_distillation_loss`` from the chunked CE of every target (``ce``, a LossParts of
    the fused loss without a teacher) and the pairs' sums (``chunked_aligned_terms``)."""
    num = normaliser(num_tokens, ce.num_valid)
    return _mixed(
        ce.total * num,
        ce_at_pairs,
        kd_unscaled_sum,
        temperature,
        spec.kd_weight,
        spec.scale_by_t2,
        num_tokens,
        ce.num_valid,
    )
