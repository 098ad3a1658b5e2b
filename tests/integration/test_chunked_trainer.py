"""loss.impl = chunked in the trainer: the same run as the full-logits loss, without the logits."""

from __future__ import annotations

import pytest

from conftest import read_jsonl
from lmdistill.config import Config
from lmdistill.loss.divergences import REGISTRY
from lmdistill.teacher.signals import choose_loss_impl
from lmdistill.training.trainer import train


def _run(tmp_path, teacher_dir, text_file, impl, **extra):
    cfg = Config()
    cfg.run.output_dir, cfg.run.device = str(tmp_path / impl), "cpu"
    cfg.model.teacher = str(teacher_dir)
    cfg.model.student_config = {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    cfg.data.path, cfg.data.block_size, cfg.data.max_eval_blocks = str(text_file), 32, 8
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.grad_accum = 4, 12, 2
    cfg.loss.impl, cfg.loss.chunk_size = impl, 40  # 40 does not divide the 124 tokens of a micro-batch
    for key, value in extra.items():
        cfg.set(key, value)
    result = train(cfg.validate(), progress=False, print_summary=False)
    lines = [r for r in read_jsonl(tmp_path / impl / "metrics.jsonl") if "loss" in r]
    return result, lines


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_chunked_matches_full_step_by_step(tmp_path, teacher_dir, text_file, divergence):
    full_result, full = _run(tmp_path / "a", teacher_dir, text_file, "full", **{"distill.divergence": divergence})
    chunked_result, chunked = _run(
        tmp_path / "b", teacher_dir, text_file, "chunked", **{"distill.divergence": divergence}
    )
    assert len(full) == len(chunked) == 12
    # Same math, different summation order (chunks, hand-derived gradients): documented tolerance 1e-4 relative
    # over 12 AdamW steps (docs/performance.md).
    for a, b in zip(full, chunked):
        for key in ("loss", "kd_loss", "kd_loss_unscaled", "ce_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert chunked_result.final["eval_ce_loss"] == pytest.approx(full_result.final["eval_ce_loss"], rel=1e-4)


def test_auto_picks_chunked_only_for_large_logits(teacher_dir):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    kl, threshold = REGISTRY["forward_kl"], Config().loss.auto_threshold_mib
    assert choose_loss_impl("auto", kl, 128, 384, teacher, teacher, threshold) == "full"
    assert choose_loss_impl("auto", kl, 8 * 1024, 151_936, teacher, teacher, threshold) == "chunked"
    assert choose_loss_impl("full", kl, 8 * 1024, 151_936, teacher, teacher, threshold) == "full"


@pytest.mark.parametrize(("cpu_threshold", "expected"), [(1.0, "full"), (0.1, "chunked")])
def test_auto_on_the_cpu_switches_at_the_cpu_threshold(tmp_path, teacher_dir, text_file, cpu_threshold, expected):
    """On the CPU, auto takes chunked above loss.auto_cpu_threshold_mib (where chunked was measured
    the faster), far below the memory threshold; run.json records what the run resolved."""
    import json

    _run(tmp_path, teacher_dir, text_file, "auto", **{"loss.auto_cpu_threshold_mib": cpu_threshold})
    plan = json.loads((tmp_path / "auto" / "run.json").read_text())["plan"]
    logits_mib = 4 * 31 * plan["vocab_size"] * 4 * 2 / 2**20  # a micro-batch's fp32 logits, both models
    assert 0.1 < logits_mib < 1.0 < Config().loss.auto_threshold_mib
    assert plan["loss_impl"] == expected


def test_plain_lm_training_shapes_the_student_after_the_teacher_config(tmp_path, teacher_dir, text_file):
    """kd_weight 0 with a teacher and no student: the CE-only baseline of a KD run. The student is
    shaped after the teacher, the teacher never runs in a training step, and the held-out figures
    include the teacher's, for the comparison."""
    cfg = Config.load(
        None,
        [
            f"model.teacher={teacher_dir}",
            f"data.path={text_file}",
            f"run.output_dir={tmp_path}/r",
            "run.device=cpu",
            "distill.kd_weight=0",
            "data.block_size=32",
            "train.batch_size=2",
            "train.max_steps=3",
        ],
    )
    result = train(cfg, progress=False, print_summary=False)
    lines = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert all(r["kd_loss"] == 0 and r["loss"] == r["ce_loss"] for r in lines)
    assert result.final["teacher_ppl"] > 1 and 0 <= result.final["top1_agreement"] <= 1
    from transformers import AutoConfig

    teacher_cfg, student_cfg = AutoConfig.from_pretrained(teacher_dir), AutoConfig.from_pretrained(result.student_dir)
    assert student_cfg.num_hidden_layers == max(1, teacher_cfg.num_hidden_layers // 2)
    assert student_cfg.hidden_size == teacher_cfg.hidden_size // 2
