"""End to end through the CLI on tiny real models: what a user's first run must give."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import cli, read_jsonl, train_args

TRAIN_KEYS = {
    "step",
    "epoch",
    "temperature",
    "lr",
    "loss",
    "kd_loss",
    "kd_loss_unscaled",
    "ce_loss",
    "grad_norm",
    "tokens_per_s",
}
EVAL_KEYS = {"step", "eval_ce_loss", "eval_ppl", "eval_kd_loss", "teacher_ppl"}


def _file_digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory, teacher_dir, text_file):
    out = tmp_path_factory.mktemp("e2e") / "run"
    teacher_files_before = _file_digests(teacher_dir)
    student = (
        "model.student_config={num_hidden_layers: 1, "
        "hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, num_key_value_heads: 2}"
    )
    proc = cli(
        *train_args(
            teacher_dir,
            text_file,
            out,
            "--lr",
            "3e-3",
            steps=40,
            eval_every=10,
            block_size=64,
            max_eval_blocks=None,
            student=student,
        )
    )
    return proc, out, teacher_files_before


def test_run_succeeds_and_prints_summary(e2e_run):
    proc, out, _ = e2e_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for label in ("teacher", "student before", "student after", "run directory:"):
        assert label in proc.stdout


def test_metrics_have_contract_keys_and_are_finite(e2e_run):
    _, out, _ = e2e_run
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r and "skipped" not in r]
    evals = [r for r in records if "eval_ce_loss" in r]
    assert len(train) == 40
    assert [r["step"] for r in train] == list(range(40))
    for r in train:
        assert set(r) >= TRAIN_KEYS, TRAIN_KEYS - set(r)
        assert all(math.isfinite(r[k]) for k in TRAIN_KEYS - {"step", "epoch"})
        # KD is logged with and without T^2; the total mixes them as configured (kd_weight 0.5).
        assert r["kd_loss"] == pytest.approx(r["kd_loss_unscaled"] * r["temperature"] ** 2, rel=1e-5)
        assert r["loss"] == pytest.approx(0.5 * r["kd_loss"] + 0.5 * r["ce_loss"], rel=1e-5)
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    for r in evals:
        assert set(r) >= EVAL_KEYS
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_ce_loss"]), rel=1e-9)  # never exp(total loss)
    # The temperature anneals linearly from 2.0 to 1.5 over the 40 steps.
    assert train[0]["temperature"] == pytest.approx(2.0)
    assert train[20]["temperature"] == pytest.approx(1.75)


def test_student_perplexity_falls(e2e_run):
    _, out, _ = e2e_run
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_ce_loss" in r]
    # The student is cut out of the teacher (model.student_init: auto): it starts well below a
    # uniform guess over the 384 tokens, and training still takes a quarter off its perplexity.
    assert evals[0]["eval_ppl"] < 384
    assert evals[-1]["eval_ppl"] < 0.75 * evals[0]["eval_ppl"]
    assert evals[-1]["eval_kd_loss"] < evals[0]["eval_kd_loss"]


def test_student_directory_loads_with_transformers(e2e_run, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = e2e_run
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    ids = tok(text_file.read_text()[:400], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] >= len(tok)
    assert torch.isfinite(logits).all()
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32


def test_teacher_is_bit_identical_after_training(e2e_run, teacher_dir):
    _, _, before = e2e_run
    assert _file_digests(teacher_dir) == before


def test_run_directory_contract(e2e_run):
    _, out, _ = e2e_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 40 and cfg["distill"]["temperature"] == 2.0
    assert set(cfg) >= {"run", "model", "data", "distill", "train", "guard", "health", "checkpoint"}
    health = json.loads((out / "health.json").read_text())
    assert {c["name"] for c in health["checks"]} == {
        "start_loss",
        "loss_spike",
        "nonfinite",
        "eval_ppl",
        "loss_plateau",
        "teacher_ppl",
    }
    assert health["verdict"] in ("healthy", "attention")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished"
    last_eval = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_ce_loss" in r][-1]
    assert run["final"]["eval_ppl"] == last_eval["eval_ppl"]


def test_finished_run_directory_is_not_overwritten(e2e_run, teacher_dir, text_file):
    _, out, _ = e2e_run
    weights = load_file(out / "student" / "model.safetensors")
    proc = cli(
        "train",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(text_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--no-progress",
    )
    assert proc.returncode == 2
    assert "already holds a finished run" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = load_file(out / "student" / "model.safetensors")
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_tensorboard_holds_every_metric(e2e_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = e2e_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/kd_loss",
        "train/kd_loss_unscaled",
        "train/ce_loss",
        "train/grad_norm",
        "schedule/temperature",
        "schedule/lr",
        "speed/tokens_per_s",
        "eval/eval_ppl",
        "eval/eval_ce_loss",
        "eval/teacher_ppl",
        "eval/top1_agreement",
    ):
        assert tag in tags, tag
    losses = [e.value for e in acc.Scalars("train/loss")]
    logged = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx(logged, rel=1e-6)


def test_report_and_plots_match_metrics(e2e_run):
    import re

    import matplotlib.image as mpimg

    _, out, _ = e2e_run
    report = (out / "report.md").read_text()
    last = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_ce_loss" in r][-1]
    assert f"{last['eval_ppl']:.4g}" in report and f"{last['teacher_ppl']:.4g}" in report
    assert f"{last['eval_ce_loss']:.4f}" in report
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"losses.png", "schedule.png", "grad_norm.png", "perplexity.png", "throughput.png"}
    for png in pngs:
        image = mpimg.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0.05  # not a blank canvas
        assert png.name in report
    assert re.search(r"Verdict: (healthy|attention)", report)


def test_report_command_compares_two_runs(e2e_run, teacher_dir):
    _, out, _ = e2e_run
    other = teacher_dir.parent  # the teacher's own pretraining run (plain LM training)
    proc = cli("report", str(out), str(other))
    assert proc.returncode == 0, proc.stderr[-2000:]
    comparison = next(line for line in proc.stdout.splitlines() if line.strip().endswith(".md"))
    text = Path(comparison.split()[-1]).read_text()
    assert out.name in text and other.name in text


def test_eval_command_on_the_run(e2e_run, text_file, teacher_dir):
    _, out, _ = e2e_run
    proc = cli(
        "eval",
        str(out),
        "--data",
        str(text_file),
        "--teacher",
        str(teacher_dir),
        "--block-size",
        "64",
        "--max-blocks",
        "8",
        "--no-progress",
        "--json",
        str(out.parent / "eval.json"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out.parent / "eval.json").read_text())
    assert result["eval_tokens"] == 8 * 63  # 8 packed blocks of 64 tokens: 63 targets each
    assert result["eval_ppl"] == pytest.approx(math.exp(result["eval_ce_loss"]), rel=1e-12)
    assert result["teacher_ppl"] == pytest.approx(math.exp(result["teacher_ce_loss"]), rel=1e-12)
    assert result["eval_kl"] > 0 and 0 < result["top1_agreement"] < 1
    # what is printed is what was measured
    assert f"perplexity {result['eval_ppl']:.4g}  (CE {result['eval_ce_loss']:.4f} nats/token)" in proc.stdout
    assert f"top-1 agreement {result['top1_agreement']:.1%}" in proc.stdout
    assert 0 < result["draft_acceptance"] < 1
    assert f"expected acceptance {result['draft_acceptance']:.1%} per token" in proc.stdout


def test_export_a_checkpoint(e2e_run, tmp_path):
    from transformers import AutoModelForCausalLM

    _, out, _ = e2e_run
    proc = cli("export", str(out / "checkpoints" / "step-40"), str(tmp_path / "exported"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    final = AutoModelForCausalLM.from_pretrained(out / "student")
    for (name, a), (_, b) in zip(exported.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "exported" / "tokenizer.json").exists()
