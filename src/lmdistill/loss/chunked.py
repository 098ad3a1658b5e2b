"""Chunked fused-linear distillation loss: KD + CE from hidden states, memory-flat.

The full-logits path (``dense.distillation_loss``) needs every (tokens x vocab) logit of
both models at once, in fp32, plus what autograd saves for backward: at 8192 tokens and a
151936-token vocabulary that is tens of GiB. Here the lm_head matmuls are folded into the
loss. The valid target rows are walked in chunks; for each chunk the student and teacher
logits are computed, the loss terms and their gradient with respect to the chunk's logits
are derived in closed form, and that gradient is pushed straight through the student's
lm_head (into ``student_hidden``, ``student_weight`` and ``student_bias``) before the next
chunk starts. Only one chunk's logits exist at any time and autograd saves nothing large:
``backward`` merely scales the stored gradients by ``grad_output``.

Semantics are those of ``distillation_loss`` on ``h @ W.T + b`` sliced to ``vocab_size``:
fp32 log space whatever the input dtype, zero-probability teacher entries contribute exactly
zero, sums over valid tokens divided once by ``num_tokens``, and exactly 0 with zero
gradients when nothing is left after masking.

The closed-form gradient of each divergence with respect to the student's scaled logits
s = z_s / T comes from its registry entry (``divergences.REGISTRY``, ``chunk``). With the CE
term at T = 1, C = -log softmax(z_s)[y] and dC/dz_s = softmax(z_s) - onehot(y); and
dD/dz_s = dD/ds / T, so the KD term T^2 * D has gradient T * dD/ds.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.loss.dense import IGNORE_INDEX, LossParts, check_loss_args, normaliser
from lmdistill.loss.divergences import DivergenceParams, _no_workspace

__all__ = ["fused_linear_distillation_loss", "fused_logits_distillation_loss"]

_USE_WORKSPACE = True  # tests switch it off to check the allocation-only path too


# --------------------------------------------------------------------------------------
# Per-chunk math. Inputs are the chunk's rows; the matmuls run in the model's (or autocast's)
# dtype, everything after them in fp32.
#
# ``ws(slot, rows, dtype)`` hands out a reusable (rows x vocab) buffer: an fp32 slot, or a view
# of a slot's memory in a 2-byte dtype; or None (allocate). On a CPU every fresh buffer of this
# size is mmap'ed and page-faulted in, which costs about twice the arithmetic of an exp pass
# over it (measured: 120 ms vs 42 ms for 1024 x 32000), so the eager path writes into buffers
# that live for the whole call. The compiled path gets None everywhere and plain ops, which
# inductor fuses. Slot use per chunk:
#   0: logits staged in fp32 (student's, teacher's), the divergence's scratch, the student's
#      staged again for the CE term; at the end a 2-byte view of it takes the gradient in the
#      matmul dtype
#   1: log p_s at T, then log p_s at T = 1 -> the gradient (fp32)
#   2: the student's raw logits in the matmul dtype, kept through the KD term when T != 1 so
#      that the CE log-softmax is formed from them afterwards, exactly as before (unused at
#      T == 1 and on the logits path, where the caller's logits are kept)
#   3: the teacher's matmul output (2-byte view), then log p_t      4, 5: divergence scratch
#
# Alive at a chunk's peak (inside the divergence), bytes per (rows x vocab) entry, forward KL:
# T != 1: 3 fp32 slots + the kept logits (2 B for a bf16 model, 4 B for fp32) = 14 / 16 B;
# T == 1: 12 B. JSD, reverse KL, TVD: one fp32 slot (4) more; the skews two (4 and 5). Until
# this accounting was written (see docs/performance.md) slot 1 held log p_s at T = 1 through the
# KD term beside a slot 2 with log p_s at T, the matmul outputs and the gradient's 2-byte copy
# were fresh tensors, and the log-mixture of JSD and the skews took slot 5: forward KL 16-18 B,
# JSD 24-26 B.
# Whole call: the (V, H) weight gradient, accumulated in fp32 (a bf16 accumulator exceeds the
# tested bf16 error bound once there are more than a few chunks), and no (V, H) temporary:
# a 2-byte product is formed in row blocks (``_add_matmul``).
# --------------------------------------------------------------------------------------


class _Workspace:
    """Reusable flat buffers, one per slot, sized for the largest chunk of a call.

    A slot holds fp32 entries; ``dtype`` asks for a view of its memory in a 2-byte dtype. Slot 2
    (the kept student logits) is allocated at the size its first request needs: in a call it
    only ever holds the matmul dtype, so a bf16 model's takes half the memory of an fp32 slot.
    """

    _NARROW_SLOTS = (2,)

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self.bufs: dict[int, Tensor] = {}

    def __call__(self, slot: int, rows: int, dtype: torch.dtype = torch.float32) -> Tensor:
        entries = self.rows * self.vocab
        words = (entries + 1) // 2 if dtype.itemsize == 2 and slot in self._NARROW_SLOTS else entries
        buf = self.bufs.get(slot)
        if buf is None or buf.numel() < words:
            buf = self.bufs[slot] = torch.empty(words, dtype=torch.float32, device=self.device)
        return buf.view(dtype)[: rows * self.vocab].view(rows, self.vocab)

    def flat(self, slot: int) -> Tensor | None:
        """All of a slot's memory, flat (fp32 words), or None when it was never handed out."""
        return self.bufs.get(slot)


def _logits(h: Tensor, w: Tensor | None, b: Tensor | None, out: Tensor | None) -> Tensor:
    """(C, H) x (V, H)^T + (V,) -> (C, V) fp32; the matmul itself runs in the input dtype.

    With ``w`` None, ``h`` already holds the (C, V) logits: they are copied to fp32 (always a
    copy: the chunk math scales them in place, and the caller's logits must stay as they are).
    """
    if w is None:
        return h.to(torch.float32, copy=True) if out is None else out.copy_(h)
    # mm(out=) is not covered by autocast: it would run in fp32 inside a bf16 step.
    if out is not None and h.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)
    z = F.linear(h, w, b)
    return z.float() if out is None else out.copy_(z)


def _head_logits(h: Tensor, w: Tensor | None, b: Tensor | None, ws, fp32_slot: int, narrow_slot: int) -> Tensor:
    """Raw (C, V) logits in the matmul dtype, never written afterwards: the caller's own when ``w``
    is None, else ``h @ w.T + b`` into slot ``fp32_slot`` (an fp32 model) or a 2-byte view of
    ``narrow_slot``; a fresh tensor under autocast (mm(out=) is not covered by autocast: it
    would run in fp32 inside a bf16 step) and without a workspace."""
    if w is None:
        return h
    if torch.is_autocast_enabled(h.device.type):
        return F.linear(h, w, b)
    rows = h.shape[0]
    if h.dtype == torch.float32:
        out = ws(fp32_slot, rows)
    else:  # a 2-byte dtype fits a slot's memory; another (fp64) gets a tensor of its own
        out = ws(narrow_slot, rows, h.dtype) if h.dtype.itemsize == 2 else None
    if out is None:
        return F.linear(h, w, b)
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)


def _staged(z: Tensor, out: Tensor | None, scale: Tensor | None) -> Tensor:
    """``z`` in fp32, times ``scale`` (a 0-d tensor) unless None, in ``out`` (a fresh tensor when
    None). ``z`` is written only when it is ``out`` already (an fp32 matmul's output)."""
    if out is not None and z.data_ptr() == out.data_ptr():
        return z if scale is None else z.mul_(scale)
    if out is not None and z.dtype == torch.float32:
        return out.copy_(z) if scale is None else torch.mul(z, scale, out=out)
    # A 2-byte z: convert, then scale in fp32 (mul(out=) would multiply in the 2-byte dtype).
    s = z.to(torch.float32, copy=True) if out is None else out.copy_(z)
    return s if scale is None else s.mul_(scale)


def _log_softmax(x: Tensor, out: Tensor | None) -> Tensor:
    """log softmax over the vocabulary, into ``out``. Under torch.compile it is written as
    ``x - logsumexp(x)``: inductor then keeps only the row statistics and recomputes the rest
    inside each kernel that reads it, where its log_softmax lowering writes the shifted logits
    out in fp32 (CPU inductor, one chunk of forward KL at T = 2: two fp32 (rows x vocab)
    buffers fewer, 3 (rows x vocab) 2-byte tensors left: both logits and the gradient)."""
    if torch.compiler.is_compiling():
        return x - torch.logsumexp(x, dim=-1, keepdim=True)
    return torch.log_softmax(x, dim=-1, out=out)


def _minus_onehot(grad: Tensor, y: Tensor, c: Tensor) -> Tensor:
    """``grad - c * onehot(y)`` in place: a scatter in eager mode; a select under torch.compile,
    where a scatter would make inductor write the whole gradient out before it and read it back."""
    if torch.compiler.is_compiling():
        hit = torch.arange(grad.shape[1], device=grad.device) == y.unsqueeze(1)
        return torch.where(hit, grad - c, grad)
    return grad.scatter_add_(1, y.unsqueeze(1), (-c).expand(grad.shape[0], 1))


def _chunk_step(
    h_c: Tensor,
    w_s: Tensor | None,
    b_s: Tensor | None,
    ht_c: Tensor | None,
    w_t: Tensor | None,
    b_t: Tensor | None,
    y_c: Tensor,
    inv_t: Tensor,
    c_kd: Tensor,
    c_ce: Tensor,
    kd_chunk,
    params: DivergenceParams,
    with_kd: bool,
    same_t: bool,
    need_grad: bool,
    need_bias: bool = False,
    out_dtype: torch.dtype = torch.float32,
    ws=_no_workspace,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """Loss sums for one chunk and the gradient of the folded loss w.r.t. its student logits.

    Args:
        h_c: (C, Hs) student hidden rows; w_s: (V, Hs); b_s: (V,) or None. With ``w_s`` None,
            ``h_c`` is the chunk's (C, V) student logits (and ``ht_c`` the teacher's).
        ht_c: (C, Ht) teacher hidden rows; w_t: (V, Ht); b_t: (V,) or None.
        y_c: (C,) targets, all valid.
        inv_t, c_kd, c_ce: 0-d fp32 tensors: 1/T, and the coefficients that turn dD/ds and
            dC/dz into d total/dz (weights, T or 1/T, and 1/num_tokens folded in). Tensors,
            not floats, so a compiled version is not re-specialised on every temperature.
        kd_chunk, params: the divergence's closed form (``Divergence.chunk``) and its parameters.
        need_bias: also return the gradient's column sums (fp32, before ``out_dtype``).
        out_dtype: the dtype of the returned gradient (the matmul dtype it goes on in).
        ws: workspace provider (see above); the returned grad may live in it.

    Returns:
        grad (C, V) in ``out_dtype`` or None, its column sums (V,) or None, ce_sum (0-d fp32),
        kd_unscaled_sum (0-d fp32).
    """
    rows = h_c.shape[0]
    keep = with_kd and not same_t  # the CE term needs log softmax(z), the KD term log softmax(z / T)
    zs = _head_logits(h_c, w_s, b_s, ws, 2 if keep else 0, 2 if keep else 1)
    ls = _log_softmax(_staged(zs, ws(0, rows), inv_t if keep else None), ws(1, rows))
    if not keep:  # spent: not held while the teacher's logits are formed
        zs = None
    kd_sum = ls.new_zeros(())
    grad_kd = None
    if with_kd:
        zt = _head_logits(ht_c, w_t, b_t, ws, 0, 3)
        lt = _log_softmax(_staged(zt, ws(0, rows), inv_t), ws(3, rows))
        del zt
        kd_sum, grad_kd = kd_chunk(ls, lt, params, need_grad, ws)  # leaves slot 0 free
        del lt
    if keep:  # log p_s at T is spent: the CE log-probs go into its slot, from the kept logits
        z32 = zs if zs.dtype == torch.float32 else _staged(zs, ws(0, rows), None)
        ls = _log_softmax(z32, ws(1, rows))
        del z32
    del zs
    ce_sum = -ls.gather(1, y_c.unsqueeze(1)).sum()
    if not need_grad:
        return None, None, ce_sum, kd_sum
    # c_ce * (softmax(z) - onehot(y)) in place of the log-probs, then the KD part.
    grad = _minus_onehot(ls.exp_().mul_(c_ce), y_c, c_ce)
    if grad_kd is not None:
        grad.addcmul_(grad_kd, c_kd)
    del grad_kd
    bias_sum = grad.sum(dim=0) if need_bias else None
    if out_dtype != torch.float32:  # rounded once, into slot 0 (free again), for the matmuls
        narrow = ws(0, rows, out_dtype) if out_dtype.itemsize == 2 else None
        grad = grad.to(out_dtype) if narrow is None else narrow.copy_(grad)
    return grad, bias_sum, ce_sum, kd_sum


_compiled_step = None  # torch.compile(_chunk_step), built on first use
_compile_broken = False  # set once compiling failed; then we stay eager


def _step_fn(device: torch.device, use_compile: bool | None):
    """Pick the eager or the compiled chunk step.

    Compiling fuses the ~10 elementwise passes over each chunk's logits into a few kernels,
    which is where the time goes on a GPU. On a CPU (auto mode) we stay eager: inductor
    needs a C++ toolchain there and the first call takes tens of seconds.
    """
    global _compiled_step
    if use_compile is None:
        use_compile = device.type == "cuda"
    if not use_compile or _compile_broken or not hasattr(torch, "compile"):
        return _chunk_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_chunk_step, dynamic=None)
    return _compiled_step


_mm_out_dtype_ok = True  # set False once torch.mm(..., out_dtype=) turned out unsupported
# Rows x H entries of one block of a 2-byte weight-gradient product when no workspace memory is
# lent for it: 16 MiB in bf16, where the whole (V, H) product and its fp32 copy were 6 bytes per
# entry of the lm_head beside the accumulator.
_PRODUCT_BLOCK = 1 << 23


def _add_matmul(acc: Tensor, a: Tensor, b: Tensor, scratch: Tensor | None = None) -> None:
    """``acc += a @ b`` with fp32 ``acc`` and ``a``, ``b`` in the model dtype.

    fp32 operands are added in place (``addmm_``), with no temporary. A 2-byte product (a bf16
    model, or autocast) cannot be: it is formed block by block of ``acc``'s rows, so that no
    second (V, H) matrix exists beside the accumulator; in ``scratch`` (flat fp32 memory the
    caller no longer needs) when there is some, else in temporaries of a block. Each block's
    product should reach the fp32 accumulator without first being rounded to bf16: CUDA builds
    of torch >= 2.8 have ``mm(..., out_dtype=float32)`` (bf16 inputs, fp32 accumulate and
    output). Elsewhere the product is rounded once per chunk, which the bf16 gradient test
    bounds, and converted to fp32 before the add (an add of mixed dtypes would allocate that
    conversion itself, a block's worth).
    """
    low = None
    if a.dtype == torch.float32:
        device = a.device.type
        if not torch.is_autocast_enabled(device):
            acc.addmm_(a, b)
            return
        # Autocast does not touch in-place ops: addmm_ would run this (V x N x H) product in
        # fp32 while every other matmul of the step runs in the autocast dtype. Do as autocast
        # would for an out-of-place matmul, keeping the fp32 accumulation below.
        low = torch.get_autocast_dtype(device)
        b = b.to(low)
    width = max(1, acc.shape[1])
    # A block in scratch takes half a word per entry (the product, rounded up) and one (its
    # fp32 copy).
    room = 0 if scratch is None else (2 * scratch.numel() - 2) // 3
    if a.is_cuda or room < width or b.dtype.itemsize != 2:
        scratch = None  # mm(out_dtype=) gives the fp32 product at once; or not a row's room
    entries = _PRODUCT_BLOCK if scratch is None else room
    step = max(1, entries // width)
    for start in range(0, acc.shape[0], step):
        block = a[start : start + step]
        _add_product(acc[start : start + step], block if low is None else block.to(low), b, scratch)


def _add_product(acc: Tensor, a: Tensor, b: Tensor, scratch: Tensor | None) -> None:
    """``acc += a @ b`` for 2-byte ``a`` and ``b``, the product and its fp32 copy in ``scratch``
    when given (flat fp32 words, at least 1.5 per entry of the product)."""
    global _mm_out_dtype_ok
    if _mm_out_dtype_ok and a.is_cuda:
        try:
            acc += torch.mm(a, b, out_dtype=torch.float32)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _mm_out_dtype_ok = False
    if scratch is None:
        acc += (a @ b).float()
        return
    n = acc.numel()
    half = (n + 1) // 2
    product = torch.mm(a, b, out=scratch[:half].view(b.dtype)[:n].view(acc.shape))
    acc += scratch[half : half + n].view(acc.shape).copy_(product)


@dataclass(frozen=True)
class _Options:
    """Static (non-tensor) settings of one call."""

    kd_chunk: Callable  # the divergence's closed form, ``Divergence.chunk``
    params: DivergenceParams
    with_kd: bool
    same_t: bool  # T == 1: the CE log-softmax doubles as the student's KD log-softmax
    chunk_size: int
    vocab_size: int
    need_grad: tuple[bool, bool, bool]  # student hidden, weight, bias
    num_valid: int
    all_valid: bool  # no ignored row: chunks are plain slices, no gathers
    use_compile: bool | None
    kd_coef: float  # kd_weight * T^2 (or kd_weight), multiplies the KD sum in ``total``
    ce_coef: float  # 1 - kd_weight
    denom: float  # the normaliser, >= 1
    t2: float  # T^2, or 1 without scale_by_t2


def _prepare(
    entry,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool,
    params: DivergenceParams,
    num_tokens,
    num_valid: int,
    all_valid: bool,
    chunk_size: int,
    vocab_size: int,
    need_grad: tuple[bool, bool, bool],
    use_compile: bool | None,
    device: torch.device,
):
    """A call's static options and the 0-d fp32 coefficients of its closed-form gradient:
    d total / dz_s = kd_weight * T^2 / T * dD/ds / denom + (1 - kd_weight) / denom * dC/dz."""
    denom = normaliser(num_tokens, num_valid)
    t2 = temperature**2 if scale_by_t2 else 1.0
    opts = _Options(
        kd_chunk=entry.chunk,
        params=params,
        with_kd=kd_weight > 0,
        same_t=float(temperature) == 1.0,
        chunk_size=int(chunk_size),
        vocab_size=vocab_size,
        need_grad=need_grad,
        num_valid=num_valid,
        all_valid=all_valid,
        use_compile=use_compile,
        kd_coef=kd_weight * t2,
        ce_coef=1.0 - kd_weight,
        denom=denom,
        t2=t2,
    )
    coefficients = [
        torch.tensor(x, dtype=torch.float32, device=device)
        for x in (1.0 / temperature, kd_weight * t2 / temperature / denom, (1.0 - kd_weight) / denom)
    ]
    return opts, coefficients


def _loss_parts(total: Tensor, ce_sum: Tensor, kd_sum: Tensor, opts: _Options) -> LossParts:
    return LossParts(
        total=total,
        kd=(kd_sum * opts.t2 / opts.denom).detach(),
        kd_unscaled=(kd_sum / opts.denom).detach(),
        ce=(ce_sum / opts.denom).detach(),
        num_valid=opts.num_valid,
    )


def _chunk(h, y, ht, rows, start: int, stop: int, opts: _Options):
    """(selection, student rows, targets, teacher rows) of valid rows ``start:stop``."""
    if opts.all_valid:
        sel = slice(start, stop)
        return sel, h[sel], y[sel], ht[sel] if opts.with_kd else None
    # Ignored rows never reach a matmul: gather the valid ones of this chunk.
    sel = rows[start:stop]
    return sel, h.index_select(0, sel), y.index_select(0, sel), ht.index_select(0, sel) if opts.with_kd else None


def _add_chunk_grads(g_mm, sel, h_c, w_s_v, grad_h, grad_w, vocab: int, all_valid: bool, scratch=None) -> None:
    """Add a chunk's logit gradient (in the matmul dtype) into the hidden-state and weight
    gradients (each None when not needed); ``scratch``: memory free for the weight's product."""
    if grad_h is not None:
        gh = (g_mm @ w_s_v).to(grad_h.dtype)
        if all_valid:
            grad_h[sel] = gh
        else:
            grad_h.index_copy_(0, sel, gh)  # each row occurs once: copy, not add
        del gh
    if grad_w is not None:
        _add_matmul(grad_w[:vocab], g_mm.t(), h_c, scratch)


class _FusedLinearKD(torch.autograd.Function):
    """Loss and all student gradients in one pass over the chunks; backward only scales them."""

    @staticmethod
    def forward(ctx, h, w_s, b_s, ht, w_t, b_t, y, rows, inv_t, c_kd, c_ce, opts: _Options):
        vocab = opts.vocab_size
        need_h, need_w, need_b = opts.need_grad
        need_grad = need_h or need_w or need_b
        # Leading-row slices of a (V, H) matrix are views: padded rows are never read.
        w_s_v = w_s[:vocab]
        b_s_v = b_s[:vocab] if b_s is not None else None
        w_t_v = w_t[:vocab] if opts.with_kd else None
        b_t_v = b_t[:vocab] if (opts.with_kd and b_t is not None) else None

        grad_h = torch.zeros_like(h) if need_h else None
        # The weight gradient sums over every chunk: accumulate it in fp32 even for a bf16
        # model, or the contributions of later chunks round away against the running sum.
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_w else None
        grad_b = torch.zeros(b_s.shape, dtype=torch.float32, device=b_s.device) if need_b else None
        ce_total = torch.zeros((), dtype=torch.float32, device=h.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=h.device)

        step = _step_fn(h.device, opts.use_compile)
        autocast = torch.is_autocast_enabled(h.device.type)
        mm_dtype = torch.get_autocast_dtype(h.device.type) if autocast else w_s.dtype
        n_rows = opts.num_valid  # ``rows`` lists them, unless every row is valid (then None)
        # Buffers reused across chunks in eager mode; a GPU's caching allocator already
        # recycles memory, so there they would only pin extra memory for nothing.
        workspace = _no_workspace
        if _USE_WORKSPACE and h.device.type == "cpu" and n_rows:
            workspace = _Workspace(min(opts.chunk_size, n_rows), vocab, h.device)
        for start in range(0, n_rows, opts.chunk_size):
            sel, h_c, y_c, ht_c = _chunk(h, y, ht, rows, start, min(start + opts.chunk_size, n_rows), opts)
            h_c = h_c.to(mm_dtype)
            if ht_c is not None:
                ht_c = ht_c.to(w_t.dtype)
            models = (h_c, w_s_v, b_s_v, ht_c, w_t_v, b_t_v, y_c)
            # The gradient comes back in the model's (or autocast's) dtype, rounded once, as the
            # two matmuls take it (each would otherwise cast it again under autocast).
            flags = (opts.with_kd, opts.same_t, need_grad, need_b, mm_dtype)
            args = (*models, inv_t, c_kd, c_ce, opts.kd_chunk, opts.params, *flags)
            step, (g_mm, bias_sum, ce_sum, kd_sum) = _run_step(step, args, workspace)
            ce_total += ce_sum
            kd_total += kd_sum
            if g_mm is None:
                continue
            if need_b:
                grad_b[:vocab] += bias_sum
            # Slot 1 held the fp32 gradient, spent once g_mm (a 2-byte view of slot 0) has it.
            narrow = workspace is not _no_workspace and mm_dtype.itemsize == 2
            scratch = workspace.flat(1) if narrow else None
            _add_chunk_grads(g_mm, sel, h_c, w_s_v, grad_h, grad_w, vocab, opts.all_valid, scratch)
            del g_mm

        total = (opts.kd_coef * kd_total + opts.ce_coef * ce_total) / opts.denom
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, w_s.dtype, b_s.dtype if b_s is not None else None)
        ctx.mark_non_differentiable(ce_total, kd_total)
        return total, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_h, grad_w, grad_b = hand_out_grads(ctx, grad_total, "fused_linear_distillation_loss")
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def hand_out_grads(ctx, grad_total: Tensor, name: str) -> list[Tensor | None]:
    """The gradients a chunked loss computed during forward (``ctx.grads``, in ``ctx.dtypes``),
    scaled by ``grad_total`` and handed out once: they are released as they leave."""
    if ctx.grads is None:
        raise RuntimeError(
            f"{name} computes its gradients during forward and hands them out once; backward "
            "through the same loss twice (retain_graph) is not supported"
        )
    grads, ctx.grads = ctx.grads, None
    # In place: these buffers are ours alone; scaling costs no extra (V, H) copy.
    return [None if g is None else g.mul_(grad_total).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]


def _run_step(step, args: tuple, workspace):
    """(the step function to use from now on, its result); a compiler failure falls back to eager."""
    if step is _chunk_step:
        return step, step(*args, ws=workspace)
    try:
        return step, step(*args)
    except Exception as exc:  # a compiler failure of any kind: fall back to eager
        _disable_compile(exc)
        return _chunk_step, _chunk_step(*args, ws=workspace)


def _row_blocks(*tensors: Tensor | None) -> list[tuple]:
    """The rows of (..., D) tensors of one leading shape as aligned 2-D views, without copies.

    One block of all rows when the leading dimensions flatten into a view (contiguous logits),
    else one block per sequence (a ``[:, :-1, :V]`` slice of a model's padded logits).
    """
    first = tensors[0]
    try:
        return [tuple(t.view(-1, *t.shape[first.dim() - 1 :]) if t is not None else None for t in tensors)]
    except RuntimeError:
        pass
    blocks = []
    for index in itertools.product(*map(range, first.shape[:-2])):
        blocks.append(tuple(t[index] if t is not None else None for t in tensors))
    return blocks


class _LogitsKD(torch.autograd.Function):
    """The full-logits loss with the closed-form gradients of ``_chunk_step``: no autograd graph
    over (tokens x vocab) tensors, reused chunk buffers; backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, zs, zt, y, inv_t, c_kd, c_ce, opts: _Options):
        need_grad = opts.need_grad[0]
        # The gradient is stored in the logits' dtype, each chunk rounded once as it is written.
        # Ignored rows get no gradient: zeros there, and every valid row is written below.
        grad = (
            (torch.empty if opts.all_valid else torch.zeros)(zs.shape, dtype=zs.dtype, device=zs.device)
            if need_grad
            else None
        )
        ce_total = torch.zeros((), dtype=torch.float32, device=zs.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=zs.device)
        step = _step_fn(zs.device, opts.use_compile)
        workspace = _no_workspace
        if _USE_WORKSPACE and zs.device.type == "cpu" and opts.num_valid:
            workspace = _Workspace(min(opts.chunk_size, zs.numel() // zs.shape[-1]), zs.shape[-1], zs.device)
        for zs_b, zt_b, y_b, grad_b in _row_blocks(zs, zt, y.unsqueeze(-1), grad):
            y_b = y_b.squeeze(-1)
            rows = None if opts.all_valid else (y_b != IGNORE_INDEX).nonzero().squeeze(1)
            n_rows = y_b.numel() if rows is None else rows.numel()
            for start in range(0, n_rows, opts.chunk_size):
                stop = min(start + opts.chunk_size, n_rows)
                sel = slice(start, stop) if rows is None else rows[start:stop]
                args = (
                    zs_b[sel],
                    None,
                    None,
                    zt_b[sel] if opts.with_kd else None,
                    None,
                    None,
                    y_b[sel],
                    inv_t,
                    c_kd,
                    c_ce,
                    opts.kd_chunk,
                    opts.params,
                    opts.with_kd,
                    opts.same_t,
                    need_grad,
                    False,
                    torch.float32,
                )
                dest = grad_b[sel] if need_grad and rows is None and grad.dtype == torch.float32 else None
                chunk_ws = _Into(workspace, dest) if dest is not None and workspace is not _no_workspace else workspace
                step, (grad_z, _, ce_sum, kd_sum) = _run_step(step, args, chunk_ws)
                ce_total += ce_sum
                kd_total += kd_sum
                if grad_z is not None and (dest is None or grad_z.data_ptr() != dest.data_ptr()):
                    grad_b[sel] = grad_z.to(grad_b.dtype)
        ctx.grad, ctx.dtype = grad, zs.dtype
        ctx.mark_non_differentiable(ce_total, kd_total)
        return (opts.kd_coef * kd_total + opts.ce_coef * ce_total) / opts.denom, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        if ctx.grad is None:
            raise RuntimeError(
                "the fused logits loss hands out its gradient once; backward through the same loss "
                "twice (retain_graph) is not supported"
            )
        grad, ctx.grad = ctx.grad, None
        return _scaled(grad, grad_total), None, None, None, None, None, None


class _Into:
    """A workspace whose slot 1, where a chunk's gradient is built, is the rows of the output
    gradient themselves: the gradient is written once, never copied there afterwards."""

    def __init__(self, workspace, dest: Tensor):
        self.workspace, self.dest = workspace, dest

    def __call__(self, slot: int, rows: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.dest if slot == 1 else self.workspace(slot, rows, dtype)


def _scaled(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad * grad_output`` in place; skipped on a CPU when grad_output is exactly 1 (the usual
    case: a pass over a (tokens x vocab) tensor saved, and no sync on a GPU either way)."""
    if grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0:
        return grad
    if grad.dtype == torch.float32:
        return grad.mul_(grad_output)
    return grad.float().mul_(grad_output).to(grad.dtype)  # one rounding, as for the fp32 gradient


def _disable_compile(exc: Exception) -> None:
    global _compile_broken
    _compile_broken = True
    warnings.warn(
        f"torch.compile of the fused KD loss failed ({exc!r:.300}); continuing in eager mode",
        RuntimeWarning,
        stacklevel=3,
    )


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    targets: Tensor,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool = True,
    divergence: str = "forward_kl",
    params: DivergenceParams = DivergenceParams(),
    ignore_index: int = IGNORE_INDEX,
    num_tokens: int | float | Tensor | None = None,
    all_valid: bool = False,
    vocab_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int = 1024,
    use_compile: bool | None = None,
) -> LossParts:
    """``kd_weight * KD + (1 - kd_weight) * CE`` from hidden states, without full logits.

    Equal to ``distillation_loss(h_s @ W_s[:v].T + b_s[:v], h_t @ W_t[:v].T + b_t[:v],
    targets, ...)`` with ``v = vocab_size``, in value and in gradients, while holding only
    ``chunk_size`` rows of (tokens x vocab) logits of each model at a time.

    Args:
        student_hidden: (..., Hs) final student hidden states (after the last norm), any
            float dtype; position i predicts ``targets[i]`` (already shifted).
        student_weight: (V, Hs) the student's lm_head weight (may be tied to the embeddings).
        teacher_hidden: (..., Ht) teacher hidden states, same leading shape; None when
            ``kd_weight == 0``. Never receives a gradient: the teacher is frozen.
        teacher_weight: (V', Ht) the teacher's lm_head weight; V' may differ from V when
            either embedding matrix is padded past the tokenizer.
        targets: (...) int64 next-token ids; ``ignore_index`` marks positions without one.
        temperature: KD temperature T > 0 (the CE term always uses T = 1).
        kd_weight: in [0, 1].
        scale_by_t2: multiply the divergence by T^2.
        divergence, params: a name from ``divergences.REGISTRY`` with a
            closed-form gradient, and its parameters (see ``dense.token_divergence``).
        num_tokens: the normaliser: the global count of valid targets across micro-batches
            and ranks. Defaults to this call's own count; a count of 0 divides by 1.
        all_valid: the caller vouches that every target is a token id in [0, vocab_size)
            (packed text): the search for valid rows and the range check, each a device sync,
            are skipped.
        vocab_size: number of real tokens; only logits ``[:vocab_size]`` of both models
            exist for the loss (padded rows get no probability and a zero gradient).
            Defaults to ``min(V, V')``.
        student_bias: (V,) or None; teacher_bias: (V',) or None.
        chunk_size: valid-target rows per chunk. Peak extra memory is the fp32 (V, Hs)
            weight gradient, the (N, Hs) hidden-state gradient, and per (chunk_size x
            vocab_size) entry 12 bytes (forward KL at T = 1) to 16 (T != 1, fp32 model; 14 for
            bf16), 4 more for JSD, reverse KL and TVD, 8 more for the skews, in eager mode; for
            forward KL with the chunk math compiled (the default on CUDA), 6 bytes for a bf16
            model on inductor's CPU backend: both logits and the gradient, in bf16. See the slot
            accounting above and docs/performance.md.
        use_compile: torch.compile the per-chunk elementwise math; None = only on CUDA.

    Returns:
        LossParts(total, kd, kd_unscaled, ce, num_valid) as ``distillation_loss`` does:
        ``total`` carries the graph (its backward only scales the gradients computed here),
        the rest are detached fp32 scalars. With no valid target every part is exactly 0 and
        the gradients are zero.
    """
    entry = check_loss_args(temperature, kd_weight, divergence)
    if entry.chunk is None:
        raise ValueError(
            f"divergence {divergence!r} has no closed-form gradient for the chunked loss; "
            "use the full-logits loss (dense.distillation_loss)"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h, y, ht, vocab = _checked_inputs(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        targets,
        kd_weight > 0,
        vocab_size,
        student_bias,
        teacher_bias,
    )

    with_kd = kd_weight > 0
    rows, num_valid, all_valid = _valid_rows(y, vocab, ignore_index, all_valid)
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    opts, (inv_t, c_kd, c_ce) = _prepare(
        entry,
        temperature=temperature,
        kd_weight=kd_weight,
        scale_by_t2=scale_by_t2,
        params=params,
        num_tokens=num_tokens,
        num_valid=num_valid,
        all_valid=all_valid,
        chunk_size=chunk_size,
        vocab_size=vocab,
        need_grad=need,
        use_compile=use_compile,
        device=h.device,
    )
    total, ce_sum, kd_sum = _FusedLinearKD.apply(
        h,
        student_weight,
        student_bias,
        ht,
        teacher_weight.detach() if with_kd else None,
        teacher_bias.detach() if (with_kd and teacher_bias is not None) else None,
        y,
        rows,
        inv_t,
        c_kd,
        c_ce,
        opts,
    )
    return _loss_parts(total, ce_sum, kd_sum, opts)


def _valid_rows(y: Tensor, vocab: int, ignore_index: int, all_valid: bool):
    """(indices of the rows with a target or None for all, their count, whether all have one);
    a ValueError for a target outside the vocabulary."""
    if all_valid:  # the caller vouches for the targets: no search, no range check, no device sync
        return None, y.numel(), True
    rows = (y != ignore_index).nonzero().squeeze(1)  # one host sync: the chunk loop needs the count
    num_valid = rows.numel()
    if num_valid and bool((((y < 0) | (y >= vocab)) & (y != ignore_index)).any()):
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    return rows, num_valid, num_valid == y.numel()


def _checked_inputs(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    targets,
    with_kd: bool,
    vocab_size,
    student_bias,
    teacher_bias,
):
    """(student rows, targets, teacher rows or None, vocabulary) of a chunked-loss call, its shapes
    checked: a ValueError names the argument that does not fit."""
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} does not match "
            f"student_weight {tuple(student_weight.shape)}: expected (..., H) and (V, H)"
        )
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    y = targets.reshape(-1)
    if y.numel() != h.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match student_hidden {tuple(student_hidden.shape)}")
    ht = None
    if with_kd:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight are required when kd_weight > 0")
        if teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} does not match "
                f"teacher_weight {tuple(teacher_weight.shape)}: expected (..., H) and (V', H)"
            )
        ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        if ht.shape[0] != h.shape[0]:
            raise ValueError(f"teacher_hidden has {ht.shape[0]} rows, student_hidden {h.shape[0]}")
    vocab_limit = student_weight.shape[0]
    if teacher_weight is not None:
        vocab_limit = min(vocab_limit, teacher_weight.shape[0])
    vocab = vocab_limit if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= vocab_limit:
        raise ValueError(f"vocab_size must be in [1, {vocab_limit}] (the smaller lm_head), got {vocab}")
    for name, bias, weight in (
        ("student_bias", student_bias, student_weight),
        ("teacher_bias", teacher_bias, teacher_weight),
    ):
        if bias is not None and (weight is None or bias.shape != weight.shape[:1]):
            raise ValueError(f"{name} must have shape (rows of its lm_head weight,), got {tuple(bias.shape)}")
    return h, y, ht, vocab


def fused_logits_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    targets: Tensor,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool = True,
    divergence: str = "forward_kl",
    params: DivergenceParams = DivergenceParams(),
    ignore_index: int = IGNORE_INDEX,
    num_tokens: int | float | Tensor | None = None,
    all_valid: bool = False,
    chunk_size: int = 1024,
    use_compile: bool | None = None,
) -> LossParts:
    """``dense.distillation_loss`` with the closed-form gradients of the chunked loss.

    The same function of the same logits (shapes and arguments as there; ``chunk_size`` and
    ``use_compile`` as in :func:`fused_linear_distillation_loss`), computed chunk by chunk in
    reused fp32 buffers, with the gradient with respect to the student's logits formed in the
    forward pass: no autograd graph over (tokens x vocab) tensors. The logits may be any view
    (e.g. ``logits[:, :-1, :vocab_size]`` of a model's padded output); nothing is copied
    whole. Only divergences with a closed form (``Divergence.chunk``) are accepted.
    """
    entry = check_loss_args(temperature, kd_weight, divergence)
    if entry.chunk is None:
        raise ValueError(f"divergence {divergence!r} has no closed-form gradient; use dense.distillation_loss")
    with_kd = kd_weight > 0
    if with_kd and (teacher_logits is None or teacher_logits.shape != student_logits.shape):
        raise ValueError(
            "teacher_logits of the student's shape are required when kd_weight > 0 (got "
            f"{None if teacher_logits is None else tuple(teacher_logits.shape)} for "
            f"{tuple(student_logits.shape)}); slice both to the tokenizer's length first"
        )
    if targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(student_logits.shape)}")
    num_valid = targets.numel() if all_valid else int((targets != ignore_index).sum())
    opts, (inv_t, c_kd, c_ce) = _prepare(
        entry,
        temperature=temperature,
        kd_weight=kd_weight,
        scale_by_t2=scale_by_t2,
        params=params,
        num_tokens=num_tokens,
        num_valid=num_valid,
        all_valid=num_valid == targets.numel(),
        chunk_size=chunk_size,
        vocab_size=student_logits.shape[-1],
        need_grad=(torch.is_grad_enabled() and student_logits.requires_grad, False, False),
        use_compile=use_compile,
        device=student_logits.device,
    )
    total, ce_sum, kd_sum = _LogitsKD.apply(
        student_logits, teacher_logits.detach() if with_kd else None, targets, inv_t, c_kd, c_ce, opts
    )
    return _loss_parts(total, ce_sum, kd_sum, opts)
