"""KD against sparse teacher targets (an offline cache), chunked from hidden states.

A cached teacher gives, per position, a handful of vocabulary ids with the probability mass
the teacher puts on them (``SparseTargets``):

- ``sampled`` (random-sampled KD, Anshumann et al. 2025): S ids drawn from the teacher's
  distribution with their counts, so ``weights = counts / S``. Forward KL is linear in the
  teacher's distribution, so ``sum_j w_j (log p_j - log q_j)`` has the expected value of
  ``KL(p || q)`` and its gradient with respect to the student's scaled logits,
  ``softmax(s) - w``, has the expected value of the dense gradient ``softmax(s) - p``:
  unbiased, unlike top-k.
- ``topk``: the k most likely ids with their probabilities, and the rest of the mass as a
  tail bucket. The loss is the forward KL between the two (k + 1)-bucket distributions; its
  gradient is that of a dense KL against a teacher whose tail has the *student's* shape:
  ``q_j - p_j`` on the k ids, ``q_j (1 - p_tail / q_tail)`` elsewhere. Biased as an
  estimate of the dense KL, exact as what it is.

A cache captured across tokenizers (``present``) has targets at some positions only: where
the teacher says nothing, the data's next token is the whole target, CE with weight 1, as in
the live cross-tokenizer loss (``crosstok.py``).

Only forward KL is offered for sparse targets: the other divergences of the registry need
the teacher's probability of every token the student puts mass on (reverse KL, JSD, TVD),
which neither form has. A dense cache keeps full logits and goes through ``chunked.py`` with
every divergence.

As in ``chunked.py``, the student's logits exist one chunk of rows at a time, in fp32; the
gradient of the folded loss is pushed through the lm_head before the next chunk, and the
autograd node only scales the stored gradients. CE is at T = 1 on the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.loss.chunked import _add_matmul, _logits, hand_out_grads
from lmdistill.loss.dense import IGNORE_INDEX, LossParts, normaliser

__all__ = ["SparseTargets", "sparse_distillation_loss", "sparse_logits_distillation_loss"]


@dataclass
class SparseTargets:
    """The teacher's view of N positions, already at the training temperature.

    ids: (N, S) int64 vocabulary ids; a slot with weight 0 is padding.
    weights: (N, S) fp32, the teacher's probability mass on each id (summing to 1 with
        ``tail``, or to 1 alone for ``sampled``).
    logp: (N, S) fp32, log p_T(id): the teacher's log-probability of the id (for the value
        of the loss; the gradient needs only ``weights``).
    tail: (N,) fp32 mass outside ``ids`` (``topk``), or None (``sampled``).
    entropy: (N,) fp32 the teacher's entropy, when known exactly: the value of the loss then
        uses it for ``-sum p log p`` instead of its estimate ``sum w logp`` (same expectation,
        no variance; the gradient does not involve it).
    present: (N,) bool, where the teacher has a target (a cache across tokenizers); elsewhere
        the row's other fields are not read, and the position gets CE with weight 1. None: every
        position has one.
    paired: (N,) bool, the targets at positions where teacher and student are about to write the
        same text (a cache across tokenizers): what an evaluation's KL and agreement are over.
    """

    ids: Tensor
    weights: Tensor
    logp: Tensor
    tail: Tensor | None = None
    entropy: Tensor | None = None
    present: Tensor | None = None
    paired: Tensor | None = None

    def _map(self, f) -> SparseTargets:
        return SparseTargets(*(None if t is None else f(t) for t in self._fields()))

    def _fields(self) -> tuple:
        return self.ids, self.weights, self.logp, self.tail, self.entropy, self.present, self.paired

    def rows(self, index) -> SparseTargets:
        return self._map(lambda t: t[index])

    def to(self, device) -> SparseTargets:
        return self._map(lambda t: t.to(device))


def _chunk(zs: Tensor, y_c, t: SparseTargets, c: dict, with_kd: bool, need_grad: bool) -> tuple:
    """(grad of the folded loss w.r.t. the chunk's logits ``zs``, CE sum, KD sum, CE sum where the
    teacher is silent) for one chunk; ``c``: the loss's constants (``_settings``). ``zs`` is fp32
    and this function's own (it is scaled in place)."""
    ls1 = torch.log_softmax(zs, dim=-1)
    ce_rows = -ls1.gather(1, y_c.unsqueeze(1)).squeeze(1)
    silent = None if t.present is None or not with_kd else ~t.present
    kd_sum = ce_rows.new_zeros(())
    grad_kd = None
    if with_kd:
        ls = ls1 if c["inv_t"] == 1.0 else torch.log_softmax(zs.mul_(c["inv_t"]), dim=-1)
        kd_rows, grad_kd = _kd_rows(ls, t, need_grad)
        if silent is not None:
            kd_rows = kd_rows.masked_fill(silent, 0.0)
            if grad_kd is not None:
                grad_kd.masked_fill_(silent.unsqueeze(1), 0.0)
        kd_sum = kd_rows.sum()
    ce_silent = ce_rows[silent].sum() if silent is not None else kd_sum.new_zeros(())
    if not need_grad:
        return None, ce_rows.sum(), kd_sum, ce_silent
    # CE's gradient, (1 - w) / N per row, and 1 / N where the teacher is silent
    weight = torch.full_like(ce_rows, c["c_ce"])
    if silent is not None:
        weight.masked_fill_(silent, c["c_ce"] + c["c_silent"])
    grad = ls1.exp_().mul_(weight.unsqueeze(1))
    grad.scatter_add_(1, y_c.unsqueeze(1), -weight.unsqueeze(1))
    if grad_kd is not None:
        grad.add_(grad_kd, alpha=c["c_kd"])
    return grad, ce_rows.sum(), kd_sum, ce_silent


def _kd_rows(ls: Tensor, t: SparseTargets, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(per-row KD, its gradient w.r.t. the scaled logits or None) of log-softmax ``ls`` at T."""
    ls_ids = ls.gather(1, t.ids)
    has = t.weights > 0
    if t.entropy is not None and t.tail is None:
        kd_rows = -t.entropy - torch.where(has, t.weights * ls_ids, 0.0).sum(1)
    else:
        kd_rows = torch.where(has, t.weights * (t.logp - ls_ids), 0.0).sum(1)
    if t.tail is not None:
        log_q_tail = torch.logsumexp(ls.scatter(1, t.ids, float("-inf")), dim=-1)
        kd_rows = kd_rows + torch.xlogy(t.tail, t.tail) - t.tail * log_q_tail
    if not need_grad:
        return kd_rows, None
    q = ls.exp()
    if t.tail is None:  # sampled: softmax(s) - w
        return kd_rows, q.scatter_add_(1, t.ids, -t.weights)
    # topk: q (1 - p_tail / q_tail) off the ids, q - p on them
    grad_kd = q * (1.0 - torch.exp(torch.log(t.tail) - log_q_tail)).unsqueeze(1)
    return kd_rows, grad_kd.scatter_(1, t.ids, ls_ids.exp() - t.weights)


def sparse_kd_sum(logits: Tensor, targets: Tensor, teacher: SparseTargets, temperature: float) -> Tensor:
    """The KD sum (forward KL at ``temperature``, without T^2) of ``logits`` (N, V) predicting
    ``targets`` (N,) against ``teacher``, with no gradient (evaluation); ``logits`` is not changed."""
    constants = {"inv_t": 1.0 / temperature, "c_ce": 0.0, "c_kd": 0.0, "c_silent": 0.0}
    return _chunk(logits.to(torch.float32, copy=True), targets, teacher, constants, True, False)[2]


class _SparseKD(torch.autograd.Function):
    """Loss and student gradients in one pass over the chunks; backward only scales them."""

    @staticmethod
    def forward(ctx, h, w, b, y, rows, targets: SparseTargets, settings: dict):
        vocab, chunk = settings["vocab"], settings["chunk_size"]
        need_h, need_w, need_b = settings["need"]
        need_grad = need_h or need_w or need_b
        w_v, b_v = w[:vocab], (b[:vocab] if b is not None else None)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        ce_total = torch.zeros((), dtype=torch.float32, device=h.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=h.device)
        silent_total = torch.zeros((), dtype=torch.float32, device=h.device)
        autocast = torch.is_autocast_enabled(h.device.type)
        mm_dtype = torch.get_autocast_dtype(h.device.type) if autocast else w.dtype
        for start in range(0, len(rows), chunk):
            sel = rows[start : start + chunk]
            h_c = h.index_select(0, sel).to(mm_dtype)
            grad_z, ce_sum, kd_sum, ce_silent = _chunk(
                _logits(h_c, w_v, b_v, None),
                y.index_select(0, sel),
                targets.rows(sel),
                settings,
                settings["with_kd"],
                need_grad,
            )
            ce_total += ce_sum
            kd_total += kd_sum
            silent_total += ce_silent
            if grad_z is None:
                continue
            if need_b:
                grad_b[:vocab] += grad_z.sum(dim=0)
            g = grad_z.to(mm_dtype)
            if need_h:
                grad_h.index_copy_(0, sel, (g @ w_v).to(h.dtype))
            if need_w:
                _add_matmul(grad_w[:vocab], g.t(), h_c)
        total = _folded(settings, ce_total, kd_total, silent_total)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, w.dtype, b.dtype if b is not None else None)
        ctx.mark_non_differentiable(ce_total, kd_total)
        return total, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_h, grad_w, grad_b = hand_out_grads(ctx, grad_total, "sparse_distillation_loss")
        return grad_h, grad_w, grad_b, None, None, None, None


class _SparseLogitsKD(torch.autograd.Function):
    """The same loss from logits the model has already formed (when tokens x vocabulary is small):
    the gradient with respect to the logits is formed in the forward pass, and autograd takes it
    back through the lm_head as for plain CE, with no hand-written matmuls."""

    @staticmethod
    def forward(ctx, z, y, rows, targets: SparseTargets, settings: dict):
        need_grad = settings["need"][0]
        grad_z = torch.zeros(z.shape, dtype=torch.float32, device=z.device) if need_grad else None
        ce_total = torch.zeros((), dtype=torch.float32, device=z.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=z.device)
        silent_total = torch.zeros((), dtype=torch.float32, device=z.device)
        chunk = settings["chunk_size"]
        for start in range(0, len(rows), chunk):
            sel = rows[start : start + chunk]
            grad_c, ce_sum, kd_sum, ce_silent = _chunk(
                z.index_select(0, sel).float(),
                y.index_select(0, sel),
                targets.rows(sel),
                settings,
                settings["with_kd"],
                need_grad,
            )
            ce_total += ce_sum
            kd_total += kd_sum
            silent_total += ce_silent
            if grad_c is not None:
                grad_z.index_copy_(0, sel, grad_c)
        total = _folded(settings, ce_total, kd_total, silent_total)
        ctx.grads, ctx.dtypes = (grad_z,), (z.dtype,)
        ctx.mark_non_differentiable(ce_total, kd_total)
        return total, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        (grad_z,) = hand_out_grads(ctx, grad_total, "sparse_logits_distillation_loss")
        return grad_z, None, None, None, None


def _folded(settings: dict, ce_total: Tensor, kd_total: Tensor, silent_total: Tensor) -> Tensor:
    """The loss: ``(w T^2 KD + (1 - w) CE) / N``, plus ``w CE / N`` where the teacher is silent."""
    folded = settings["kd_coef"] * kd_total + settings["ce_coef"] * ce_total + settings["silent_coef"] * silent_total
    return folded / settings["denom"]


def _settings(
    y: Tensor,
    teacher: SparseTargets | None,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool,
    num_tokens,
    chunk_size: int,
    ignore_index: int,
    need: tuple[bool, bool, bool],
) -> tuple:
    """(rows with a target, the constants of the folded loss, teacher or an empty stand-in, T^2)."""
    rows = (y != ignore_index).nonzero().squeeze(1)
    t2 = temperature**2 if scale_by_t2 else 1.0
    denom = normaliser(num_tokens, rows.numel())
    with_kd = kd_weight > 0 and teacher is not None
    settings = {
        "chunk_size": int(chunk_size),
        "with_kd": with_kd,
        "inv_t": 1.0 / temperature,
        "need": need,
        "c_kd": kd_weight * t2 / temperature / denom,
        "c_ce": (1.0 - kd_weight) / denom,
        "c_silent": kd_weight / denom,  # the rest of CE's weight where the teacher is silent
        "silent_coef": kd_weight if with_kd else 0.0,
        "kd_coef": kd_weight * t2,
        "ce_coef": 1.0 - kd_weight,
        "denom": denom,
    }
    if teacher is None:  # CE only: an empty target set keeps one code path
        zeros = torch.zeros((y.numel(), 1), dtype=torch.float32, device=y.device)
        teacher = SparseTargets(y.new_zeros((y.numel(), 1)), zeros, zeros)
    return rows, settings, teacher, t2


def _parts(total: Tensor, ce_sum: Tensor, kd_sum: Tensor, t2: float, settings: dict, rows: Tensor) -> LossParts:
    denom = settings["denom"]
    return LossParts(
        total=total,
        kd=(kd_sum * t2 / denom).detach(),
        kd_unscaled=(kd_sum / denom).detach(),
        ce=(ce_sum / denom).detach(),
        num_valid=rows.numel(),
    )


def sparse_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Tensor,
    teacher: SparseTargets | None,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool = True,
    num_tokens=None,
    vocab_size: int | None = None,
    student_bias: Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> LossParts:
    """``kd_weight * T^2 * KL_sparse + (1 - kd_weight) * CE`` from hidden states, chunked.

    ``student_hidden`` (N, H) rows predict ``targets`` (N,) (``ignore_index`` for none);
    ``teacher`` holds the same N rows. Sums over valid targets are divided once by
    ``num_tokens`` (default: this call's count), as everywhere in lmdistill.
    """
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    y = targets.reshape(-1)
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    rows, settings, teacher, t2 = _settings(
        y, teacher, temperature, kd_weight, scale_by_t2, num_tokens, chunk_size, ignore_index, need
    )
    settings["vocab"] = int(vocab_size or student_weight.shape[0])
    total, ce_sum, kd_sum = _SparseKD.apply(h, student_weight, student_bias, y, rows, teacher, settings)
    return _parts(total, ce_sum, kd_sum, t2, settings, rows)


def sparse_logits_distillation_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher: SparseTargets | None,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool = True,
    num_tokens=None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> LossParts:
    """:func:`sparse_distillation_loss` from the student's logits (..., V) instead of its hidden
    states: the same value and gradient, for when the logits are small enough to form whole
    (``loss.impl`` full; the lm_head's backward is then the one autograd runs for plain CE)."""
    z = student_logits.reshape(-1, student_logits.shape[-1])
    y = targets.reshape(-1)
    if y.numel() != z.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(student_logits.shape)}")
    need = (torch.is_grad_enabled() and student_logits.requires_grad, False, False)
    rows, settings, teacher, t2 = _settings(
        y, teacher, temperature, kd_weight, scale_by_t2, num_tokens, chunk_size, ignore_index, need
    )
    total, ce_sum, kd_sum = _SparseLogitsKD.apply(z, y, rows, teacher, settings)
    return _parts(total, ce_sum, kd_sum, t2, settings, rows)
