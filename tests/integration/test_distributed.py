"""Data-parallel distillation on the CPU: 2 processes (gloo) against 1 process, same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cli, launch, one_error_line, read_jsonl, run_cli, train_args

pytestmark = pytest.mark.slow


def _common(teacher_dir, text_file, out, batch_size):
    return train_args(
        teacher_dir,
        text_file,
        out,
        "--set",
        "checkpoint.every=4",
        # the student is cut out of the teacher (the default) and trained with the hidden-state
        # term, whose projection is wrapped for data parallelism like the student
        "--set",
        "distill.hidden.weight=1.0",
        batch_size=batch_size,
        steps=8,
        eval_every=4,
    )


def _train_lines(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "skipped" not in r]


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory, teacher_dir, text_file):
    base = tmp_path_factory.mktemp("ddp")
    single = run_cli(*_common(teacher_dir, text_file, base / "single", 4))
    assert single.returncode == 0, single.stderr[-3000:]
    # A home with no data store yet: both ranks ask for one, one builds it, the other waits for it.
    ddp = launch(2, *_common(teacher_dir, text_file, base / "ddp", 2), home=base / "home")
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
            # AdamW divides by sqrt(v): where a gradient is ~0, the order of float sums can flip
            # its sign and move a weight by up to 2 lr per step. Measured: 2.9e-5 at one of 512
            # entries on an Intel Xeon (none above 1e-5 on the AMD EPYC these were first run on).
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4)
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


def _on_policy_args(teacher_dir, text_file, out, strategy):
    return (
        *_common(teacher_dir, text_file, out, 2),
        "--set",
        "debug.inject=[{step: 3, where: teacher_logits, value: nan, rank: 1}]",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=20",
        "--set",
        "distill.hidden.weight=0",
        "--set",
        "distill.on_policy.fraction=0.5",
        "--set",
        "distill.on_policy.prompt_tokens=8",
        "--set",
        "distill.on_policy.max_new_tokens=6",
        "--seed",
        "5",
        "--set",
        f"parallel.strategy={strategy}",
    )


@pytest.fixture(scope="module")
def on_policy_ddp(tmp_path_factory, teacher_dir, text_file):
    out = tmp_path_factory.mktemp("on-policy") / "ddp"
    proc = launch(2, *_on_policy_args(teacher_dir, text_file, out, "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_nan_on_one_rank_makes_every_rank_skip(on_policy_ddp):
    """Also with on-policy steps: each rank writes continuations of its own prompts, and all take
    the same on-policy steps (a rank that disagreed would hang the gradient all-reduce)."""
    from lmdistill.teacher.onpolicy import is_on_policy

    out = on_policy_ddp
    lines = read_jsonl(out / "metrics.jsonl")
    skipped = [(r["step"], r["reason"]) for r in lines if r.get("skipped")]
    assert skipped == [(3, "nonfinite:teacher_logits")]
    steps = [r for r in lines if "loss" in r]
    assert [r["on_policy"] for r in steps] == [is_on_policy(5, s, 0.5) for s in range(8)]
    on = [r for r in steps if r["on_policy"]]
    assert on and all(r["mean_generated_length"] == pytest.approx(r["generated_tokens"] / 4) for r in on)
    assert all(6 < r["generated_tokens"] <= 4 * 6 for r in on)  # both ranks' rows are counted
    from lmdistill.training.checkpoint import load_checkpoint

    before, after = load_checkpoint(out / "checkpoints" / "step-3"), load_checkpoint(out / "checkpoints" / "step-4")
    assert all(torch.equal(before.model_state[k], after.model_state[k]) for k in before.model_state)


def test_on_policy_steps_under_fsdp_match_ddp(on_policy_ddp, tmp_path, teacher_dir, text_file):
    """The sharded student generates with both processes in step (each for its own prompts), and
    is judged at every evaluation on both: the same continuations as under DDP, hence the same
    per-step values and teacher-judged scores, to float precision."""
    out = tmp_path / "fsdp"
    proc = launch(2, *_on_policy_args(teacher_dir, text_file, out, "fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [r for r in read_jsonl(on_policy_ddp / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r.get("on_policy"), r.get("skipped")) for r in b] == [
        (r["step"], r.get("on_policy"), r.get("skipped")) for r in a
    ]
    for x, y in zip(a, b):
        assert y.get("generated_tokens") == x.get("generated_tokens"), x["step"]
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            if key in x and not x.get("skipped"):
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    ea = [r for r in read_jsonl(on_policy_ddp / "metrics.jsonl") if "gen_teacher_nll" in r]
    eb = [r for r in read_jsonl(out / "metrics.jsonl") if "gen_teacher_nll" in r]
    assert len(eb) == len(ea) == 3
    for x, y in zip(ea, eb):
        assert y["gen_samples"] == x["gen_samples"]
        assert y["gen_teacher_nll"] == pytest.approx(x["gen_teacher_nll"], rel=1e-5)


def test_sharded_processes_that_stop_writing_at_different_times_stay_in_step(tmp_path):
    """Rank 0 writes 1 token, rank 1 all 8: the sharded student keeps both in step (a process
    done early goes on joining the others' gathers) and each writes the unsharded tokens."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).with_name("sharded_generation.py")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(script),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["written"] for r in results] == [1, 8] and all(r["same_as_unsharded"] for r in results)


# ---------------------------------------------------------------------------------------------
# DDP and FSDP through a kill, against one process. Every run below: hidden term off, a NaN from
# the teacher at step 2 (on rank 1 only, in the 2-process runs), a checkpoint after every step.


def _kill_args(teacher_dir, text_file, out, batch_size, *extra, nan_rank=""):
    return (
        *_common(teacher_dir, text_file, out, batch_size),
        "--set",
        "distill.hidden.weight=0",
        "--set",
        f"debug.inject=[{{step: 2, where: teacher_logits, value: nan{nan_rank}}}]",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=20",
        *extra,
    )


def _rewound(run_dir, to_step, dest):
    """A copy of killed run ``run_dir`` as if it had been killed right after ``to_step``: its later
    checkpoints removed (writing a checkpoint never changes the run, so nothing else differs)."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > to_step:
            shutil.rmtree(ckpt)
    return dest


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, teacher_dir, text_file):
    """One process x batch 4, uninterrupted; DDP and FSDP, 2 ranks x batch 2, each killed after
    step 6, then a copy of each resumed from its step-4 checkpoint, so that steps 5 and 6 exist
    twice: run straight through, and run after a resume."""
    base = tmp_path_factory.mktemp("killed")
    single = run_cli(*_kill_args(teacher_dir, text_file, base / "single", 4))
    assert single.returncode == 0, single.stderr[-3000:]
    runs = {"single": base / "single"}
    for strategy in ("ddp", "fsdp"):
        killed, resumed = base / strategy, base / f"{strategy}-resumed"
        # FSDP takes the chunked loss, which multiplies by the root's lm_head outside the forward;
        # the others the full logits (auto, at this size)
        strategy_arg = (
            "--set",
            f"parallel.strategy={strategy}",
            "--set",
            "loss.impl=chunked" if strategy == "fsdp" else "loss.impl=auto",
        )
        first = launch(
            2,
            *_kill_args(teacher_dir, text_file, killed, 2, *strategy_arg, nan_rank=", rank: 1"),
            "--set",
            "debug.exit_after_step=6",
        )
        assert first.returncode != 0 and (killed / "checkpoints" / "step-6").is_dir(), first.stderr[-3000:]
        assert not (killed / "student").exists()
        _rewound(killed, 4, resumed)
        again = launch(
            2,
            *_kill_args(teacher_dir, text_file, resumed, 2, *strategy_arg, nan_rank=", rank: 1"),
            "--set",
            "debug.exit_after_step=null",
            "--resume",
        )  # (the saved config has the drill)
        assert again.returncode == 0 and "from step-4" in again.stdout, again.stderr[-3000:]
        runs[strategy], runs[f"{strategy}-resumed"] = killed, resumed
    return runs


def _checkpoint_tensors(run_dir, step) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint step-N, weights and AdamW state, read with torch's own tools
    (safetensors and torch.load for one file, DCP's converter for shards) as flat name -> tensor."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = run_dir / "checkpoints" / f"step-{step}"
    if (path / "model.safetensors").is_file():
        state = {
            "model": load_file(path / "model.safetensors"),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True)["state"],
        }
    else:
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, Path(tmp) / "whole.pt")
            state = torch.load(Path(tmp) / "whole.pt", weights_only=False)
        state["optimizer"] = state["optimizer"]["state"]
    return dict(_flat(state))


def _flat(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flat(value, f"{prefix}/{key}")


_TIMING = {"tokens_per_s"}


def test_kill_and_resume_is_bit_exact(killed_runs):
    """Steps 5 and 6 after a resume from step 4 equal the same steps run straight through: every
    logged value, and every weight and AdamW tensor of the step-6 checkpoint, bit for bit."""
    for strategy in ("ddp", "fsdp"):
        straight, resumed = killed_runs[strategy], killed_runs[f"{strategy}-resumed"]
        a = {r["step"]: r for r in _train_lines(straight)}
        b = {r["step"]: r for r in _train_lines(resumed)}
        for step in (4, 5):  # (steps count from 0 in metrics.jsonl: the 5th and 6th)
            assert {k: v for k, v in b[step].items() if k not in _TIMING} == {
                k: v for k, v in a[step].items() if k not in _TIMING
            }, (strategy, step)
        want, got = _checkpoint_tensors(straight, 6), _checkpoint_tensors(resumed, 6)
        assert want.keys() == got.keys() and len(want) > 10, strategy
        assert all(torch.equal(want[k], got[k]) for k in want), strategy


def _eval_ppl(run_dir):
    return [r["eval_ppl"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_ppl" in r]


def _assert_close_runs(got, want, losses=("loss", "kd_loss", "ce_loss", "grad_norm")):
    """Same steps taken and skipped, per-step values within 1e-5, held-out perplexities within
    1e-5, final checkpoint weights within 1e-4 (float sums in another order: documented)."""
    for run in (got, want):
        skipped = [(r["step"], r["reason"]) for r in read_jsonl(run / "metrics.jsonl") if r.get("skipped")]
        assert skipped == [(2, "nonfinite:teacher_logits")], run
    a, b = _train_lines(want), _train_lines(got)
    assert [r["step"] for r in b] == [0, 1, 3, 4, 5, 6, 7] == [r["step"] for r in a]
    for x, y in zip(a, b):
        for key in losses:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    assert _eval_ppl(got) == pytest.approx(_eval_ppl(want), rel=1e-5) and len(_eval_ppl(want)) == 3
    wa = {k: v for k, v in _checkpoint_tensors(want, 8).items() if k.startswith("/model/")}
    wb = {k: v for k, v in _checkpoint_tensors(got, 8).items() if k.startswith("/model/")}
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)


def test_fsdp_matches_one_process_and_ddp(killed_runs):
    """FSDP2 (gloo, 2 ranks x batch 2, the chunked loss multiplying by the root's lm_head outside
    the model's forward) against 1 process x batch 4 and against DDP over the same steps; the
    final student, gathered from the shards into an ordinary directory, loads and matches."""
    from transformers import AutoModelForCausalLM

    fsdp = killed_runs["fsdp-resumed"]
    _assert_close_runs(fsdp, killed_runs["single"])
    _assert_close_runs(fsdp, killed_runs["ddp-resumed"])
    assert json.loads((fsdp / "run.json").read_text())["plan"]["strategy"] == "fsdp"
    want = AutoModelForCausalLM.from_pretrained(killed_runs["single"] / "student").state_dict()
    got = AutoModelForCausalLM.from_pretrained(fsdp / "student").state_dict()
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_fsdp_checkpoints_are_shards_and_a_skipped_step_changes_nothing(killed_runs):
    fsdp = killed_runs["fsdp"]
    step6 = fsdp / "checkpoints" / "step-6"
    manifest = json.loads((step6 / "manifest.json").read_text())
    assert manifest["layout"] == "sharded" and manifest["format_version"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["files"])  # a file per rank
    assert not (step6 / "model.safetensors").exists() and not list((fsdp / "checkpoints").glob(".tmp-*"))
    # The NaN on rank 1 at step 2 (the third): every rank skipped it, no weight or AdamW tensor moved.
    before, after = _checkpoint_tensors(fsdp, 2), _checkpoint_tensors(fsdp, 3)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sharded_checkpoint_exports_to_the_gathered_student(killed_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    fsdp = killed_runs["fsdp-resumed"]
    done = cli("export", str(fsdp / "checkpoints" / "step-8"), str(tmp_path / "exported"))
    assert done.returncode == 0, done.stderr
    want = AutoModelForCausalLM.from_pretrained(fsdp / "student").state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("strategy, newest_file", [("fsdp", "__1_0.distcp"), ("ddp", "model.safetensors")])
def test_a_two_process_run_resumes_in_one_process(killed_runs, tmp_path, teacher_dir, text_file, strategy, newest_file):
    """2 ranks x batch 2 continue as 1 process x batch 4: the same global batch, hence the same
    data order (DCP reshards FSDP's shards into one unsharded process). The newest checkpoint has
    a corrupt file: the resume falls back to the one before, naming it."""
    copy = _rewound(killed_runs[strategy], 6, tmp_path / "one")
    damaged = copy / "checkpoints" / "step-6" / newest_file
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    args = _kill_args(
        teacher_dir,
        text_file,
        copy,
        4,
        "--set",
        "parallel.strategy=ddp",
        "--set",
        "debug.exit_after_step=null",
        "--resume",
    )
    before = _tree(copy)
    wrong = cli(*_kill_args(teacher_dir, text_file, copy, 2, "--set", "parallel.strategy=ddp", "--resume"))
    one_error_line(wrong, "global batch of 4", "--batch-size 4")
    assert _tree(copy) == before  # refused before anything was written
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert newest_file in resumed.stdout and "from step-5" in resumed.stdout
    # Another count (and strategy) with the same global batch is a note, not a "will not match" warning.
    assert "note: resuming on 1 process(es) x batch 4 with parallel.strategy = ddp" in resumed.stdout
    assert not any("train.batch_size" in line for line in resumed.stdout.splitlines() if "warning" in line)
    _assert_close_runs(copy, killed_runs["single"])


def test_fsdp_refuses_one_process(tmp_path, teacher_dir, text_file):
    one = run_cli(*_kill_args(teacher_dir, text_file, tmp_path / "one", 2, "--set", "parallel.strategy=fsdp"))
    one_error_line(one, "torchrun --nproc_per_node")
    assert not (tmp_path / "one").exists()


def _tree(run_dir) -> dict[str, bytes]:
    """Every file of a run directory with its content (the lock file, which records the pid of
    whoever holds it, aside)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lmdistill.lock"
    }


# ---------------------------------------------------------------------------------------------
# A process of the run dies: the other one stops with one line, and the run is recorded as failed.


def _rank_output(logs, rank: int) -> str:
    """What the process of local rank ``rank`` wrote, stdout then stderr (torchrun --redirects 3)."""
    (folder,) = {p.parent for p in logs.rglob(f"attempt_*/{rank}/stderr.log")}
    return (folder / "stdout.log").read_text() + (folder / "stderr.log").read_text()


@pytest.mark.parametrize("dead, strategy", [(1, "ddp"), (0, "ddp"), (0, "fsdp")])
def test_a_dead_process_stops_the_other_with_one_line(tmp_path, teacher_dir, text_file, dead, strategy):
    """One rank ends abruptly after step 3 (and its checkpoint); the survivor finds it gone in its
    next collective, and perhaps gets the launcher's SIGTERM too: one line naming the dead rank and
    --resume, no traceback, a failed run.json (written by rank 1 when rank 0 is the one that died),
    no staging directory left."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = launch(
        2,
        *_common(teacher_dir, text_file, out, 2),
        "--set",
        "distill.hidden.weight=0",
        "--set",
        "checkpoint.every=1",
        "--set",
        "debug.exit_after_step=3",
        "--set",
        f"debug.exit_rank={dead}",
        "--set",
        f"parallel.strategy={strategy}",
        logs=logs,
    )
    assert proc.returncode != 0
    survivor = _rank_output(logs, 1 - dead)
    lines = [line for line in survivor.splitlines() if line.startswith("lmdistill: error:")]
    assert len(lines) == 1 and "Traceback" not in survivor, survivor[-3000:]
    assert f"process of rank {dead} " in lines[0] and "--resume" in lines[0], lines[0]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and f"rank {dead}" in run["exit_reason"], run
    assert (out / "checkpoints" / "step-3").is_dir() and not list((out / "checkpoints").glob(".tmp-*"))
