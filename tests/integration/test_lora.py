"""LoRA students (model.lora): only the adapters train, and the run's machinery takes them as it
takes a whole student: checkpoints and bit-exact resume, the guard, the other loss paths, DDP,
and export merged or as adapters alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, launch, one_error_line, read_jsonl, train_args
from forked import run_cli_forked
from lmdistill.training.checkpoint import load_checkpoint

R, ALPHA, STEPS = 4, 8.0, 8


def _args(teacher_dir, student_dir, text_file, out, *extra, lora=True):
    """A short run; ``student_dir`` None cuts the student out of the teacher."""
    return train_args(
        teacher_dir,
        text_file,
        out,
        *(("--student", str(student_dir)) if student_dir else ()),
        "--lr",
        "1e-2",
        *(("--set", f"model.lora={{r: {R}, alpha: {ALPHA}}}") if lora else ()),
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=100",
        *extra,
        batch_size=2,
        steps=STEPS,
        eval_every=4,
        student=None if student_dir else "model.student_config={num_hidden_layers: 1}",
    )


def _losses(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, teacher_dir, student_dir, text_file):
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = cli(*_args(teacher_dir, student_dir, text_file, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _linear_layers(model_dir):
    """(name, in, out) of every linear layer of the model in ``model_dir`` but its output layer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]


def test_only_the_adapters_train(lora_run, student_dir):
    out, stdout = lora_run
    layers = _linear_layers(student_dir)
    base = load_file(student_dir / "model.safetensors")
    expected = sum(R * (fan_in + fan_out) for _, fan_in, fan_out in layers)
    total = sum(t.numel() for t in base.values()) + expected
    assert f"LoRA: {expected:,} of {total:,} parameters trained" in stdout
    student = json.loads((out / "run.json").read_text())["student"]
    assert student["trained_params"] == expected and student["lora"]["r"] == R
    final = load_checkpoint(out / "checkpoints" / f"step-{STEPS}").model_state
    adapted = {name for name, _, _ in layers}
    for name, tensor in base.items():  # every weight of the student, frozen, under peft's name
        module = name.rsplit(".", 1)[0]
        key = f"base_model.model.{module}.base_layer.weight" if module in adapted else f"base_model.model.{name}"
        assert torch.equal(final[key], tensor), name
    # peft starts B at zero: every B that moved was trained
    b_keys = [k for k in final if "lora_B" in k]
    assert len(b_keys) == len(layers)
    assert all(final[k].abs().sum() > 0 for k in b_keys)


def test_student_directory_holds_the_merged_model(lora_run, student_dir):
    """student/ = W + (alpha / r) B A for every adapted layer, the rest unchanged."""
    out, _ = lora_run
    state = load_checkpoint(out / "checkpoints" / f"step-{STEPS}").model_state
    merged = load_file(out / "student" / "model.safetensors")
    for name, fan_in, fan_out in _linear_layers(student_dir):
        prefix = f"base_model.model.{name}"
        a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
        assert a.shape == (R, fan_in) and b.shape == (fan_out, R)
        want = state[f"{prefix}.base_layer.weight"] + (ALPHA / R) * (b @ a)
        torch.testing.assert_close(merged[f"{name}.weight"], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged["model.embed_tokens.weight"], state["base_model.model.model.embed_tokens.weight"])


def test_export_merged_and_adapter_alone(lora_run, student_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    assert cli("export", str(out), str(merged_dir)).returncode == 0
    assert cli("export", str(out), str(adapter_dir), "--adapter").returncode == 0
    a, b = load_file(merged_dir / "model.safetensors"), load_file(out / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(student_dir)
    assert settings["r"] == R and settings["lora_alpha"] == ALPHA
    assert not (adapter_dir / "model.safetensors").exists()  # the adapters alone
    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter_dir / "README.md")
    assert card.data.library_name == "peft" and "This repository holds the adapters alone." in card.text
    assert f"Only LoRA adapters were trained (r {R}, alpha {ALPHA:g}" in card.text
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        # peft finds the base model from the adapters' record and applies them to it
        got = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    one_error_line(cli("eval", str(adapter_dir)), "holds LoRA adapters alone", "without --adapter")


def test_adapter_export_refused_where_it_cannot_stand_alone(lora_run, teacher_dir, text_file, tmp_path):
    out, _ = lora_run
    full = tmp_path / "full"
    assert cli(*_args(teacher_dir, out / "student", text_file, full, lora=False)).returncode == 0
    line = one_error_line(
        cli("export", str(full), str(tmp_path / "x"), "--adapter"), "not a LoRA one", "without --adapter"
    )
    assert "model.lora.r = 0" in line
    cut = tmp_path / "cut"
    assert cli(*_args(teacher_dir, None, text_file, cut)).returncode == 0
    one_error_line(cli("export", str(cut), str(tmp_path / "y"), "--adapter"), "built inside the run", "drop --adapter")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_killed_lora_run_resumes_bit_exact(lora_run, teacher_dir, student_dir, text_file, tmp_path):
    uninterrupted, _ = lora_run
    out = tmp_path / "resumed"
    first = run_cli_forked(*_args(teacher_dir, student_dir, text_file, out, "--set", "debug.exit_after_step=3"))
    assert first == 137
    other = cli(*_args(teacher_dir, student_dir, text_file, out, "--resume", "--set", "model.lora.r=8"))
    one_error_line(other, "its adapters have r 4", "model.lora")
    resumed = cli(*_args(teacher_dir, student_dir, text_file, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(out) == _losses(uninterrupted)
    want = load_checkpoint(uninterrupted / "checkpoints" / f"step-{STEPS}")
    got = load_checkpoint(out / "checkpoints" / f"step-{STEPS}")
    assert want.model_state.keys() == got.model_state.keys()
    assert all(torch.equal(want.model_state[k], got.model_state[k]) for k in want.model_state)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_a_skipped_step_and_a_rollback_restore_adapters_and_optimizer(teacher_dir, student_dir, text_file, tmp_path):
    out = tmp_path / "run"
    proc = cli(
        *_args(teacher_dir, student_dir, text_file, out),
        "--max-steps",
        "14",
        "--set",
        "debug.inject=[{step: 3, where: grad, value: nan}]",
        "--set",
        "guard={spike: rollback, spike_warmup: 5, rollback_interval: 4, rollback_keep: 2}",
        "--set",
        "debug.loss_multiplier={10: 20.0}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["to_step"]) for r in records if r.get("event") == "rollback"] == [(10, 8)]
    ckpt = {s: load_checkpoint(out / "checkpoints" / f"step-{s}") for s in (3, 4, 8, 11)}
    # the NaN gradient at step 3 changed nothing; the spike at step 10 went back to step 8's state
    for before, after in ((3, 4), (8, 11)):
        _assert_same(ckpt[before].model_state, ckpt[after].model_state)
        _assert_same(ckpt[before].optimizer_state["state"], ckpt[after].optimizer_state["state"])
    # the optimizer holds the adapters' state only: two moments and a step for each A and B
    adapters = [k for k in ckpt[11].model_state if "lora_" in k]
    assert len(ckpt[11].optimizer_state["state"]) == len(adapters)


def test_chunked_path_hidden_term_and_on_policy_steps(teacher_dir, student_dir, text_file, tmp_path):
    out = tmp_path / "run"
    proc = cli(
        *_args(teacher_dir, student_dir, text_file, out),
        "--set",
        "loss.impl=chunked",
        "--set",
        "distill.hidden.weight=1.0",
        "--set",
        "distill.on_policy={fraction: 0.5, prompt_tokens: 8, max_new_tokens: 8}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(lines) == STEPS and all(math.isfinite(r["loss"]) for r in lines)
    assert {bool(r.get("on_policy")) for r in lines} == {True, False}
    assert any(r.get("hidden_loss", 0) > 0 for r in lines if not r.get("on_policy"))
    first = load_checkpoint(out / "checkpoints" / "step-1").model_state
    last = load_checkpoint(out / "checkpoints" / f"step-{STEPS}").model_state
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    assert changed and all("lora_" in k for k in changed)
    projection = load_file(out / "checkpoints" / f"step-{STEPS}" / "hidden_projection.safetensors")
    assert projection  # the hidden term's projection trains beside the adapters
    # generating through the adapters left the student's own generation settings as they were
    saved = json.loads((out / "student" / "generation_config.json").read_text())
    started = json.loads((student_dir / "generation_config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "transformers_version"} == {
        k: v for k, v in started.items() if k != "transformers_version"
    }
    assert "eos_token_id" in saved


def test_lora_refusals(teacher_dir, student_dir, text_file, tmp_path):
    base = _args(teacher_dir, student_dir, text_file, tmp_path / "run")
    one_error_line(cli(*base, "--set", "model.lora.target_modules=[q_proj, nothing_here]"), "nothing_here", "q_proj")
    one_error_line(cli(*base, "--set", "model.lora.target_modules=[lm_head]"), "output layer", "q_proj")
    one_error_line(cli(*base, "--set", "model.lora={r: 0, alpha: 8}"), "model.lora.alpha is set", "model.lora.r")
    one_error_line(cli(*base, "--set", "model.lora.quantize=4bit"), "QLoRA", "model.lora.quantize: none")
    one_error_line(cli(*base, "--set", "parallel.strategy=fsdp"), "LoRA", "parallel.strategy: ddp")
    one_error_line(cli(*base, "--set", "model.lora.r=-1"), "model.lora.r")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(teacher_dir, student_dir, text_file, tmp_path):
    single = cli(*_args(teacher_dir, student_dir, text_file, tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    args = list(_args(teacher_dir, student_dir, text_file, tmp_path / "ddp"))
    args[args.index("--batch-size") + 1] = "1"
    ddp = launch(2, *args)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(STEPS))
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)
    wa = load_checkpoint(tmp_path / "single" / "checkpoints" / f"step-{STEPS}").model_state
    wb = load_checkpoint(tmp_path / "ddp" / "checkpoints" / f"step-{STEPS}").model_state
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-4)
