"""Cross-tokenizer foundations: two tokenizations aligned by characters (data/alignment.py), and
the divergence between distributions over two vocabularies (loss/crosstok.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.data.alignment import (
    ContinuationTargets,
    align,
    prediction_pairs,
    shared_vocabulary,
    token_ends,
    vocabulary_map,
)
from lmdistill.loss.crosstok import cross_tokenizer_divergence
from lmdistill.loss.dense import token_divergence


@pytest.fixture(scope="module")
def two_tokenizers(corpus_texts):
    from lmdistill.default import train_tokenizer

    return train_tokenizer(corpus_texts, vocab_size=384), train_tokenizer(corpus_texts, vocab_size=300)


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
    got = cross_tokenizer_divergence(student, teacher, torch.arange(50), temperature=2.0)
    want = token_divergence(student, teacher, 2.0, "forward_kl")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), student)
    (g_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)


def test_two_vocabularies_by_hand():
    """Teacher vocabulary of 4, student of 3: teacher tokens 0 and 2 begin with student token 1,
    teacher token 1 is student token 0, teacher token 3 (a special token) maps to nothing. The
    teacher's probabilities are carried at T = 1, then the carried distribution is softened."""
    student = torch.tensor([[0.3, 1.2, -0.5]])
    teacher = torch.tensor([[2.0, 0.5, -1.0, 0.7]])
    p = np.exp(teacher.numpy()[0]) / np.exp(teacher.numpy()[0]).sum()
    carried = np.array([p[1], p[0] + p[2], 0.0])
    soft = np.where(carried > 0, carried, 0.0) ** 0.5  # T = 2
    soft = soft / soft.sum()
    q = np.exp(student.numpy()[0] / 2) / np.exp(student.numpy()[0] / 2).sum()
    want = sum(c * (np.log(c) - np.log(qq)) for c, qq in zip(soft, q) if c > 0)
    got = cross_tokenizer_divergence(student, teacher, torch.tensor([1, 0, 1, -1]), temperature=2.0)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_continuation_targets_against_brute_force(two_tokenizers):
    """At a student position inside a word the teacher writes in one token: the teacher's
    probabilities over its tokens that the student writes beginning with what it has read, summed
    by the student token that comes next, from a search over the whole teacher vocabulary."""
    big, small = two_tokenizers
    targets = ContinuationTargets(big, small, k=len(small))
    torch.manual_seed(1)
    logits = torch.randn(3, len(big)) * 3
    specials = set(big.all_special_ids)
    written = {}
    for token, index in big.get_vocab().items():
        text = big.convert_tokens_to_string([token])
        if index not in specials and "\ufffd" not in text:
            written[index] = small(text, add_special_tokens=False)["input_ids"]
    reads = [w[:1] for w in list(written.values())[::37] if len(w) > 1][:6] + [
        w[:2] for w in written.values() if len(w) > 2
    ][:3]
    pair_of = np.arange(len(reads)) % 3
    rows, ids, weights = targets.targets(logits, pair_of, reads)
    assert rows.tolist() == list(range(len(reads)))
    p = torch.softmax(logits, -1).numpy()
    for c, read in enumerate(reads):
        want: dict[int, float] = {}
        for teacher_id, pieces in written.items():
            if len(pieces) > len(read) and pieces[: len(read)] == read:
                want[pieces[len(read)]] = want.get(pieces[len(read)], 0.0) + p[pair_of[c], teacher_id]
        total = sum(want.values())
        got = {int(i): float(w) for i, w in zip(ids[c], weights[c]) if w > 0}
        assert got.keys() == want.keys()
        for i in want:
            assert got[i] == pytest.approx(want[i] / total, rel=1e-4)


def test_vocabulary_map(two_tokenizers):
    big, small = two_tokenizers
    assert np.array_equal(vocabulary_map(big, big), np.arange(len(big)))
    mapping = vocabulary_map(big, small)
    assert (mapping >= 0).all() and mapping.max() < len(small)
    assert mapping[big.eos_token_id] == small.eos_token_id
    for teacher_id in range(len(big)):
        token, carried = big.convert_ids_to_tokens(teacher_id), small.convert_ids_to_tokens(int(mapping[teacher_id]))
        assert token.startswith(carried)  # the student token the teacher token's text begins with
        text = big.convert_tokens_to_string([token])
        if token in small.get_vocab():
            assert carried == token
        elif "\ufffd" not in text:  # the student's own first token of that text
            assert small(text, add_special_tokens=False)["input_ids"][0] == mapping[teacher_id]


def test_a_student_token_longer_than_the_teacher_s_gets_the_probability_of_its_text():
    """Text "a123 b": the teacher writes "a", "1", "2", "3", " b"; the student "a", "123", " b".
    The pair before "123" is found with its 3 teacher tokens, and the teacher's probability of
    "123" -- p("1") p("2" | "1") p("3" | "12"), from its predictions along its own tokens -- is
    moved from "1" (where its first token is carried) onto the student's "123"."""
    from lmdistill.data.alignment import pair_positions
    from lmdistill.loss.crosstok import carried_distribution, longer_token_moves, span_rows

    t_ends, s_ends = np.asarray([1, 2, 3, 4, 6]), np.asarray([1, 4, 6])
    t_pos, s_pos, inside, longer = pair_positions(s_ends, t_ends, 0)
    assert t_pos.tolist() == [0, 3] and s_pos.tolist() == [0, 1] and len(inside) == 0
    assert longer.tolist() == [[0, 3]]  # pair 0, three teacher tokens
    rows, which = span_rows(torch.from_numpy(t_pos), torch.from_numpy(longer))
    assert rows.tolist() == [0, 1, 2] and which.tolist() == [0, 0, 0]
    # teacher vocabulary: 0 "a", 1 "1", 2 "2", 3 "3", 4 " b"; the student's: 0 "a", 1 "1", 2 "123", 3 " b",
    # 4 "2", 5 "3"
    mapping = torch.tensor([0, 1, 4, 5, 3])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g)  # the teacher's predictions after "a", "a1", "a12", "a123"
    own_next = torch.tensor([1, 2, 3, 4])
    log_p = torch.log_softmax(logits, -1)
    text = log_p[0, 1] + log_p[1, 2] + log_p[2, 3]  # log p("123" | "a")
    moves = longer_token_moves(
        log_p[rows, own_next[rows]], which, torch.from_numpy(longer), torch.tensor([2, 3]), mapping[own_next[[0, 3]]]
    )
    carried = carried_distribution(logits[[0, 3]], mapping, 6, 1.0, moves)
    p = log_p.exp()
    want = torch.tensor([p[0, 0], p[0, 1] - text.exp(), text.exp(), p[0, 4], p[0, 2], p[0, 3]])
    torch.testing.assert_close(carried[0], want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(carried[1], carried_distribution(logits[[3]], mapping, 6, 1.0)[0])  # no move


def test_a_sentencepiece_student_writes_each_teacher_token_as_in_running_text(two_tokenizers, corpus_texts):
    """A student whose tokenizer marks the start of a text with "▁" (SentencePiece's Metaspace):
    the student tokens a teacher token is written in spell exactly its text, and the token it is
    carried to begins it, as in the middle of a text (written alone, "ing" would be "▁ing")."""
    from conftest import unigram_tokenizer
    from lmdistill.data.alignment import token_text, written_by_student

    big, student = two_tokenizers[0], unigram_tokenizer(corpus_texts, 500)
    assert student("ing", add_special_tokens=False).tokens()[0].startswith("\u2581")  # the trap
    written, mapping = written_by_student(big, student), vocabulary_map(big, student)
    unk = student.unk_token_id
    spelled = 0
    for teacher_id, ids in written.items():
        if unk in ids:
            continue
        text = big.convert_tokens_to_string([big.convert_ids_to_tokens(teacher_id)])
        pieces = [token_text(t) for t in student.convert_ids_to_tokens(ids)]
        assert "".join(pieces) == text, (text, pieces)
        assert text.startswith(token_text(student.convert_ids_to_tokens(int(mapping[teacher_id])))), text
        spelled += 1
    assert spelled > 0.8 * len(written)


def _byte_char() -> dict[int, str]:
    """Byte-level BPE's alphabet, written out here: printable Latin-1 bytes stand for themselves,
    the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _byte_fallback_tokenizer():
    """A SentencePiece-style BPE with byte fallback: "<unk>", "</s>", the 256 byte tokens "<0x00>"
    .. "<0xFF>", then "▁" and a few letters; text it cannot write goes out byte by byte."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in ["\u2581", "a", "b", "c", "\u2581a"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "a")], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def test_byte_tokens_map_to_the_other_family_s_token_of_the_same_byte(two_tokenizers):
    """SentencePiece's byte tokens ("<0xE6>") and byte-level BPE's pieces ("æ" for 0xE6) carry
    to the other tokenizer's token of the same byte, never to a token that merely starts the
    same string ("<")."""
    byte_level, fallback = two_tokenizers[0], _byte_fallback_tokenizer()
    assert fallback("é", add_special_tokens=False).tokens()[-2:] == ["<0xC3>", "<0xA9>"]
    char = _byte_char()
    level_vocab, fallback_vocab = byte_level.get_vocab(), fallback.get_vocab()
    to_level = vocabulary_map(fallback, byte_level)
    for b in range(0x80, 0x100):
        assert to_level[fallback_vocab[f"<0x{b:02X}>"]] == level_vocab[char[b]], hex(b)
    to_fallback = vocabulary_map(byte_level, fallback)
    for b in range(0x80, 0x100):
        assert to_fallback[level_vocab[char[b]]] == fallback_vocab[f"<0x{b:02X}>"], hex(b)


def test_a_context_the_normalizer_erases_is_passed_over(corpus_texts):
    """A SentencePiece-style tokenizer whose normalizer turns a newline into a space and strips
    the end (as converted nmt_nfkc models do) writes the newline context as nothing: the next
    context is used, and " the" is still written as in running text."""
    from tokenizers import normalizers

    from conftest import unigram_tokenizer
    from lmdistill.data.alignment import token_text, written_mid_text

    tokenizer = unigram_tokenizer(corpus_texts, 500)
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace("\n", " "), normalizers.Strip(left=False, right=True)]
    )
    assert tokenizer("\n", add_special_tokens=False)["input_ids"] == []
    for text in (" the", "ing", " of"):
        (written,) = written_mid_text(tokenizer, [text])
        assert "".join(token_text(t) for t in tokenizer.convert_ids_to_tokens(written)) == text
