"""Inputs a hostile probe of the command line found trusted: a resume past --max-steps, crafted
checkpoints and teacher caches, a bidirectional model in eval, a cache from another teacher.

Each case: one line naming the problem and the fix, a non-zero exit, no traceback (``cli`` runs
``cli.main`` in this process), and nothing written that was refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_hostile import _args, _tree  # the same small runs as the first probe's tests

from conftest import cli, one_error_line


@pytest.fixture
def unfinished_run(tmp_path, teacher_dir, text_file) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4, made unfinished again (no student, running)."""
    out = tmp_path / "run"
    assert cli(*_args(teacher_dir, text_file, out, "--set", "checkpoint.every=2")).returncode == 0
    shutil.rmtree(out / "student")
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "status": "running"}))
    return out


def _rewrite(step_dir: Path, name: str, content: bytes | None) -> None:
    """Replace (or, with None, delete) a checkpoint file and record it in the manifest, as a crafted
    checkpoint would: every size and hash matches."""
    from lmdistill.core.files import file_record

    manifest = json.loads((step_dir / "manifest.json").read_text())
    if content is None:
        (step_dir / name).unlink(missing_ok=True)
        del manifest["files"][name]
    else:
        (step_dir / name).write_bytes(content)
        manifest["files"][name] = file_record(step_dir / name)
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- checkpoints
def test_resume_with_max_steps_below_the_checkpoint_is_refused_before_anything_is_written(
    unfinished_run, teacher_dir, text_file
):
    before = _tree(unfinished_run)
    one_error_line(
        cli(*_args(teacher_dir, text_file, unfinished_run, "--resume", steps=3)),
        "step-4 is at step 4, past this run's 3 steps",
        "--max-steps 4 or more",
    )
    assert _tree(unfinished_run) == before


def test_a_crafted_trainer_state_is_one_line_saying_it_is_damaged(unfinished_run, teacher_dir, text_file):
    step_dir = unfinished_run / "checkpoints" / "step-4"
    state = json.loads((step_dir / "trainer_state.json").read_text())

    def guard_with(**counters):
        return {**state, "guard": {**state["guard"], "counters": {**state["guard"]["counters"], **counters}}}

    for crafted, needle in (
        ({**state, "run": {**state["run"], "step": "abc"}}, "step is 'abc'"),
        ({**state, "data_cursor": {"micro_batches": -1}}, "micro_batches is -1"),
        ([1, 2], "a JSON list"),
        ({**state["run"], **state["data_cursor"]}, "its layout is an earlier lmdistill's"),
        ({**state, "guard": {"nonsense": 1}}, "guard or health state"),
        (guard_with(lr_scale=float("nan")), "lr_scale is nan"),
        (guard_with(lr_scale=-1.0), "lr_scale is -1.0"),
        (guard_with(rollbacks=-2), "rollbacks is -2"),
    ):
        _rewrite(step_dir, "trainer_state.json", json.dumps(crafted).encode())
        before = _tree(unfinished_run)
        one_error_line(
            cli(*_args(teacher_dir, text_file, unfinished_run, "--resume")),
            "trainer_state.json is damaged or was not written by lmdistill",
            needle,
            "resume from an older one",
        )
        assert _tree(unfinished_run) == before


def test_a_crafted_pickle_is_refused_without_suggesting_an_unsafe_load(
    unfinished_run, teacher_dir, text_file, tmp_path
):
    import argparse

    import torch

    step_dir = unfinished_run / "checkpoints" / "step-4"
    torch.save({"state": argparse.Namespace(evil=True)}, tmp_path / "crafted.pt")
    _rewrite(step_dir, "optimizer.pt", (tmp_path / "crafted.pt").read_bytes())
    line = one_error_line(
        cli(*_args(teacher_dir, text_file, unfinished_run, "--resume")),
        "optimizer.pt is not a checkpoint file lmdistill wrote",
        "was not loaded",
    )
    assert "weights_only" not in line


def test_a_crafted_optimizer_state_is_one_line_saying_it_is_damaged(unfinished_run, teacher_dir, text_file, tmp_path):
    import io

    import torch

    step_dir = unfinished_run / "checkpoints" / "step-4"
    state = torch.load(step_dir / "optimizer.pt", weights_only=True)

    def crafted(change):
        copy = {
            "state": {k: dict(v) for k, v in state["state"].items()},
            "param_groups": [dict(g) for g in state["param_groups"]],
        }
        change(copy)
        return copy

    def wrong_shape(s):  # the fused AdamW step dies of signal 11 on these (#37)
        s["state"][0]["exp_avg"] = torch.zeros(3)

    for bad, needle in (
        (crafted(wrong_shape), "exp_avg of parameter 0 has shape (3,)"),
        (crafted(lambda s: s["param_groups"][0].update(lr=float("nan"))), "lr nan"),
        (crafted(lambda s: s["param_groups"][0].update(betas=(2, 5))), "betas (2, 5)"),
        (torch.zeros(3), "a Tensor, not an optimizer state dict"),
    ):
        buffer = io.BytesIO()
        torch.save(bad, buffer)
        _rewrite(step_dir, "optimizer.pt", buffer.getvalue())
        before = _tree(unfinished_run)
        one_error_line(
            cli(*_args(teacher_dir, text_file, unfinished_run, "--resume")),
            "optimizer state is damaged or not lmdistill's",
            needle,
            "resume from an older one",
        )
        assert _tree(unfinished_run) == before


def test_a_crafted_rng_state_is_one_line_saying_it_is_damaged(unfinished_run, teacher_dir, text_file):
    import io

    import torch

    step_dir = unfinished_run / "checkpoints" / "step-4"
    state = torch.load(step_dir / "rng_state.pt", weights_only=True)
    for bad in ({**state, "numpy": {"a": 1}}, {**state, "python": 3}, {**state, "torch_cpu": torch.zeros(2)}):
        buffer = io.BytesIO()
        torch.save(bad, buffer)
        _rewrite(step_dir, "rng_state.pt", buffer.getvalue())
        before = _tree(unfinished_run)
        one_error_line(
            cli(*_args(teacher_dir, text_file, unfinished_run, "--resume")),
            "rng_state.pt is damaged or was not written by lmdistill",
            "resume from an older one",
        )
        assert _tree(unfinished_run) == before


def test_export_needs_no_optimizer_state(unfinished_run, tmp_path):
    from transformers import AutoModelForCausalLM

    step_dir = unfinished_run / "checkpoints" / "step-4"
    (step_dir / "optimizer.pt").unlink()  # deleted to save space: the manifest still lists it
    for target, out in ((step_dir, "deleted"), (unfinished_run, "deleted-from-run")):
        proc = cli("export", str(target), str(tmp_path / out))
        assert proc.returncode == 0 and "warning" not in proc.stdout, proc.stdout + proc.stderr
    _rewrite(step_dir, "optimizer.pt", None)  # never written
    proc = cli("export", str(unfinished_run), str(tmp_path / "unlisted"))
    assert proc.returncode == 0, proc.stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "unlisted")


def test_export_needs_only_the_weights_and_student_config(unfinished_run, tmp_path):
    step_dir = unfinished_run / "checkpoints" / "step-4"
    (step_dir / "rng_state.pt").unlink()  # #41
    _rewrite(step_dir, "trainer_state.json", None)  # #42
    for target, out in ((step_dir, "from-step"), (unfinished_run, "from-run")):
        proc = cli("export", str(target), str(tmp_path / out))
        assert proc.returncode == 0 and "warning" not in proc.stdout, proc.stdout + proc.stderr
    (step_dir / "model.safetensors").unlink()
    line = one_error_line(
        cli("export", str(step_dir), str(tmp_path / "no-weights")),
        "model.safetensors: missing",
        "export needs the checkpoint's weights and student_config.json",
    )
    assert "resume" not in line and "find_latest_valid" not in line


# --------------------------------------------------------------------------- eval
def test_eval_refuses_a_bidirectional_model_as_train_does(tmp_path, teacher_dir, tiny_tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(bert)
    tiny_tokenizer.save_pretrained(bert)
    one_error_line(cli("eval", str(bert), "--max-blocks", "2", "--no-progress"), "model", "not a causal language model")
    one_error_line(
        cli("eval", str(teacher_dir), "--teacher", str(bert), "--max-blocks", "2", "--no-progress"),
        "teacher",
        "not a causal language model",
    )


# --------------------------------------------------------------------------- the default teacher
@pytest.fixture
def tiny_default_recipe(tmp_path, monkeypatch, corpus_texts):
    """The embedded default teacher's recipe, shrunk to a pretraining of a few seconds."""
    import lmdistill.data.sources
    import lmdistill.default as default

    monkeypatch.setenv("LMDISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(
        default,
        "RECIPE",
        {
            "version": 1,
            "tokenizer": {"type": "byte-level BPE", "vocab_size": 300, "min_frequency": 2},
            "teacher": {
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "intermediate_size": 32,
                "max_position_embeddings": 64,
                "tie_word_embeddings": False,
            },
            "pretrain": {
                "block_size": 32,
                "batch_size": 8,
                "epochs": 1,
                "lr": 3e-3,
                "warmup_steps": 2,
                "seed": 1,
                "mixed_precision": "no",
            },
        },
    )
    for module in (default, lmdistill.data.sources):
        monkeypatch.setattr(module, "embedded_corpus_texts", lambda: corpus_texts[:3])
    return default


def test_an_interrupted_default_teacher_pretraining_continues_on_the_rerun(tiny_default_recipe, monkeypatch):
    import os
    import signal

    from lmdistill.training.interrupts import Interrupted
    from lmdistill.training.trainer import Trainer

    default = tiny_default_recipe
    dest = default.default_teacher_dir()
    abandoned = dest.parent / f".work-{dest.name}-999999999"  # an earlier version's, of a process long gone
    abandoned.mkdir(parents=True)
    steps: list[int] = []
    real_step = Trainer.train_step

    def ctrl_c_at_step_2(self, step):
        steps.append(step)
        if step == 2 and len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # seen at the end of this step: checkpoint step-3, then stop
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_at_step_2)
    with pytest.raises(Interrupted) as stopped:
        default.ensure_default_teacher(progress=False)
    assert "rerun the same command to continue the pretraining" in str(stopped.value)
    assert "--resume" not in str(stopped.value) and stopped.value.exit_code == 130
    work = dest.parent / f".work-{dest.name}"
    assert (work / "checkpoints" / "step-3").is_dir() and not abandoned.exists()

    steps.clear()
    assert default.ensure_default_teacher(progress=False) == dest
    assert steps[0] == 3 and len(steps) > 1  # continued, not started over
    assert (dest / "model.safetensors").is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted(
        [dest.name, f"{dest.name}-pretraining-run", f".{dest.name}.lock"]
    )  # no .work-* left
