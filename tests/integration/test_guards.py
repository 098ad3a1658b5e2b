"""The guard: non-finite steps never reach the weights, spikes are handled, stops are clean."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli, read_jsonl, train_args
from lmdistill.config import Config
from lmdistill.core.errors import TrainingStopped
from lmdistill.training.checkpoint import load_checkpoint
from lmdistill.training.trainer import train

SMALL_STUDENT = {
    "num_hidden_layers": 1,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
FAULT_STEP = 5


def _config(out: Path, teacher_dir, text_file, **sections) -> Config:
    cfg = Config()
    cfg.run.output_dir, cfg.run.device = str(out), "cpu"
    cfg.model.teacher, cfg.model.student_config = str(teacher_dir), dict(SMALL_STUDENT)
    cfg.data.path, cfg.data.block_size, cfg.data.max_eval_blocks = str(text_file), 32, 8
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.eval_every = 2, 9, 100
    cfg.checkpoint.every, cfg.checkpoint.keep = 1, 100
    for section, values in sections.items():
        for key, value in values.items():
            cfg.set(f"{section}.{key}", value)
    return cfg.validate()


def _assert_states_equal(a, b, where="state"):
    """Bit-identical nested state: tensors by torch.equal, dicts by key, lists element by element."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_states_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_state_comparison_sees_inside_lists():
    """The helper above must fail on a difference anywhere, lists of tensors and numbers included."""
    same = {"w": torch.ones(2), "groups": [torch.zeros(1), 3, {"lr": 0.1}]}
    _assert_states_equal(same, {"w": torch.ones(2), "groups": [torch.zeros(1), 3, {"lr": 0.1}]})
    for other in (
        {"w": torch.ones(2), "groups": [torch.ones(1), 3, {"lr": 0.1}]},
        {"w": torch.ones(2), "groups": [torch.zeros(1), 4, {"lr": 0.1}]},
        {"w": torch.ones(2), "groups": [torch.zeros(1), 3, {"lr": 0.2}]},
    ):
        with pytest.raises(AssertionError):
            _assert_states_equal(same, other)


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("where", ["teacher_logits", "student_logits", "loss", "grad"])
def test_injected_fault_skips_the_step_and_leaves_state_untouched(
    tmp_path, teacher_dir, text_file, where, value, precision
):
    out = tmp_path / "run"
    cfg = _config(
        out,
        teacher_dir,
        text_file,
        run={"mixed_precision": precision},
        debug={"inject": [{"step": FAULT_STEP, "where": where, "value": value}]},
    )
    result = train(cfg, progress=False, print_summary=False)
    assert result.status == "finished"
    records = read_jsonl(out / "metrics.jsonl")
    skipped = [r for r in records if r.get("skipped")]
    expected_term = {"teacher_logits": "teacher_logits", "student_logits": "kd", "loss": "loss", "grad": "grad"}[where]
    assert [(r["step"], r["reason"]) for r in skipped] == [(FAULT_STEP, f"nonfinite:{expected_term}")]
    assert any(r.get("health") == "nonfinite" and r["step"] == FAULT_STEP for r in records)
    # Checkpoint step-K holds the state before step K ran; step-(K+1) the state after it.
    before = load_checkpoint(out / "checkpoints" / f"step-{FAULT_STEP}")
    after = load_checkpoint(out / "checkpoints" / f"step-{FAULT_STEP + 1}")
    _assert_states_equal(before.model_state, after.model_state)
    _assert_states_equal(before.optimizer_state["state"], after.optimizer_state["state"])
    # ... and the steps around it did update the weights.
    later = load_checkpoint(out / "checkpoints" / f"step-{FAULT_STEP + 2}")
    assert any(not torch.equal(after.model_state[k], later.model_state[k]) for k in after.model_state)
    assert all(torch.isfinite(t).all() for t in later.model_state.values())
    health = yaml.safe_load((out / "health.json").read_text())
    assert health["verdict"] == "attention" and "nonfinite" in health["fired"]


def test_masked_teacher_vocabulary_is_not_a_fault(tmp_path, teacher_dir, text_file):
    """-inf teacher logits are masked entries, not a broken teacher: the step goes through."""
    out = tmp_path / "run"
    cfg = _config(
        out,
        teacher_dir,
        text_file,
        debug={"inject": [{"step": FAULT_STEP, "where": "teacher_logits", "value": "-inf"}]},
    )
    train(cfg, progress=False, print_summary=False)
    records = read_jsonl(out / "metrics.jsonl")
    assert not [r for r in records if r.get("skipped")]
    step = next(r for r in records if r.get("step") == FAULT_STEP and "loss" in r)
    assert math.isfinite(step["loss"])


def test_consecutive_faults_stop_with_exit_code_3_and_name_the_teacher(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    faults = ", ".join(f"{{step: {s}, where: teacher_logits, value: nan}}" for s in range(3, 12))
    inject = ("--set", f"debug.inject=[{faults}]", "--set", "checkpoint.every=2")
    student = f"model.student_config={SMALL_STUDENT}"
    proc = cli(
        *train_args(
            teacher_dir,
            text_file,
            out,
            *inject,
            batch_size=2,
            steps=20,
            eval_every=None,
            max_eval_blocks=None,
            student=student,
        )
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "5 consecutive skipped steps" in proc.stderr and "teacher" in proc.stderr
    assert "fault injection is ON" in proc.stdout + proc.stderr
    skipped = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r.get("skipped")]
    assert skipped == [3, 4, 5, 6, 7]
    run = yaml.safe_load((out / "run.json").read_text())
    assert run["status"] == "stopped"
    # The last good state is kept: the checkpoint of step 2 (before the first fault) loads and is finite.
    last = load_checkpoint(out / "checkpoints" / "step-2")
    assert all(torch.isfinite(t).all() for t in last.model_state.values())
    assert (out / "health.json").exists() and (out / "report.md").exists()


def test_spike_rollback(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    cfg = _config(
        out,
        teacher_dir,
        text_file,
        train={"max_steps": 24},
        guard={"spike": "rollback", "spike_warmup": 6, "rollback_interval": 4, "rollback_keep": 2},
        debug={"loss_multiplier": {18: 20.0}},
    )
    result = train(cfg, progress=False, print_summary=False)
    records = read_jsonl(out / "metrics.jsonl")
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    # Snapshots are kept every 4 steps: the spike at step 18 goes back to the state after 16 steps.
    assert [(r["step"], r["to_step"]) for r in rollbacks] == [(18, 16)]
    assert rollbacks[0]["lr_scale"] == pytest.approx(0.5)
    assert [r["step"] for r in records if r.get("skipped")] == [18]
    assert any(r.get("health") == "loss_spike" for r in records)
    assert result.status == "finished"
    final = load_checkpoint(out / "checkpoints" / "step-24")
    assert all(torch.isfinite(t).all() for t in final.model_state.values())
    # After the spike step the weights are those of step 16: steps 16 and 17 were undone.
    at_16 = load_checkpoint(out / "checkpoints" / "step-16")
    after_spike = load_checkpoint(out / "checkpoints" / "step-19")
    _assert_states_equal(at_16.model_state, after_spike.model_state)
    _assert_states_equal(at_16.optimizer_state["state"], after_spike.optimizer_state["state"])


def test_too_many_rollbacks_stop(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    cfg = _config(
        out,
        teacher_dir,
        text_file,
        train={"max_steps": 30},
        guard={"spike": "rollback", "spike_warmup": 6, "rollback_interval": 2, "max_rollbacks": 1},
        debug={"loss_multiplier": {12: 20.0, 16: 20.0}},
    )
    with pytest.raises(TrainingStopped, match="rollbacks"):
        train(cfg, progress=False, print_summary=False)
    assert yaml.safe_load((out / "run.json").read_text())["status"] == "stopped"


def test_same_seed_same_decisions(tmp_path, teacher_dir, text_file):
    def decisions(name):
        out = tmp_path / name
        cfg = _config(
            out,
            teacher_dir,
            text_file,
            train={"max_steps": 20},
            guard={"spike": "skip", "spike_warmup": 6},
            debug={"loss_multiplier": {10: 20.0, 14: 20.0}},
        )
        train(cfg, progress=False, print_summary=False)
        return [
            (r["step"], r.get("reason"), r.get("health"))
            for r in read_jsonl(out / "metrics.jsonl")
            if r.get("skipped") or "health" in r
        ]

    first = decisions("a")
    assert first == decisions("b")
    assert [s for s, reason, _ in first if reason == "spike"] == [10, 14]


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", sorted(p.name for p in (Path(__file__).parents[2] / "configs").glob("replay-*.yaml"))
)
def test_seed_replay_presets_stay_finite_and_learn(tmp_path, teacher_dir, text_file, preset):
    """The original report's failing settings (T=3 -> 2 with T^2, and T=5, T=10; fp32 and bf16), shortened."""
    out = tmp_path / "run"
    config = ("--config", str(Path(__file__).parents[2] / "configs" / preset))
    student = f"model.student_config={SMALL_STUDENT}"
    proc = cli(
        *train_args(
            teacher_dir,
            text_file,
            out,
            *config,
            steps=30,
            eval_every=15,
            block_size=64,
            max_eval_blocks=16,
            student=student,
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert not [r for r in records if r.get("skipped")]
    for r in records:
        for key, value in r.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, r)
    evals = [r["eval_ppl"] for r in records if "eval_ppl" in r]
    assert evals[-1] < evals[0]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    train_lines = [r for r in records if "temperature" in r]
    assert train_lines[0]["temperature"] == pytest.approx(cfg["distill"]["temperature"])


def test_lasting_spikes_under_skip_stop_the_run(tmp_path, teacher_dir, text_file):
    """guard.spike=skip counts its skips: a loss that stays high stops the run instead of skipping forever."""
    out = tmp_path / "run"
    cfg = _config(
        out,
        teacher_dir,
        text_file,
        train={"max_steps": 30},
        guard={"spike": "skip", "spike_warmup": 6},
        debug={"loss_multiplier": dict.fromkeys(range(12, 30), 20.0)},
    )
    with pytest.raises(TrainingStopped, match="5 consecutive skipped steps: loss spikes"):
        train(cfg, progress=False, print_summary=False)
    skipped = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r.get("skipped")]
    assert skipped == [12, 13, 14, 15, 16]
