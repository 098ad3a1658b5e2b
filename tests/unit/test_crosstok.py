"""Cross-tokenizer foundations: two tokenizations aligned by characters (data/alignment.py), and
the divergence between distributions over two vocabularies (loss/crosstok.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.data.alignment import align, prediction_pairs, shared_vocabulary, token_ends
from lmdistill.loss.crosstok import cross_tokenizer_divergence
from lmdistill.loss.dense import token_divergence


@pytest.fixture(scope="module")
def two_tokenizers(corpus_texts):
    from lmdistill.default import train_tokenizer

    return train_tokenizer(corpus_texts, vocab_size=384), train_tokenizer(corpus_texts, vocab_size=160)


def _offsets(tokenizer, text):
    return tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]


def test_one_tokenizer_aligns_every_token_with_itself(two_tokenizers, corpus_texts):
    tok, _ = two_tokenizers
    offsets = _offsets(tok, corpus_texts[0][:2000])
    spans = align(offsets, offsets)
    n = len(offsets)
    assert len(spans) == n and spans.one_to_one.all()
    assert np.array_equal(spans.teacher_start, np.arange(n)) and np.array_equal(spans.student_end, np.arange(1, n + 1))
    # every position but the last predicts the next token on both sides: ordinary KD's positions
    t_pos, s_pos = prediction_pairs(spans)
    assert np.array_equal(t_pos, np.arange(n - 1)) and np.array_equal(s_pos, np.arange(n - 1))


def test_two_tokenizers_align_on_the_characters_both_end_tokens_at(two_tokenizers, corpus_texts):
    big, small = two_tokenizers
    text = corpus_texts[1][:3000]
    t_off, s_off = _offsets(big, text), _offsets(small, text)
    assert len(t_off) < len(s_off)  # the smaller vocabulary needs more tokens
    spans = align(t_off, s_off)
    t_ends, s_ends = token_ends(t_off), token_ends(s_off)

    # the reference: a span ends wherever both sides end a token at one offset; where several
    # tokens end at one offset, the last on one side meets the last on the other, and so on
    def ties_from_the_end(ends):
        ends = ends.tolist()
        return {(e, ends[i + 1 :].count(e)) for i, e in enumerate(ends)}

    common = sorted(((e, -k) for e, k in ties_from_the_end(t_ends) & ties_from_the_end(s_ends)))
    assert len(spans) == len(common)
    want = [e for e, _ in common]
    assert [t_ends[e - 1] for e in spans.teacher_end] == want == [s_ends[e - 1] for e in spans.student_end]
    # the spans cover both token sequences end to end, without gaps
    for start, end, total in (
        (spans.teacher_start, spans.teacher_end, len(t_off)),
        (spans.student_start, spans.student_end, len(s_off)),
    ):
        assert start[0] == 0 and end[-1] == total and np.array_equal(start[1:], end[:-1])
    assert 0 < spans.one_to_one.mean() < 1
    t_pos, s_pos = prediction_pairs(spans)  # each pair sits just before a span both sides start
    assert np.array_equal(t_pos + 1, spans.teacher_start[1:]) and np.array_equal(s_pos + 1, spans.student_start[1:])
    assert all(t_ends[t] == s_ends[s] for t, s in zip(t_pos, s_pos))  # after the same text
    # each span is the same text on both sides
    for k in range(len(spans)):
        t_text = text[t_off[spans.teacher_start[k]][0] : t_off[spans.teacher_end[k] - 1][1]]
        s_text = text[s_off[spans.student_start[k]][0] : s_off[spans.student_end[k] - 1][1]]
        assert t_text.strip() == s_text.strip()


def test_shared_vocabulary(two_tokenizers):
    big, small = two_tokenizers
    same_t, same_s = shared_vocabulary(big, big)
    assert np.array_equal(same_t, same_s) and len(same_t) == len(big.get_vocab())
    t_ids, s_ids = shared_vocabulary(big, small)
    t_tokens, s_tokens = big.convert_ids_to_tokens(t_ids.tolist()), small.convert_ids_to_tokens(s_ids.tolist())
    assert t_tokens == s_tokens  # same scheme on both sides: the same strings
    both = set(big.get_vocab()) & set(small.get_vocab())
    assert len(t_ids) == len(both)


def test_one_vocabulary_gives_the_ordinary_kd_term_and_gradient():
    torch.manual_seed(0)
    student = torch.randn(12, 50, requires_grad=True)
    teacher = torch.randn(12, 50)
    ids = torch.arange(50)
    got = cross_tokenizer_divergence(student, teacher, ids, ids, temperature=2.0)
    want = token_divergence(student, teacher, 2.0, "forward_kl")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), student)
    (g_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)


def test_two_vocabularies_by_hand():
    """Teacher vocabulary of 3, student of 4; teacher token 0 is student token 1, the rest unshared."""
    student = torch.tensor([[0.3, 1.2, -0.5, 0.1]])
    teacher = torch.tensor([[2.0, 0.5, -1.0]])
    p = np.exp(teacher.numpy()[0]) / np.exp(teacher.numpy()[0]).sum()
    q = np.exp(student.numpy()[0]) / np.exp(student.numpy()[0]).sum()
    exact = p[0] * (np.log(p[0]) - np.log(q[1]))
    rest_p = np.sort([p[1], p[2], 0.0])[::-1]  # padded to the longer rest
    rest_q = np.sort([q[0], q[2], q[3]])[::-1]
    want = exact + np.abs(rest_p - rest_q).sum()
    got = cross_tokenizer_divergence(student, teacher, torch.tensor([0]), torch.tensor([1]), temperature=1.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # nothing shared: the ULD distance alone, zero for the same sorted probabilities
    same = cross_tokenizer_divergence(teacher, teacher.flip(-1), torch.tensor([], dtype=torch.long),
                                      torch.tensor([], dtype=torch.long), temperature=1.0)  # fmt: skip
    assert same.item() == pytest.approx(0.0, abs=1e-7)
