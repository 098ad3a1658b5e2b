"""Model loading helpers: tokenizer identity, vocabulary coverage, student config, sources, freeze."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from conftest import TINY_VOCAB, tiny_llama
from lmdistill.core.errors import LmdistillError
from lmdistill.default import train_tokenizer
from lmdistill.models.loading import (
    build_fresh_student,
    check_same_tokenizer,
    check_vocab_covers,
    freeze,
    output_vocab_size,
    resolve_source,
)
from lmdistill.models.shapes import student_config_from_teacher

# ---- tokenizers ----------------------------------------------------------------------------


def test_same_tokenizer_after_save_and_load_passes(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded is not tiny_tokenizer
    check_same_tokenizer(tiny_tokenizer, reloaded, "teacher-dir", "student-dir")  # no exception


def test_tokenizer_with_other_vocab_size_is_rejected_naming_both(corpus_texts, tiny_tokenizer):
    other = train_tokenizer(corpus_texts, vocab_size=TINY_VOCAB - 64)
    assert len(other) != len(tiny_tokenizer)
    with pytest.raises(LmdistillError) as info:
        check_same_tokenizer(tiny_tokenizer, other, "big-teacher", "small-student")
    message = str(info.value)
    assert "'big-teacher'" in message and "'small-student'" in message
    assert "different tokenizers" in message and "vocabularies differ" in message
    big, small = tiny_tokenizer.get_vocab(), other.get_vocab()  # (byte-level both: one space marker)
    both = big.keys() & small.keys()
    same_id = sum(big[token] == small[token] for token in both)
    assert (
        f"({len(big):,} vs {len(small):,} tokens; {len(both):,} in both, {same_id:,} of them with the same id)"
        in message
    )


def test_tokenizer_trained_on_other_text_is_rejected(tiny_tokenizer):
    from lmdistill.data.sources import embedded_corpus_texts

    other = train_tokenizer(embedded_corpus_texts()[24:48], vocab_size=TINY_VOCAB)  # fixture uses [:24]
    assert len(other) == len(tiny_tokenizer)  # same size, different tokens
    with pytest.raises(LmdistillError, match=r"teacher 'T'.*student 'S'.*vocabularies differ"):
        check_same_tokenizer(tiny_tokenizer, other, "T", "S")


def test_tokenizer_with_same_vocab_but_other_merges_is_rejected(tiny_tokenizer):
    from tokenizers import Tokenizer

    state = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    merges = state["model"]["merges"]
    assert len(merges) > 2
    state["model"]["merges"] = merges[::-1]  # same vocabulary, other merge priority
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token=tiny_tokenizer.eos_token
    )
    assert other.get_vocab() == tiny_tokenizer.get_vocab()
    with pytest.raises(LmdistillError, match="BPE merges differ"):
        check_same_tokenizer(tiny_tokenizer, other, "T", "S")


# ---- vocabulary coverage -------------------------------------------------------------------


def test_teacher_with_padded_embedding_rows_passes(tiny_tokenizer):
    padded = tiny_llama(len(tiny_tokenizer) + 64, hidden=16, layers=1)
    assert output_vocab_size(padded) == len(tiny_tokenizer) + 64
    check_vocab_covers(padded, len(tiny_tokenizer), "teacher", "padded-teacher")


def test_model_with_fewer_rows_than_the_tokenizer_fails(tiny_tokenizer):
    small = tiny_llama(len(tiny_tokenizer) - 10, hidden=16, layers=1)
    with pytest.raises(LmdistillError) as info:
        check_vocab_covers(small, len(tiny_tokenizer), "student", "tiny-student")
    message = str(info.value)
    assert "student 'tiny-student'" in message
    assert f"{len(tiny_tokenizer) - 10} output rows" in message
    assert f"{len(tiny_tokenizer)} tokens" in message


# ---- student config ------------------------------------------------------------------------


def teacher_config(**kw):
    base = dict(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    base.update(kw)
    return LlamaConfig(**base)


def test_student_config_halves_layers_and_width_by_default():
    teacher = teacher_config()
    student = student_config_from_teacher(teacher, {})
    assert student.num_hidden_layers == 2
    assert student.hidden_size == 32
    assert student.intermediate_size == 64
    assert student.num_attention_heads == 2
    assert student.num_attention_heads % student.num_key_value_heads == 0
    assert student.vocab_size == 100  # the tokenizer is shared: never shrunk
    assert student.hidden_size // student.num_attention_heads == 16
    # the teacher's config is not modified
    assert (teacher.num_hidden_layers, teacher.hidden_size, teacher.num_attention_heads) == (4, 64, 4)
    # and the result builds a working model
    model = build_fresh_student(student, seed=0)
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 100)


def test_student_kv_heads_divide_the_heads_when_halving():
    student = student_config_from_teacher(
        teacher_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=96), {}
    )
    assert student.num_attention_heads == 3
    assert 3 % student.num_key_value_heads == 0


def test_student_config_overrides_are_applied():
    student = student_config_from_teacher(teacher_config(), {"num_hidden_layers": 1, "intermediate_size": 40})
    assert student.num_hidden_layers == 1
    assert student.intermediate_size == 40
    assert student.hidden_size == 64  # not halved when overrides are given
    assert student.num_attention_heads == 4


def test_unknown_student_config_key_is_an_error():
    with pytest.raises(LmdistillError, match=r"model.student_config key 'num_layerz' is not a field of LlamaConfig"):
        student_config_from_teacher(teacher_config(), {"num_layerz": 2})


# ---- sources -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["./nope", "/abs/nope", "~/nope-lmdistill-missing", "../nope/model"])
def test_missing_local_path_is_an_error(source):
    with pytest.raises(LmdistillError, match=rf"teacher '{source}' does not exist"):
        resolve_source(source, "teacher")


def test_directory_without_config_json(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LmdistillError, match="directory without config.json"):
        resolve_source(str(tmp_path), "student")


def test_model_directory_resolves_to_absolute_path(student_dir, monkeypatch):
    monkeypatch.chdir(student_dir.parent)
    assert resolve_source(student_dir.name, "student") == str(student_dir.resolve())


def test_hub_id_is_left_as_it_is():
    assert resolve_source("Qwen/Qwen2.5-0.5B", "teacher") == "Qwen/Qwen2.5-0.5B"
    assert resolve_source("gpt2", "teacher") == "gpt2"


# ---- freeze --------------------------------------------------------------------------------


def test_freeze_sets_eval_mode_and_no_grad():
    model = tiny_llama(50, hidden=16, layers=1)
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    out = freeze(model)
    assert out is model
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    loss = model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum()
    assert not loss.requires_grad


def test_save_student_refuses_non_finite_weights_and_keeps_previous_files(tmp_path, tiny_tokenizer):
    import torch
    from safetensors.torch import load_file

    from lmdistill.core.errors import LmdistillError
    from lmdistill.training.rundir import RunDirectory

    run = RunDirectory(tmp_path)
    model = tiny_llama(len(tiny_tokenizer))
    first = run.save_student(model, tiny_tokenizer)
    saved = load_file(first / "model.safetensors")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LmdistillError, match="up_proj.weight.*NaN or Inf"):
        run.save_student(model, tiny_tokenizer)
    again = load_file(first / "model.safetensors")
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_a_teacher_tokenizer_that_starts_texts_with_bos_is_noted(tmp_path, tiny_tokenizer, capsys):
    """Blocks carry no BOS: a run says so once where the teacher's tokenizer adds one to every
    text (a post-processor, as Llama's and Gemma's do), and says nothing where it adds none."""
    from types import SimpleNamespace

    from tokenizers import processors

    from lmdistill.training.setup import note_dropped_bos

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    with_bos = AutoTokenizer.from_pretrained(tmp_path / "tok")
    bos = with_bos.eos_token
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, with_bos.eos_token_id)]
    )
    with_bos.bos_token = bos
    assert (
        with_bos("x")["input_ids"][0]
        == with_bos.bos_token_id
        != with_bos("x", add_special_tokens=False)["input_ids"][0]
    )
    for tokenizer, said in ((tiny_tokenizer, False), (with_bos, True)):
        note_dropped_bos(SimpleNamespace(teacher=object(), teacher_tokenizer=None, tokenizer=tokenizer))
        out = capsys.readouterr().out.strip()
        assert (
            out.startswith(f"note: the teacher's tokenizer starts every text with {bos!r}") and "\n" not in out
        ) == said
        assert said or out == ""
    note_dropped_bos(
        SimpleNamespace(teacher=None, teacher_tokenizer=None, tokenizer=with_bos)
    )  # a cache: no teacher runs
    assert capsys.readouterr().out == ""


def test_a_tokenizer_that_changes_the_text_is_noted_across_tokenizers(tmp_path, tiny_tokenizer, capsys):
    """A side whose normalizer lowercases does not write text back as it was: the run says so
    for that side, showing what came back; a byte-level side reproduces the text and is not named."""
    from types import SimpleNamespace

    from tokenizers import normalizers

    from lmdistill.training.setup import _PROBE, note_lossy_tokenizers

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    lower = AutoTokenizer.from_pretrained(tmp_path / "tok")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    back = lower.decode(lower(_PROBE, add_special_tokens=False)["input_ids"], clean_up_tokenization_spaces=False)
    assert back == _PROBE.lower() != _PROBE
    note_lossy_tokenizers(SimpleNamespace(tokenizer=lower, teacher_tokenizer=tiny_tokenizer))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"note: the student's tokenizer does not write text back as it was ({_PROBE!r} comes back as {back!r}): "
        "its bits per byte are of the text as it sees it"
    ]
