"""Held-out evaluation: perplexity = exp(token-mean CE), batch-size independence, KD metrics.

References: a bigram stub whose probabilities are worked out by hand with ``math.log``,
and a direct ``F.cross_entropy`` / ``F.kl_div`` computation over all targets at once.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from lmdistill.loss.objective import KDSpec
from lmdistill.teacher.signals import LiveLogits
from lmdistill.training.evaluate import evaluate, format_ppl, perplexity

VOCAB = 40


class BigramStub(torch.nn.Module):
    """A 'model' whose next-token logits depend only on the current token: ``table[id]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def reference_ce(model, blocks: torch.Tensor, vocab: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1, :vocab].double()
    targets = blocks[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="sum")
    return total.item() / targets.numel()


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (7, 12), generator=g)


@pytest.fixture(scope="module")
def student():
    return tiny_llama(VOCAB, hidden=16, layers=1, seed=3)


@pytest.fixture(scope="module")
def teacher():
    # padded output rows past the tokenizer, as real checkpoints have
    return tiny_llama(VOCAB + 8, hidden=24, layers=1, seed=4)


def run(model, blocks, teacher=None, temperature=2.0, scale_by_t2=True, **kw):
    signal = LiveLogits(teacher, VOCAB) if teacher is not None else None
    spec = KDSpec(1.0, scale_by_t2=scale_by_t2)
    return evaluate(model, signal, blocks, vocab_size=VOCAB, temperature=temperature, spec=spec, progress=False, **kw)


def test_perplexity_on_a_hand_worked_bigram_case():
    # p(next | current): row 0 -> [1, 2, 1] / 4, row 1 -> [1, 1, 2] / 4, row 2 -> [1, 1, 2] / 4
    table = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0], [1.0, 1.0, 2.0]]))
    stub = BigramStub(table)
    blocks = torch.tensor([[0, 1, 2, 0]])  # targets 1|0 (p=1/2), 2|1 (p=1/2), 0|2 (p=1/4)
    out = evaluate(stub, None, blocks, vocab_size=3, temperature=1.0, progress=False)
    mean_ce = (-math.log(1 / 2) - math.log(1 / 2) - math.log(1 / 4)) / 3
    assert out["eval_ce_loss"] == pytest.approx(mean_ce, rel=1e-6)
    assert out["eval_ppl"] == pytest.approx(2 ** (4 / 3), rel=1e-6)
    assert out["eval_tokens"] == 3


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    stub = BigramStub(torch.zeros(VOCAB, VOCAB))
    out = evaluate(stub, None, torch.randint(0, VOCAB, (3, 9)), vocab_size=VOCAB, temperature=1.0, progress=False)
    assert out["eval_ppl"] == pytest.approx(VOCAB, rel=1e-5)


@pytest.mark.parametrize("batch_size", [3, 4, 7, 100])
def test_batch_size_does_not_change_the_result(student, blocks, batch_size):
    one = run(student, blocks, batch_size=1)
    other = run(student, blocks, batch_size=batch_size)
    # 7 blocks with batch 4 leaves a smaller last batch: only a token-weighted mean agrees
    assert other["eval_ce_loss"] == pytest.approx(one["eval_ce_loss"], rel=1e-6)
    assert other["eval_tokens"] == one["eval_tokens"] == 7 * 11


def test_ce_and_ppl_match_a_direct_computation(student, blocks):
    out = run(student, blocks, batch_size=4)
    expected = reference_ce(student, blocks, VOCAB)
    assert out["eval_ce_loss"] == pytest.approx(expected, rel=1e-5)
    assert out["eval_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert out["eval_ppl"] == pytest.approx(math.exp(out["eval_ce_loss"]), rel=1e-12)  # exp of CE, not of a mix


def test_teacher_metrics_match_direct_computation(student, teacher, blocks):
    T = 2.0
    out = run(student, blocks, teacher, temperature=T, batch_size=3)
    with torch.no_grad():
        s = student(input_ids=blocks).logits[:, :-1, :VOCAB].reshape(-1, VOCAB).double()
        t = teacher(input_ids=blocks).logits[:, :-1, :VOCAB].reshape(-1, VOCAB).double()
    n = s.shape[0]
    kl_T = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum") / n
    kl_1 = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / n
    teacher_ce = F.cross_entropy(t, blocks[:, 1:].reshape(-1)).item()
    assert out["eval_kd_loss"] == pytest.approx(T**2 * kl_T.item(), rel=1e-5)
    assert out["eval_kl"] == pytest.approx(kl_1.item(), rel=1e-5)
    assert out["top1_agreement"] == pytest.approx((s.argmax(-1) == t.argmax(-1)).double().mean().item())
    assert out["teacher_ce_loss"] == pytest.approx(teacher_ce, rel=1e-5)
    assert out["teacher_ppl"] == pytest.approx(math.exp(teacher_ce), rel=1e-5)
    no_t2 = run(student, blocks, teacher, temperature=T, scale_by_t2=False)
    assert no_t2["eval_kd_loss"] == pytest.approx(kl_T.item(), rel=1e-5)


def test_student_as_its_own_teacher_has_zero_kl_and_full_agreement(student, blocks):
    out = run(student, blocks, student)
    assert out["eval_kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["eval_kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert out["top1_agreement"] == 1.0
    assert out["draft_acceptance"] == pytest.approx(1.0, abs=1e-6)  # a draft the target always accepts


def test_draft_acceptance_is_the_mean_overlap_of_the_two_distributions(student, teacher, blocks):
    # speculative sampling accepts a draft token x ~ q with probability min(1, p(x) / q(x)): in
    # expectation sum_x q(x) min(1, p(x) / q(x)) = sum_x min(p(x), q(x)) per position
    out = run(student, blocks, teacher, batch_size=3)
    with torch.no_grad():
        q = F.softmax(student(input_ids=blocks).logits[:, :-1, :VOCAB].double(), -1)
        p = F.softmax(teacher(input_ids=blocks).logits[:, :-1, :VOCAB].double(), -1)
    expected = (q * torch.clamp(p / q, max=1.0)).sum(-1).mean().item()
    assert out["draft_acceptance"] == pytest.approx(expected, rel=1e-5)
    assert 0 < out["draft_acceptance"] < 1


def test_a_known_teacher_ce_is_used_instead_of_measured(student, teacher, blocks):
    measured = run(student, blocks, teacher)["teacher_ce_loss"]
    assert measured != 1.5
    known = run(student, blocks, teacher, teacher_ce=1.5)  # (a frozen teacher's, or a cache's manifest's)
    assert known["teacher_ce_loss"] == 1.5
    assert known["teacher_ppl"] == pytest.approx(math.exp(1.5))


def test_reduce_sums_are_used(student, blocks):
    # a data-parallel reduce over two identical shards doubles every sum: same means
    single = run(student, blocks)
    doubled = run(student, blocks, reduce=lambda sums: sums * 2)
    assert doubled["eval_tokens"] == 2 * single["eval_tokens"]
    assert doubled["eval_ce_loss"] == pytest.approx(single["eval_ce_loss"], rel=1e-12)


def test_training_mode_is_restored(student, blocks):
    student.train()
    run(student, blocks)
    assert student.training
    student.eval()
    run(student, blocks)
    assert not student.training


def test_perplexity_overflow_gives_inf_and_nan_stays_nan():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(485e6)) == pytest.approx(485e6)
    assert perplexity(28.41) == pytest.approx(math.exp(28.41))  # the original report's eval loss: ~2.2e12, not capped
    assert perplexity(1000.0) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_format_ppl_is_never_capped():
    assert format_ppl(2.3e12) == "2.3e+12"
    assert format_ppl(61.234) == "61.23"
    assert format_ppl(4102.0) == "4102"
    assert format_ppl(math.inf) == "inf"
    assert float(format_ppl(perplexity(28.41))) > 485e6
