"""Data-parallel distillation on the CPU: 2 processes (gloo) against 1 process, same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_jsonl, run_cli

pytestmark = pytest.mark.slow

STUDENT = ("model.student_config={num_hidden_layers: 1, hidden_size: 16, intermediate_size: 32, "
           "num_attention_heads: 2, num_key_value_heads: 2}")


def _launch(nproc: int, *args: str, home=None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m lmdistill ...``: N CPU processes over gloo, as documented.

    (``accelerate launch --cpu`` starts one process unless MPI is set up; torchrun needs nothing.)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    if home is not None:
        env["LMDISTILL_HOME"] = str(home)
    with socket.socket() as sock:  # a free port for every launch: a reused one may still be in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "lmdistill", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _common(teacher_dir, text_file, out, batch_size):
    return ("train", "--teacher", str(teacher_dir), "--data", str(text_file), "--output-dir", str(out),
            "--batch-size", str(batch_size), "--max-steps", "8", "--eval-every", "4", "--set", "data.block_size=32",
            "--set", STUDENT, "--set", "data.max_eval_blocks=8", "--set", "checkpoint.every=4", "--no-progress",
            # the student is cut out of the teacher (the default) and trained with the hidden-state
            # term, whose projection is wrapped for data parallelism like the student
            "--set", "distill.hidden.weight=1.0")


def _train_lines(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "skipped" not in r]


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory, teacher_dir, text_file):
    base = tmp_path_factory.mktemp("ddp")
    single = run_cli(*_common(teacher_dir, text_file, base / "single", 4))
    assert single.returncode == 0, single.stderr[-3000:]
    # A home with no data store yet: both ranks ask for one, one builds it, the other waits for it.
    ddp = _launch(2, *_common(teacher_dir, text_file, base / "ddp", 2), home=base / "home")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return base / "single", base / "ddp"


def test_two_ranks_build_one_store_and_both_map_it(single_and_ddp):
    home = single_and_ddp[1].parent / "home" / "stores"
    entries = sorted(p.name for p in home.iterdir())
    stores = [name for name in entries if (home / name / "manifest.json").is_file()]
    assert len(stores) == 1 and entries == [stores[0], stores[0] + ".lock"]  # no second copy, no leftovers
    run = json.loads((single_and_ddp[1] / "run.json").read_text())
    assert run["data"]["sources"][0]["store"] == str(home / stores[0])


def test_two_ranks_match_one_rank_with_the_same_global_batch(single_and_ddp):
    single, ddp = single_and_ddp
    a, b = _train_lines(single), _train_lines(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(8))
    for x, y in zip(a, b):
        # Same blocks, same global normaliser; only the order of float sums differs (documented: 1e-5).
        for key in ("loss", "kd_loss", "ce_loss", "hidden_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    for name in ("model.safetensors", "hidden_projection.safetensors"):
        wa = load_file(single / "checkpoints" / "step-8" / name)
        wb = load_file(ddp / "checkpoints" / "step-8" / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # Evaluation is sharded over the ranks and reduced: the same held-out numbers.
    ea = [r for r in read_jsonl(single / "metrics.jsonl") if "eval_ce_loss" in r]
    eb = [r for r in read_jsonl(ddp / "metrics.jsonl") if "eval_ce_loss" in r]
    assert [r["eval_tokens"] for r in ea] == [r["eval_tokens"] for r in eb]
    assert eb[0]["eval_ce_loss"] == pytest.approx(ea[0]["eval_ce_loss"], rel=1e-6)


def test_main_process_writes_alone(single_and_ddp):
    _, ddp = single_and_ddp
    lines = read_jsonl(ddp / "metrics.jsonl")
    assert len([r for r in lines if r.get("step") == 0 and "eval_ce_loss" in r]) == 1
    assert len(list((ddp / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_nan_on_one_rank_makes_every_rank_skip(tmp_path, teacher_dir, text_file):
    """Also with on-policy steps: each rank writes continuations of its own prompts, and all take
    the same on-policy steps (a rank that disagreed would hang the gradient all-reduce)."""
    from lmdistill.onpolicy import is_on_policy

    out = tmp_path / "ddp-nan"
    proc = _launch(2, *_common(teacher_dir, text_file, out, 2),
                   "--set", "debug.inject=[{step: 3, where: teacher_logits, value: nan, rank: 1}]",
                   "--set", "checkpoint.every=1", "--set", "checkpoint.keep=20", "--set", "distill.hidden.weight=0",
                   "--set", "distill.on_policy.fraction=0.5", "--set", "distill.on_policy.prompt_tokens=8",
                   "--set", "distill.on_policy.max_new_tokens=6", "--seed", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_jsonl(out / "metrics.jsonl")
    skipped = [(r["step"], r["reason"]) for r in lines if r.get("skipped")]
    assert skipped == [(3, "nonfinite:teacher_logits")]
    steps = [r for r in lines if "loss" in r]
    assert [r["on_policy"] for r in steps] == [is_on_policy(5, s, 0.5) for s in range(8)]
    on = [r for r in steps if r["on_policy"]]
    assert on and all(r["mean_generated_length"] == pytest.approx(r["generated_tokens"] / 4) for r in on)
    assert all(6 < r["generated_tokens"] <= 4 * 6 for r in on)  # both ranks' rows are counted
    from lmdistill.checkpoint import load_checkpoint

    before, after = load_checkpoint(out / "checkpoints" / "step-3"), load_checkpoint(out / "checkpoints" / "step-4")
    assert all(torch.equal(before.model_state[k], after.model_state[k]) for k in before.model_state)


def test_ddp_resume_after_kill(tmp_path, teacher_dir, text_file, single_and_ddp):
    _, reference = single_and_ddp
    out = tmp_path / "ddp-resume"
    first = _launch(2, *_common(teacher_dir, text_file, out, 2), "--set", "debug.exit_after_step=4")
    assert first.returncode != 0 and not (out / "student").exists()
    # A different number of processes is refused with a clear message: the data order depends on it.
    one = run_cli(*_common(teacher_dir, text_file, out, 4), "--resume")
    assert one.returncode == 2 and "same number of processes" in one.stderr
    resumed = _launch(2, *_common(teacher_dir, text_file, out, 2), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in _train_lines(out)] == [r["loss"] for r in _train_lines(reference)]
    for name in ("model.safetensors", "hidden_projection.safetensors"):
        wa = load_file(reference / "checkpoints" / "step-8" / name)
        wb = load_file(out / "checkpoints" / "step-8" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name



def _fsdp_args(teacher_dir, text_file, out, batch_size, *extra):
    return (*_common(teacher_dir, text_file, out, batch_size), "--set", "distill.hidden.weight=0", *extra)


def test_fsdp_on_two_ranks_matches_one_process_through_a_kill(tmp_path, teacher_dir, text_file):
    """FSDP2 (gloo, 2 ranks x batch 2) against 1 process x batch 4. The FSDP run computes the
    full-logits loss until it is killed after step 4, then resumes (the full checkpoint sharded
    again) with the chunked loss, which multiplies by the student's lm_head outside its forward.
    A NaN from the teacher on one rank at step 2 is skipped by every rank with the weights
    untouched. Per-step losses, gradient norms and held-out perplexities agree within 1e-5, and
    the final student (gathered into an ordinary model directory) and checkpoint within 1e-4."""
    from transformers import AutoModelForCausalLM

    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    nan_at_2 = "debug.inject=[{step: 2, where: teacher_logits, value: nan%s}]"
    one = run_cli(*_fsdp_args(teacher_dir, text_file, single, 4, "--set", nan_at_2 % ""))
    assert one.returncode == 0, one.stderr[-3000:]
    # Step 2's teacher gives NaN on rank 1 only: every rank must skip it, as the one process does.
    args = _fsdp_args(teacher_dir, text_file, fsdp, 2, "--set", "parallel.strategy=fsdp", "--set",
                      nan_at_2 % ", rank: 1", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=20")
    first = _launch(2, *args, "--set", "loss.impl=full", "--set", "debug.exit_after_step=4")
    assert first.returncode != 0 and (fsdp / "checkpoints" / "step-4").is_dir()
    resumed = _launch(2, *args, "--set", "loss.impl=chunked", "--set", "debug.exit_after_step=null", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in (single, fsdp):
        skipped = [(r["step"], r["reason"]) for r in read_jsonl(run / "metrics.jsonl") if r.get("skipped")]
        assert skipped == [(2, "nonfinite:teacher_logits")], run
    before, after = (load_file(fsdp / "checkpoints" / f"step-{n}" / "model.safetensors") for n in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed no weight
    a = [r for r in read_jsonl(single / "metrics.jsonl") if "loss" in r and not r.get("skipped")]
    b = [r for r in read_jsonl(fsdp / "metrics.jsonl") if "loss" in r and not r.get("skipped")]
    assert [r["step"] for r in b] == [0, 1, 3, 4, 5, 6, 7] == [r["step"] for r in a]
    for x, y in zip(a, b):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    ea = [r for r in read_jsonl(single / "metrics.jsonl") if "eval_ppl" in r]
    eb = [r for r in read_jsonl(fsdp / "metrics.jsonl") if "eval_ppl" in r]
    assert [r["eval_ppl"] for r in eb] == pytest.approx([r["eval_ppl"] for r in ea], rel=1e-5)
    want = AutoModelForCausalLM.from_pretrained(single / "student").state_dict()
    got = AutoModelForCausalLM.from_pretrained(fsdp / "student").state_dict()
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    wa = load_file(single / "checkpoints" / "step-8" / "model.safetensors")
    wb = load_file(fsdp / "checkpoints" / "step-8" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)


def test_fsdp_refuses_one_process_and_what_it_does_not_support(tmp_path, teacher_dir, text_file):
    one = run_cli(*_fsdp_args(teacher_dir, text_file, tmp_path / "one", 2, "--set", "parallel.strategy=fsdp"))
    assert one.returncode == 2 and "torchrun --nproc_per_node" in one.stderr and "Traceback" not in one.stderr
    assert not (tmp_path / "one").exists()
