"""model.compile and model.liger in a training run, on the CPU.

A compiled run is the same run: per-step losses, gradient norms, held-out figures and final
weights agree with the eager run's within fp32 tolerance, on both loss paths and under DDP and
FSDP2; its checkpoints hold the plain model's names, so an eager resume continues it and export
and the model card work. Liger's kernels need a CUDA GPU: here only its refusals and ``auto``
resolving to off are tested (tests/unit/test_speedup_switches.py drives its patching with a stand-in).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, launch, one_error_line, read_jsonl, train_args

STUDENT = (
    "model.student_config={num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, "
    "num_attention_heads: 2, num_key_value_heads: 2}"
)
TERMS = ("loss", "kd_loss", "ce_loss", "grad_norm")


def _args(teacher_dir, text_file, out, *extra, batch_size=4, steps=4):
    return train_args(
        teacher_dir,
        text_file,
        out,
        "--set",
        "checkpoint.every=2",
        *extra,
        batch_size=batch_size,
        steps=steps,
        student=STUDENT,
    )


def _steps(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "skipped" not in r}


def _assert_same_run(a, b, rel=1e-4):
    """Two runs' per-step terms within ``rel``, their held-out figures too, final weights within
    what a few AdamW steps of 1e-3 make of fp32 rounding."""
    sa, sb = _steps(a), _steps(b)
    assert sorted(sa) == sorted(sb) and sa
    for step in sa:
        for key in TERMS:
            assert sb[step][key] == pytest.approx(sa[step][key], rel=rel, abs=1e-6), (step, key)
    ra, rb = (json.loads((d / "run.json").read_text())["final"] for d in (a, b))
    assert rb["eval_ce_loss"] == pytest.approx(ra["eval_ce_loss"], rel=rel)
    wa, wb = (load_file(d / "student" / "model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=2e-5, msg=name)


def test_auto_is_off_on_the_cpu_and_the_run_records_it(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, text_file, out, steps=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((out / "run.json").read_text())["plan"]
    assert (plan["compile"], plan["liger"]) == ("off", "off")
    assert "models:" not in proc.stdout  # nothing runs compiled or patched: no line


def test_compile_on_compiles_both_models_in_place_and_the_teacher_stays_frozen(
    tmp_path, teacher_dir, text_file, capsys
):
    from lmdistill.config import Config
    from lmdistill.models.speedups import compiled_layers
    from lmdistill.training.setup import build_run

    settings = [f"model.teacher={teacher_dir}", f"data.path={text_file}", f"run.output_dir={tmp_path / 'run'}"]
    settings += ["run.device=cpu", "data.block_size=32", STUDENT, "model.compile=on"]
    parts = build_run(Config.load(None, settings), progress=False)  # (nothing runs: nothing compiles yet)
    try:
        teacher, student = parts.models.teacher, parts.prepared.raw
        assert compiled_layers(teacher) == teacher.config.num_hidden_layers == 2
        assert compiled_layers(student) == student.config.num_hidden_layers == 2
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert not any("_orig_mod" in name for name in [*student.state_dict(), *teacher.state_dict()])
        assert parts.strategy.speedups.record() == {"compile": "on", "liger": "off"}
        assert "models: torch.compile on (model.compile: on)" in capsys.readouterr().out.splitlines()
    finally:
        parts.run.release()


@pytest.mark.parametrize(
    "device, needle",
    [("cpu", "run.device = 'cpu'"), ("auto", "this run computes on cpu")],
)
def test_liger_on_without_cuda_is_one_line(tmp_path, teacher_dir, text_file, device, needle):
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, text_file, out), "--device", device, "--set", "model.liger=on")
    one_error_line(proc, "model.liger = on needs a CUDA GPU", needle, "model.liger: off")
    assert not out.exists()


def test_liger_on_without_the_package_is_one_line(tmp_path, teacher_dir, text_file, monkeypatch):
    """On a machine with CUDA (pretended: the refusal comes before anything touches the device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, text_file, out), "--set", "model.liger=on")
    one_error_line(proc, "model.liger = on needs the liger-kernel package", "pip install liger-kernel", "off")
    assert not out.exists()


@pytest.fixture(scope="module")
def eager_and_compiled(tmp_path_factory, teacher_dir, text_file):
    """The same 4-step run, eager and compiled, on each loss path (a checkpoint every 2 steps)."""
    base = tmp_path_factory.mktemp("compile")
    runs = {}
    for impl in ("full", "chunked"):
        for setting in ("off", "on"):
            out = base / f"{impl}-{setting}"
            proc = cli(
                *_args(teacher_dir, text_file, out), "--set", f"loss.impl={impl}", "--set", f"model.compile={setting}"
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "torch.compile failed" not in proc.stdout  # compiled, not fallen back to eager
            runs[impl, setting] = (out, proc.stdout)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["full", "chunked"])
def test_a_compiled_run_is_the_eager_run(eager_and_compiled, impl):
    (eager, eager_out), (compiled, compiled_out) = eager_and_compiled[impl, "off"], eager_and_compiled[impl, "on"]
    assert "models: torch.compile on (model.compile: on)" in compiled_out.splitlines()
    assert "models:" not in eager_out
    plan = json.loads((compiled / "run.json").read_text())["plan"]
    assert (plan["compile"], plan["liger"], plan["loss_impl"]) == ("on", "off", impl)
    _assert_same_run(eager, compiled)


@pytest.mark.slow
def test_a_compiled_checkpoint_resumes_eagerly_and_exports(eager_and_compiled, tmp_path, teacher_dir, text_file):
    """The compiled run's step-2 checkpoint holds the plain names; an eager resume from it runs
    steps 3 and 4 as the eager run did; its checkpoint exports with a model card."""
    eager, compiled = eager_and_compiled["full", "off"][0], eager_and_compiled["full", "on"][0]
    step2 = compiled / "checkpoints" / "step-2"
    names = set(load_file(step2 / "model.safetensors"))
    assert names == set(load_file(eager / "checkpoints" / "step-2" / "model.safetensors"))
    assert not any("_orig_mod" in name for name in names)
    resumed = tmp_path / "resumed"  # the compiled run as if it had been stopped after step 2
    shutil.copytree(compiled, resumed)
    for leftover in ("checkpoints/step-4", "student"):
        shutil.rmtree(resumed / leftover)
    info = json.loads((resumed / "run.json").read_text())
    (resumed / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    proc = cli(
        *_args(teacher_dir, text_file, resumed), "--set", "loss.impl=full", "--set", "model.compile=off", "--resume"
    )
    assert proc.returncode == 0 and "from step-2" in proc.stdout, proc.stderr[-3000:]
    warned = [line for line in proc.stdout.splitlines() if line.startswith("warning: resuming with a changed config")]
    assert not any("model.compile" in line for line in warned), warned  # the same computation: no warning
    _assert_same_run(eager, resumed)
    exported = tmp_path / "exported"
    assert cli("export", str(compiled / "checkpoints" / "step-4"), str(exported)).returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported)
    want = load_file(compiled / "checkpoints" / "step-4" / "model.safetensors")
    got = model.state_dict()
    assert all(torch.equal(got[name], want[name]) for name in want)
    from huggingface_hub import ModelCard

    assert f'from_pretrained("{exported}")' in ModelCard.load(exported / "README.md").text


@pytest.mark.slow
def test_a_compiled_lora_run_is_the_eager_run(tmp_path, teacher_dir, text_file):
    """The layers compiled with peft's adapters inside them: the same run, the same merged student."""
    runs = {}
    for setting in ("off", "on"):
        runs[setting] = tmp_path / setting
        lora = ("--set", "model.lora={r: 4}", "--set", f"model.compile={setting}", "--lr", "3e-3")
        proc = cli(*_args(teacher_dir, text_file, runs[setting], *lora))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "torch.compile failed" not in proc.stdout
    assert json.loads((runs["on"] / "run.json").read_text())["plan"]["compile"] == "on"
    _assert_same_run(runs["off"], runs["on"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_compiled_processes_match_two_eager_ones(tmp_path, teacher_dir, text_file, strategy):
    """Compiled inside the DDP wrapper, or inside each FSDP2 layer's hooks: the same run."""
    runs = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        extra = ("--set", f"parallel.strategy={strategy}", "--set", f"model.compile={setting}")
        if strategy == "fsdp":
            extra += ("--set", "loss.impl=chunked")
        proc = launch(2, *_args(teacher_dir, text_file, out, *extra, batch_size=2))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "torch.compile failed" not in proc.stdout
        runs[setting] = out
    assert json.loads((runs["on"] / "run.json").read_text())["plan"]["compile"] == "on"
    _assert_same_run(runs["off"], runs["on"])


@pytest.mark.slow
def test_every_layer_runs_inductors_code_even_past_the_recompile_limit(tmp_path):
    """The compiled layers really run compiled, not a silent eager fallback: with more layers than
    dynamo's recompile limit (all of one class, each its own bound forward), one graph serves them
    all, nothing falls back or breaks the graph, and the model's loss and gradients are the eager
    model's within fp32 tolerance."""
    from torch._dynamo.utils import counters

    from conftest import tiny_llama
    from lmdistill.models.speedups import compile_layers, compiled_layers

    layers = torch._dynamo.config.recompile_limit + 4
    eager = tiny_llama(64, hidden=32, layers=layers)
    compiled = tiny_llama(64, hidden=32, layers=layers)
    assert compile_layers(compiled) == compiled_layers(compiled) == layers
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    # One frame compiled once, for every layer (a layer whose guards failed would compile again,
    # or past the limit run eagerly): one graph, no breaks.
    assert (counters["frames"]["total"], counters["frames"]["ok"]) == (1, 1), dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)
