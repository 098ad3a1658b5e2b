"""A student started from the teacher, and the hidden-state term, through the real command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load, load_file
from transformers import AutoModelForCausalLM

from conftest import cli, read_jsonl, train_args
from forked import run_cli_forked
from lmdistill.config import GuardConfig
from lmdistill.training.guards import Action, Cause, Guard, StepStats

HALF = (
    "model.student_config={num_hidden_layers: 1, hidden_size: 24, intermediate_size: 48, "
    "num_attention_heads: 1, num_key_value_heads: 1}"
)


def _train_args(teacher_dir, text_file, out, *extra, steps=4):
    """A short run of a student started from the teacher (of the teacher's shape unless ``extra``
    sets one)."""
    return train_args(
        teacher_dir,
        text_file,
        out,
        "--set",
        "model.student_init=teacher",
        *extra,
        batch_size=2,
        steps=steps,
        eval_every=None,
        max_eval_blocks=None,
        student=None,
    )


def _train(teacher_dir, text_file, out, *extra, steps=4):
    return cli(*_train_args(teacher_dir, text_file, out, *extra, steps=steps))


def test_a_student_of_the_teacher_shape_starts_as_the_teacher(tmp_path, teacher_dir, text_file):
    config = json.loads((teacher_dir / "config.json").read_text())
    shape = {
        k: config[k]
        for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    }
    proc = _train(
        teacher_dir, text_file, tmp_path / "run", "--set", f"model.student_config={json.dumps(shape)}", steps=1
    )
    assert proc.returncode == 0, proc.stderr
    initial = json.loads((tmp_path / "run" / "run.json").read_text())["initial"]
    assert initial["eval_ce_loss"] == initial["teacher_ce_loss"]
    assert initial["top1_agreement"] == 1.0


def test_hidden_term_is_logged_reported_and_left_out_of_the_export(tmp_path, teacher_dir, text_file):
    run = tmp_path / "run"
    proc = _train(teacher_dir, text_file, run, "--set", HALF, "--set", "distill.hidden.weight=0.5")
    assert proc.returncode == 0, proc.stderr
    lines = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(lines) == 4 and all(math.isfinite(r["hidden_loss"]) and r["hidden_loss"] > 0 for r in lines)
    # the total is the three weighted terms (kd_weight 0.5 by default)
    for r in lines:
        assert r["loss"] == pytest.approx(0.5 * r["kd_loss"] + 0.5 * r["ce_loss"] + 0.5 * r["hidden_loss"], rel=1e-5)
    assert "hidden term" in (run / "report.md").read_text()
    checkpoint = run / "checkpoints" / "step-4"
    projection = load((checkpoint / "hidden_projection.safetensors").read_bytes())
    assert [tuple(t.shape) for t in projection.values()] == [(48, 24)]  # teacher width x student width
    out = tmp_path / "exported"
    assert cli("export", str(run), str(out)).returncode == 0
    exported = load_file(out / "model.safetensors")
    student = load_file(run / "student" / "model.safetensors")
    assert exported.keys() == student.keys()
    assert not any("maps" in k or "projection" in k for k in exported)
    AutoModelForCausalLM.from_pretrained(out)


def test_projection_starts_as_the_inverse_of_width_pruning(tmp_path, teacher_dir, text_file):
    run = tmp_path / "run"
    proc = _train(
        teacher_dir,
        text_file,
        run,
        "--set",
        HALF,
        "--set",
        "distill.hidden.weight=0.5",
        "--set",
        "checkpoint.every=1",
        "--set",
        "train.lr=1e-12",
        steps=1,
    )
    assert proc.returncode == 0, proc.stderr
    (weight,) = load((run / "checkpoints" / "step-1" / "hidden_projection.safetensors").read_bytes()).values()
    # one 1 per student channel (column), in distinct teacher channels (rows); ~0 elsewhere
    assert torch.allclose(weight.sum(dim=0), torch.ones(24), atol=1e-6)
    rows = weight.argmax(dim=0)
    assert len(set(rows.tolist())) == 24
    teacher_norm = load_file(teacher_dir / "model.safetensors")["model.norm.weight"]
    student_norm = load_file(run / "student" / "model.safetensors")["model.norm.weight"]
    assert torch.allclose(student_norm, teacher_norm[rows], atol=1e-6)  # the channels it was cut from


@pytest.mark.slow
def test_resume_with_the_hidden_term_is_bit_exact(tmp_path, teacher_dir, text_file):
    args = (
        "--set",
        HALF,
        "--set",
        "distill.hidden.weight=1.0",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=8",
    )
    straight = tmp_path / "straight"
    assert _train(teacher_dir, text_file, straight, *args, steps=6).returncode == 0
    resumed = tmp_path / "resumed"
    first = run_cli_forked(
        *_train_args(teacher_dir, text_file, resumed, *args, "--set", "debug.exit_after_step=3", steps=6),
        log=str(tmp_path / "first.log"),
    )
    assert first == 137, (tmp_path / "first.log").read_text()[-2000:]
    proc = _train(teacher_dir, text_file, resumed, *args, "--resume", steps=6)
    assert proc.returncode == 0, proc.stderr
    assert "from step-3" in proc.stdout

    def losses(run):
        return [(r["step"], r["loss"], r["hidden_loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]

    assert losses(resumed) == losses(straight)
    a, b = straight / "checkpoints" / "step-6", resumed / "checkpoints" / "step-6"
    # Tensors, not file bytes: safetensors writes its metadata map in no fixed order.
    for name in ("model.safetensors", "hidden_projection.safetensors"):
        want, got = load_file(a / name), load_file(b / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    want, got = (torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (a, b))
    assert want.keys() == got.keys()
    for k in want:
        assert all(torch.equal(want[k][n], got[k][n]) for n in ("exp_avg", "exp_avg_sq", "step")), k


@pytest.mark.parametrize(
    "layers, message",
    [
        ("[[3, 0]]", "student layer 3"),
        ("[[0, 9]]", "teacher layer 9"),
        ("[[0, 0], [0, 1]]", "listed twice"),
        ("[0, 1]", "is not a [student_layer, teacher_layer] pair"),
    ],
)
def test_bad_layer_maps_are_refused_before_anything_is_written(tmp_path, teacher_dir, text_file, layers, message):
    proc = _train(
        teacher_dir,
        text_file,
        tmp_path / "run",
        "--set",
        HALF,
        "--set",
        "distill.hidden.weight=1",
        "--set",
        f"distill.hidden.layers={layers}",
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "distill.hidden.layers" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_nonfinite_hidden_term_skips_the_step():
    guard = Guard(GuardConfig())
    stats = StepStats(
        loss=1.0, kd=0.5, kd_unscaled=0.2, ce=1.5, grad_norm=0.3, teacher_nonfinite=False, hidden=math.nan
    )
    decision = guard.decide(stats)
    assert decision.action is Action.SKIP and decision.cause is Cause.NONFINITE and decision.term == "hidden"
    assert decision.reason == "nonfinite:hidden"  # what the skipped step's metrics line says
    good = StepStats(loss=1.0, kd=0.5, kd_unscaled=0.2, ce=1.5, grad_norm=0.3, teacher_nonfinite=False, hidden=0.7)
    assert Guard(GuardConfig()).decide(good).action is Action.STEP


def test_student_init_teacher_with_a_named_student_is_refused(tmp_path, teacher_dir, student_dir, text_file):
    proc = _train(teacher_dir, text_file, tmp_path / "run", "--student", str(student_dir))
    assert proc.returncode == 2
    assert "model.student_init = 'teacher'" in proc.stderr and "model.student" in proc.stderr


def test_prune_command_writes_a_loadable_student_and_prints_importances(tmp_path, teacher_dir, text_file):
    out = tmp_path / "pruned"
    proc = cli(
        "prune",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(text_file),
        "--out",
        str(out),
        "--set",
        "data.block_size=32",
        "--set",
        "model.student_config={num_hidden_layers: 1}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "teacher layer   0  influence" in proc.stdout and "teacher layer   1  influence" in proc.stdout
    assert proc.stdout.count("-> student layer 0") == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    again = cli("prune", "--teacher", str(teacher_dir), "--data", str(text_file), "--out", str(out))
    assert again.returncode == 2 and "not an empty directory" in again.stderr
    assert (out / "model.safetensors").is_file()


def test_prune_refuses_outputs_it_cannot_use(tmp_path, teacher_dir, text_file, monkeypatch):
    base = ("prune", "--teacher", str(teacher_dir), "--data", str(text_file), "--set", "data.block_size=32")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for out, message in (
        (".", "is the current directory"),
        ("", "empty path"),
        (str(text_file / "s"), "is a file, not a directory"),
    ):
        proc = cli(*base, "--out", out)
        assert proc.returncode == 2 and message in proc.stderr, (out, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert list(empty.iterdir()) == []
    proc = cli(*base, "--out", str(tmp_path / "s"), "--set", "model.student_config={vocab_size: 100}")
    assert proc.returncode == 2 and "vocab_size = 100 differs from the teacher's 384" in proc.stderr


def test_prune_of_another_family_says_prune_needs_a_llama_family_teacher(tmp_path, tiny_tokenizer, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=16, n_layer=2, n_head=2)).save_pretrained(gpt2)
    tiny_tokenizer.save_pretrained(gpt2)
    proc = cli("prune", "--teacher", str(gpt2), "--data", str(text_file), "--out", str(tmp_path / "s"))
    assert proc.returncode == 2
    assert "lmdistill prune needs a teacher of the llama, mistral, qwen2, qwen3 families" in proc.stderr
    assert "is a gpt2 model" in proc.stderr and not (tmp_path / "s").exists()
