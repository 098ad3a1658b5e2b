"""GGUF files as teachers and students: converted once, found again by content, errors in one line.

The files are written here with the `gguf` package from tiny transformers models
(tests/gguf_fixtures.py), so the right answer is known: the converted model must give the
original model's logits and the original tokenizer's ids.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import cli, one_error_line
from gguf_fixtures import write_tiny_gguf
from lmdistill.core.errors import LmdistillError
from lmdistill.models import gguf as lgguf
from lmdistill.models.loading import resolve_source

TEXT = "def area(r):\n    return 3.14159 * r ** 2  # the docs' example<|endoftext|> and more"


def gqa_llama(vocab_size: int, tied: bool):
    """4 query heads sharing 2 key-value heads (the case where q and k are reordered differently)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    model = gqa_llama(len(tiny_tokenizer), tied=False)
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tiny_tokenizer)
    return path, model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_converted_gguf_gives_the_original_logits_and_ids(tmp_path, tiny_tokenizer, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = gqa_llama(len(tiny_tokenizer), tied)
    path = write_tiny_gguf(tmp_path / "m.gguf", original, tiny_tokenizer)
    out = lgguf.converted_dir(path, "teacher", home=tmp_path / "home", say=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tiny_tokenizer(TEXT).input_ids
    assert tokenizer(TEXT).input_ids == ids
    assert tokenizer.eos_token == tiny_tokenizer.eos_token
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, original(x).logits, rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is tied
    record = json.loads((out / lgguf.RECORD).read_text())
    assert record["sha256"] == lgguf.sha256_of(path) and out.name == record["sha256"][:16]
    assert record["parameters"] == sum(p.numel() for p in original.parameters())


def test_the_second_start_uses_the_conversion_and_another_file_gets_its_own(tmp_path, tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    home = tmp_path / "home"
    first = lgguf.converted_dir(path, "teacher", home=home, say=lambda _: None)
    moved = tmp_path / "elsewhere" / "renamed.gguf"  # the same bytes under another name: the same conversion
    moved.parent.mkdir()
    shutil.copy(path, moved)

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(lgguf, "_convert", no_conversion)
    assert lgguf.converted_dir(moved, "teacher", home=home) == first
    changed = tmp_path / "changed.gguf"  # one byte differs: another file, another directory
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="converted again"):
        lgguf.converted_dir(changed, "teacher", home=home)


def test_a_killed_conversion_is_never_used(tmp_path, tiny_gguf, monkeypatch):
    path, model = tiny_gguf
    home = tmp_path / "home"
    real_convert = lgguf._convert

    def killed(src, out, role):  # dies after writing part of the model
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(lgguf, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        lgguf.converted_dir(path, "teacher", home=home, say=lambda _: None)
    assert [p.name for p in home.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-written kept
    # a leftover from a SIGKILL (no cleanup ran) is removed, and the conversion done anew
    key = lgguf.sha256_of(path)[:16]
    (home / f".{key}.tmp-99999").mkdir()
    (home / f".{key}.tmp-99999" / "model.safetensors").write_bytes(b"partial")
    monkeypatch.setattr(lgguf, "_convert", real_convert)
    out = lgguf.converted_dir(path, "teacher", home=home, say=lambda _: None)
    assert not (home / f".{key}.tmp-99999").exists()
    assert (out / lgguf.RECORD).is_file()
    # a directory under the key without the record (not ours, or damaged) is refused, not used
    (out / lgguf.RECORD).unlink()
    with pytest.raises(LmdistillError, match="is not a finished conversion.*remove it"):
        lgguf.converted_dir(path, "teacher", home=home, say=lambda _: None)


def test_gguf_sources_resolve_as_files_or_single_file_directories(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(path, one / "model.gguf")
    assert lgguf.gguf_file_of(str(one), "model.teacher") == (one / "model.gguf").resolve()
    assert lgguf.gguf_file_of(str(path), "model.teacher") == path.resolve()
    assert resolve_source(str(one), "model.teacher") == resolve_source(str(path), "model.teacher")
    shutil.copy(path, one / "other.gguf")
    with pytest.raises(LmdistillError, match=r"holds 2 GGUF files \(model.gguf, other.gguf\); give the one"):
        lgguf.gguf_file_of(str(one), "model.teacher")
    (one / "config.json").write_text("{}")  # a Hugging Face directory that also holds GGUF files is that directory
    assert lgguf.gguf_file_of(str(one), "model.teacher") is None


def test_without_the_gguf_package_the_error_names_the_extra(tiny_gguf, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(LmdistillError, match=r"needs the gguf package: pip install 'lmdistill\[gguf\]'"):
        resolve_source(str(tiny_gguf[0]), "model.teacher")


def test_a_damaged_or_unsupported_gguf_is_one_line(tmp_path, tiny_gguf, tiny_tokenizer):
    path, model = tiny_gguf
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("this is not a GGUF file\n" * 10)
    for bad in (truncated, not_gguf):
        with pytest.raises(LmdistillError, match="could not be read as a GGUF model .*download it again") as err:
            lgguf.converted_dir(bad, "teacher", home=tmp_path / "home", say=lambda _: None)
        assert "\n" not in str(err.value)
    other_arch = write_tiny_gguf(tmp_path / "arch.gguf", model, tiny_tokenizer, arch="rwkv6")
    with pytest.raises(LmdistillError, match=r"architecture rwkv6 is not supported.*use the model's Hugging Face"):
        lgguf.converted_dir(other_arch, "teacher", home=tmp_path / "home", say=lambda _: None)
    assert not any(p.is_dir() for p in (tmp_path / "home").iterdir())  # no conversion kept from any of them


def test_train_and_eval_take_a_gguf_teacher_from_the_command_line(tmp_path, tiny_gguf, text_file, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setenv("LMDISTILL_HOME", str(tmp_path / "home"))  # a home where it was never converted
    run = tmp_path / "run"
    done = cli(
        "train",
        "--teacher",
        str(path),
        "--data",
        str(text_file),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--output-dir",
        str(run),
        "--no-progress",
        "--set",
        "data.block_size=32",
        "--set",
        "model.student_config={num_hidden_layers: 1}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "converting the GGUF file tiny.gguf (model.teacher" in done.stdout
    student = json.loads((run / "student" / "config.json").read_text())
    assert "quantization_config" not in student and student["num_hidden_layers"] == 1
    again = cli("eval", str(path), "--data", str(text_file), "--block-size", "32", "--max-blocks", "2", "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "perplexity" in again.stdout and "converting" not in again.stdout  # the conversion is found, not redone
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    one_error_line(cli("eval", str(bad), "--data", str(text_file)), "could not be read as a GGUF model")


def test_the_conversion_lock_is_never_opened_through_a_link(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    home = tmp_path / "home"
    home.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (home / f"{lgguf.sha256_of(path)[:16]}.lock").symlink_to(target)
    with pytest.raises(LmdistillError, match="is a symbolic link, not the GGUF conversion lock"):
        lgguf.converted_dir(path, "teacher", home=home, say=lambda _: None)
    assert target.read_text() == "keep me"
