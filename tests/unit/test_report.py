"""The report package on run directories written the way the trainer writes them.

Fixtures use the trainer's own writers: ``MetricsLog`` for metrics.jsonl, ``StepResult.record``
for training and skipped lines, ``HealthMonitor`` for health events and health.json, the
config's ``to_run_yaml`` and ``RunDirectory.write_json`` for the rest. Only the numbers are
synthetic (a falling loss, a NaN at step 17, a spike kept at 30, a spike rolled back at 45).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from lmdistill.config import Config
from lmdistill.core.errors import LmdistillError
from lmdistill.models.loading import ModelInfo
from lmdistill.report import PLOT_FILES, compare_runs, load_run, main_report, write_plots, write_report
from lmdistill.report.metrics import MetricsLog
from lmdistill.training.guards import Action, Cause, Decision, StepStats
from lmdistill.training.monitor import HealthMonitor
from lmdistill.training.rundir import RunDirectory
from lmdistill.training.trainer import StepResult

TEACHER_PPL = 18.52


def eval_line(step: int, ppl: float, agreement: float) -> dict:
    """An evaluation line: ``evaluate()``'s keys (checked against it below) with chosen values."""
    return {
        "step": step,
        "eval_ce_loss": math.log(ppl),
        "eval_ppl": ppl,
        "eval_tokens": 512,
        "eval_kd_loss": 0.05 * math.log(ppl),
        "eval_kl": 0.01 * math.log(ppl),
        "top1_agreement": agreement,
        "draft_acceptance": 0.5 + agreement / 2,
        "teacher_ce_loss": math.log(TEACHER_PPL),
        "teacher_ppl": TEACHER_PPL,
    }


def make_run(
    root: Path,
    name: str = "tiny-kd",
    *,
    last_step: int = 60,
    eval_every: int = 20,
    finished: bool = True,
    t_start: float = 2.0,
    t_end: float = 1.5,
    final_ppl: float = 41.27,
) -> Path:
    """A run directory as the trainer leaves it; a killed run has run.json saying "running" and no health.json."""
    run = RunDirectory(root / name)
    cfg = Config.load(
        None,
        [
            f"run.name={name}",
            f"distill.temperature={t_start}",
            f"distill.min_temperature={t_end}",
            f"train.max_steps={last_step}",
            "train.lr=3e-4",
            "train.batch_size=2",
            "data.block_size=64",
            "guard.spike=rollback",
        ],
    )
    run.create(cfg)
    model = {"architecture": "LlamaForCausalLM", "vocab_size": 512}
    info = {
        "status": "running",
        "started_at": "2025-01-01T10:00:00+00:00",
        "command": "train",
        "teacher": asdict(ModelInfo(name="tiny-teacher", params=7_300_000, num_layers=8, hidden_size=256, **model)),
        "student": asdict(ModelInfo(name="tiny-student", params=1_000_000, num_layers=2, hidden_size=64, **model)),
        "data": {
            "source": "corpus.txt",
            "eval_source": "8 held-out blocks (5%)",
            "train_blocks": 120,
            "eval_blocks": 8,
            "block_size": 64,
            "train_tokens": 7680,
        },
    }
    run.write_json("run.json", info)
    log = MetricsLog(run.path, tensorboard=False)
    monitor = HealthMonitor(cfg.health, last_step)
    rng = np.random.default_rng(0)
    first = eval_line(0, 2.3e12, 0.012)  # the original report's perplexity, printed as it is
    log.write(first)
    ppls = iter(np.geomspace(5000.0, final_ppl, max(1, last_step // eval_every)))

    def announce(step, fired):
        for check, message in fired:
            log.write({"step": step, "health": check, "message": message})

    for step in range(1, last_step + 1):
        t = t_start + (t_end - t_start) * (step - 1) / max(1, last_step - 1)
        ce = 3.5 + 6.0 * math.exp(-step / 15) + 0.1 * rng.standard_normal()
        kd = 0.4 + 2.0 * math.exp(-step / 15)
        loss = 25.1 if step == 30 else 19.5 if step == 45 else 0.5 * ce + 0.5 * kd * t * t
        grad = 2.0 * math.exp(-step / 20) + 0.1
        stats = StepStats(loss=loss, kd=kd * t * t, kd_unscaled=kd, ce=ce, grad_norm=grad, teacher_nonfinite=False)
        decision = Decision(action=Action.STEP)
        if step == 17:
            nan = math.nan
            stats = StepStats(loss=nan, kd=nan, kd_unscaled=nan, ce=ce, grad_norm=math.inf, teacher_nonfinite=False)
            decision = Decision(action=Action.SKIP, cause=Cause.NONFINITE, term="kd")
            announce(step, monitor.on_nonfinite(step, "kd"))
        elif step in (30, 45):
            action = Action.STEP if step == 30 else Action.ROLLBACK  # guard.spike warn at 30, rollback at 45
            decision = Decision(action=action, cause=Cause.SPIKE, term="spike", spike_median=13.2)
            announce(step, monitor.on_spike(step, loss, 13.2, "kept" if step == 30 else "rolled back"))
        if step == 45:
            log.write(
                {
                    "step": 45,
                    "event": "rollback",
                    "to_step": 40,
                    "lr_scale": 0.5,
                    "message": "restored the state of step 40; LR x0.5",
                }
            )
        log.write(StepResult(step, 0, t, 3e-4 * min(1.0, step / 10), stats, decision, 1000.0 + 10 * step).record())
        if decision.applies_update:
            announce(step, monitor.on_train_loss(step, loss))
        if step % eval_every == 0:
            line = eval_line(step, float(next(ppls)), 0.2 + step / 200)
            log.write(line)
            announce(step, monitor.on_eval(step, line["eval_ppl"]))
    log.close()
    if finished:
        health = monitor.finalize()
        run.write_json("health.json", health)
        last = [x for x in _lines(run.path) if "eval_ppl" in x][-1]
        info.update(
            status="finished",
            finished_at="2025-01-01T10:02:03+00:00",
            wall_time_s=123.4,
            initial={k: v for k, v in first.items() if k != "step"},
            final={**{k: v for k, v in last.items() if k != "step"}, "steps": last_step},
        )
        run.write_json("run.json", info)
    return run.path


def _lines(run_dir: Path) -> list[dict]:
    out = []
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return out


def _eval_lines(run_dir: Path) -> list[dict]:
    return [x for x in _lines(run_dir) if "eval_ppl" in x]


def _table_row(report: str, first_cell: str) -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in report")


def _assert_readable_png(path: Path) -> None:
    assert path.is_file(), path
    img = imread(path)
    height, width = img.shape[:2]
    assert 300 <= height <= 2000 and 500 <= width <= 2000, img.shape
    pixels = img.reshape(-1, img.shape[-1])
    assert len(np.unique(pixels[::7], axis=0)) > 20, f"{path.name} is nearly one colour"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, str]:
    run_dir = make_run(tmp_path_factory.mktemp("runs"))
    return run_dir, write_report(run_dir).read_text()


def test_eval_line_has_the_keys_evaluate_writes(tiny_tokenizer):
    import torch

    from conftest import tiny_llama
    from lmdistill.teacher.signals import LiveLogits
    from lmdistill.training.evaluate import evaluate

    vocab = len(tiny_tokenizer)
    student, teacher = tiny_llama(vocab, seed=1), tiny_llama(vocab, seed=2)
    blocks = torch.randint(0, vocab, (2, 16))
    real = evaluate(student, LiveLogits(teacher, vocab), blocks, vocab_size=vocab, temperature=2.0, progress=False)
    assert set(eval_line(0, 10.0, 0.5)) == {"step", *real}


def test_every_plot_is_written_and_readable(finished_run):
    run_dir, _ = finished_run
    for name in PLOT_FILES:
        _assert_readable_png(run_dir / "plots" / name)


def test_final_metrics_equal_last_eval_line(finished_run):
    run_dir, report = finished_run
    evals = _eval_lines(run_dir)
    before, last = evals[0], evals[-1]
    assert last["step"] == 60
    ppl = _table_row(report, "perplexity (exp of eval CE)")
    assert float(ppl[1]) == pytest.approx(before["eval_ppl"], rel=1e-3)
    assert float(ppl[2]) == pytest.approx(last["eval_ppl"], rel=1e-3)
    assert float(ppl[3]) == pytest.approx(last["teacher_ppl"], rel=1e-3)
    assert ppl[1] == "2.3e+12"  # printed as it is: no cap, no "485M"
    ce = _table_row(report, "eval CE (nats/token)")
    assert float(ce[2]) == pytest.approx(last["eval_ce_loss"], abs=1e-4)
    assert float(ce[3]) == pytest.approx(last["teacher_ce_loss"], abs=1e-4)
    kd = _table_row(report, "KD term on eval data, as trained (eval_kd_loss)")
    assert float(kd[2]) == pytest.approx(last["eval_kd_loss"], abs=1e-4)
    kl = _table_row(report, "KL(teacher ‖ student) at T=1, nats/token (eval_kl)")
    assert float(kl[1]) == pytest.approx(before["eval_kl"], abs=1e-4)
    assert float(kl[2]) == pytest.approx(last["eval_kl"], abs=1e-4)
    agree = _table_row(report, "top-1 agreement with the teacher")
    assert float(agree[2].rstrip(" %")) / 100 == pytest.approx(last["top1_agreement"], abs=1e-4)
    assert "student after (step 60)" in report


def test_report_describes_models_data_config_and_throughput(finished_run):
    _, report = finished_run
    assert report.startswith("# Distillation run `tiny-kd`: finished")
    assert _table_row(report, "teacher")[1:6] == ["tiny-teacher", "LlamaForCausalLM", "8", "256", "7.3M"]
    assert "7.3× smaller" in report
    assert _table_row(report, "KD temperature (configured start → end)")[1] == "2 → 1.5"
    assert _table_row(report, "divergence")[1] == "forward_kl"
    assert _table_row(report, "training blocks")[1] == "120"
    # tokens/s: median of the 58 training lines (1010 .. 1600 without the skipped 17 and 45),
    # the upper middle value as in run.json.
    assert _table_row(report, "training throughput (tokens/s)")[1] == "1,310 (median of 58 training lines)"
    assert _table_row(report, "wall time")[1] == "2 min 03 s"


def test_temperature_table_follows_the_logged_schedule(finished_run):
    run_dir, report = finished_run
    rows = {int(r[0]): r for r in (_table_row(report, str(s)) for s in (0, 20, 40, 60))}
    train = {x["step"]: x for x in _lines(run_dir) if "temperature" in x and not x.get("skipped")}
    assert float(rows[0][1]) == pytest.approx(train[1]["temperature"], abs=1e-3)  # step 0: the first line
    assert float(rows[60][1]) == pytest.approx(1.5)
    assert float(rows[40][2]) == pytest.approx(train[40]["loss"], abs=1e-4)


def test_health_table_lists_every_check_the_monitor_wrote(finished_run):
    run_dir, report = finished_run
    health = json.loads((run_dir / "health.json").read_text())
    fired = [c for c in health["checks"] if c["status"] == "fired"]
    assert {c["name"] for c in fired} >= {"nonfinite", "loss_spike"}
    assert f"**Verdict: attention** ({len(fired)} of {len(health['checks'])} checks fired)." in report
    for check in health["checks"]:
        row = _table_row(report, f"`{check['name']}`")
        assert row[2].strip("*") == check["status"].replace("_", " ")
        if check["steps"]:
            assert row[3] == ", ".join(map(str, check["steps"][:8])) + (
                f" (+{len(check['steps']) - 8} more)" if len(check["steps"]) > 8 else ""
            )
            assert row[4] == " ".join(check["messages"][0].split())


def test_skipped_steps_and_nonfinite_values_are_reported(finished_run):
    _, report = finished_run
    assert "weights and optimizer state untouched): **2**." in report
    assert _table_row(report, "`nonfinite:kd`")[1:] == ["1", "17"]
    assert _table_row(report, "`spike`")[1:] == ["1", "45"]
    assert "Guard events: rollback × 1 (steps 45)." in report
    assert _table_row(report, "steps with a non-finite total loss")[1] == "17 (1 in all)"
    for name, title in PLOT_FILES.items():
        assert f"![{title}](plots/{name})" in report


def test_killed_run_still_gets_a_report(tmp_path):
    run_dir = make_run(tmp_path, "killed", last_step=35, finished=False)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 36, "epoch": 0, "temperature": 1.7, "lo')  # killed mid-write
    report = write_report(run_dir).read_text()
    assert report.startswith("# Distillation run `killed`: did not finish")
    assert "up to step 35" in report
    last = _eval_lines(run_dir)[-1]
    assert last["step"] == 20
    assert float(_table_row(report, "perplexity (exp of eval CE)")[2]) == pytest.approx(last["eval_ppl"], rel=1e-3)
    assert "No verdict: health.json is missing" in report
    spike = next(x for x in _lines(run_dir) if x.get("health") == "loss_spike")
    assert f"| 30 | `loss_spike` | {spike['message']} |" in report  # from metrics.jsonl
    assert "the last line, cut short by a killed run" in report
    for name in PLOT_FILES:
        _assert_readable_png(run_dir / "plots" / name)


def test_stopped_run_says_so(tmp_path):
    run_dir = make_run(tmp_path, "stopped")
    info = json.loads((run_dir / "run.json").read_text())
    info.update(status="stopped", exit_reason="too many skipped steps")
    RunDirectory(run_dir).write_json("run.json", info)
    report = write_report(run_dir).read_text()
    assert report.startswith("# Distillation run `stopped`: stopped")
    assert "too many skipped steps. It did not finish" in report


def test_plots_without_data_are_skipped(tmp_path):
    run_dir = make_run(tmp_path, "no-eval", last_step=12, eval_every=1000, finished=False)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(x for x in lines if "eval_ppl" not in x) + "\n")
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "perplexity.png").write_bytes(b"stale")
    assert {p.name for p in write_plots(run_dir)} == set(PLOT_FILES) - {"perplexity.png"}
    assert not (run_dir / "plots" / "perplexity.png").exists()
    report = write_report(run_dir).read_text()
    assert "No evaluation yet" in report and "perplexity.png" not in report

    # A run killed right after its directory was created: config.yaml only.
    empty = RunDirectory(tmp_path / "just-started")
    empty.create(Config.load(None, ["run.name=just-started"]))
    report = write_report(empty.path).read_text()
    assert write_plots(empty.path) == []
    assert "No plots" in report and "metrics.jsonl is missing" in report


def test_compare_runs_lists_both_runs(tmp_path):
    a = make_run(tmp_path / "runs", "t2", t_start=2.0, t_end=1.5)
    b = make_run(tmp_path / "runs", "t5", t_start=5.0, t_end=3.0, last_step=40, final_ppl=63.5)
    out = compare_runs([a, b], tmp_path / "cmp")
    text = out.read_text()
    assert out == tmp_path / "cmp" / "comparison.md"
    assert _table_row(text, "")[1:] == ["`t2`", "`t5`"]
    after = _table_row(text, "student ppl after")
    assert after[1:] == ["41.27", "63.5"]
    for run_dir, cell in zip((a, b), after[1:]):
        assert float(cell) == pytest.approx(_eval_lines(run_dir)[-1]["eval_ppl"], rel=1e-3)
    assert _table_row(text, "KD temperature start → end")[1:] == ["2 → 1.5", "5 → 3"]
    assert _table_row(text, "last step")[1:] == ["60", "40"]
    for png in ("compare_loss.png", "compare_perplexity.png"):
        _assert_readable_png(tmp_path / "cmp" / "plots" / png)


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_not_a_run_directory_is_a_user_error(tmp_path, kind):
    path = tmp_path / "nothing-here"
    if kind == "file":
        path.write_text("x")
    elif kind == "empty":
        path.mkdir()
    with pytest.raises(LmdistillError, match=re.escape(str(path))) as info:
        write_report(path)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value) and "runs/NAME" in str(info.value)


def test_main_report_one_and_several_runs(tmp_path, capsys):
    a = make_run(tmp_path / "runs", "a", last_step=20, eval_every=10)
    b = make_run(tmp_path / "runs", "b", last_step=20, eval_every=10, finished=False)
    assert main_report([str(a)]) == 0
    assert capsys.readouterr().out.strip() == str(a / "report.md")

    assert main_report([str(a), str(b)]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == (tmp_path / "runs" / "comparison-a-b" / "comparison.md").resolve()
    assert printed.is_file() and (b / "report.md").is_file()
    assert "[report](../b/report.md)" in printed.read_text()

    # Two runs of one preset share run.name: the directory names tell them apart.
    c = make_run(tmp_path / "runs", "c", last_step=20, eval_every=10)
    config = yaml.safe_load((c / "config.yaml").read_text())
    config["run"]["name"] = "a"
    (c / "config.yaml").write_text(yaml.safe_dump(config))
    assert main_report([str(a), str(c)]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.parent.name == "comparison-a-c"
    assert _table_row(printed.read_text(), "")[1:] == ["`a`", "`c`"]

    with pytest.raises(LmdistillError, match="nope"):
        main_report([str(a), str(tmp_path / "nope")])
    with pytest.raises(LmdistillError):
        main_report([])


def test_load_run_sorts_lines_by_kind(finished_run):
    run_dir, _ = finished_run
    record = load_run(run_dir)
    assert [x["step"] for x in record.train] == [s for s in range(1, 61) if s not in (17, 45)]
    assert [x["step"] for x in record.skipped] == [17, 45]
    assert [x["step"] for x in record.evals] == [0, 20, 40, 60]
    assert [x["event"] for x in record.events] == ["rollback"]
    assert record.bad_lines == [] and record.status == "finished"
