"""The model card of a trained student (report/card.py): in the final student/ and in every
export, read back as the hub reads it; ``export --push-to-hub`` fails before writing anything
when the hub cannot be reached, and uploads the finished export when it can."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import cli, one_error_line
from forked import run_cli_forked


@pytest.fixture(scope="module")
def licensed_run(tmp_path_factory, teacher_dir, text_file):
    """A short run from a teacher whose README.md says its license."""
    base = tmp_path_factory.mktemp("card")
    teacher = base / "teacher"
    shutil.copytree(teacher_dir, teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n\n# a teacher\n")
    out = base / "run"
    proc = cli(
        "train",
        "--teacher",
        str(teacher),
        "--data",
        str(text_file),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--set",
        "data.block_size=32",
        "--set",
        "model.student_config={num_hidden_layers: 1}",
        "--set",
        "checkpoint.every=3",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_final_student_carries_a_card_the_hub_reads(licensed_run):
    card = ModelCard.load(licensed_run / "student" / "README.md")
    assert card.data.license == "mit"  # the teacher's
    assert card.data.library_name == "transformers" and "lmdistill" in card.data.tags
    assert card.data.base_model is None  # a local teacher is no hub id
    info = json.loads((licensed_run / "run.json").read_text())
    text = card.text
    for source in info["data"]["sources"]:
        assert source["fingerprint"] in text
    assert f"kept teacher layers {info['student']['init']['layers']}" in text
    assert f"| perplexity | {info['initial']['eval_ppl']:.4g} | {info['final']['eval_ppl']:.4g} |" in text
    assert "loss = 0.5 x KD + 0.5 x CE" in text and "4 optimizer steps of 2 blocks (256 tokens)" in text
    assert f"Health of the whole run: **{info['health_verdict']}**" in text
    assert (licensed_run / "student" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_card_names_the_default_teacher_a_cache_and_a_baseline_for_what_they_are(licensed_run):
    from lmdistill.core.paths import cache_home
    from lmdistill.report.card import model_card
    from lmdistill.report.reading import load_run

    record = load_run(licensed_run)
    record.config["model"]["teacher"] = str(cache_home() / "teachers" / "pydoc-llama-0123")
    text = model_card(record)
    assert "from the teacher lmdistill's embedded default teacher" in text and "pydoc-llama-0123" not in text
    record.run_info["teacher_cache"] = {"mode": "sampled", "teacher": "/models/big"}
    record.config["model"]["teacher"] = None
    cached = model_card(record)
    assert "`/models/big` (read from a sampled cache)" in cached and "read from a sampled cache: its KL" in cached
    assert "| perplexity |" in cached and "KL(teacher ‖ student) at T=1 |" not in cached
    record.config["distill"]["kd_weight"] = 0.0
    baseline = model_card(record)
    assert "ordinary language-model loss alone (kd_weight 0)" in baseline and "knowledge distillation" not in baseline


def test_a_stopped_run_exports_with_a_card_that_says_so(teacher_dir, text_file, tmp_path):
    out = tmp_path / "run"
    args = ("train", "--teacher", str(teacher_dir), "--data", str(text_file), "--output-dir", str(out))
    args += ("--batch-size", "2", "--max-steps", "8", "--eval-every", "2", "--set", "data.block_size=32")
    args += ("--set", "model.student_config={num_hidden_layers: 1}", "--set", "checkpoint.every=1", "--no-progress")
    assert run_cli_forked(*args, "--set", "debug.exit_after_step=5") == 137
    exported = tmp_path / "exported"
    assert cli("export", str(out), str(exported)).returncode == 0
    text = ModelCard.load(exported / "README.md").text
    assert "5 optimizer steps (of 8 planned) of 2 blocks (320 tokens)" in text
    assert "The checkpoint of step 5 was not evaluated; these are the numbers of step 4." in text
    assert "The run did not finish, so it has no health verdict" in text


def test_an_exported_checkpoint_says_which_step_it_holds(licensed_run, tmp_path):
    out = tmp_path / "step3"
    assert cli("export", str(licensed_run / "checkpoints" / "step-3"), str(out)).returncode == 0
    text = ModelCard.load(out / "README.md").text
    # step 3 was not evaluated (evaluations at 0, 2, 4): the card says so and shows step 2's numbers
    assert "The checkpoint of step 3 was not evaluated; these are the numbers of step 2." in text
    assert f'from_pretrained("{out}")' in text


def test_push_to_hub_offline_fails_before_writing(licensed_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pushed"
    proc = cli("export", str(licensed_run), str(out), "--push-to-hub", "someone/student")
    one_error_line(proc, "cannot push to the Hugging Face hub", "nothing was written", "without --push-to-hub")
    assert not out.exists()
    one_error_line(cli("export", str(licensed_run), str(out), "--push-to-hub", "a/b/c"), "not a repository name")


def test_push_to_hub_uploads_the_finished_export(licensed_run, tmp_path, monkeypatch):
    """The hub's client, replaced by a recorder: what lmdistill asks of it, and what the folder holds then."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    calls = []
    monkeypatch.setattr(HfApi, "whoami", lambda self: {"name": "someone"})
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, name, **kw: calls.append(("create", name, kw)) or RepoUrl(f"https://huggingface.co/{name}"),
    )

    def upload(self, folder_path, repo_id, **kw):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    out = tmp_path / "pushed"
    proc = cli("export", str(licensed_run), str(out), "--push-to-hub", "student")  # owned by the one logged in
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == ("create", "someone/student", {"repo_type": "model", "exist_ok": True})
    assert calls[1][:2] == ("upload", "someone/student")
    assert {"README.md", "model.safetensors", "config.json", "loss.png"} <= set(calls[1][2])
    assert 'from_pretrained("someone/student")' in (out / "README.md").read_text()
