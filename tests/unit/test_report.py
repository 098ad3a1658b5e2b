"""report.py on synthetic run directories: plots, report.md numbers, partial runs, comparison."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from lmdistill.errors import LmdistillError
from lmdistill.report import (
    PLOT_FILES,
    compare_runs,
    load_run,
    main_report,
    write_plots,
    write_report,
)

TEACHER_PPL = 18.52
CHECKS = [
    ("start_loss", "total loss at the start above 20", "passed", [], []),
    ("loss_spike", "a loss spike such as 17 -> 25 -> 17", "fired", [30, 45],
     ["step 30: loss 25.10 is 1.9x its running mean 13.2; kept",
      "step 45: loss 19.50 is 2.1x its running mean 9.3; rolled back"]),
    ("nonfinite", "any NaN or inf in a loss or gradient", "fired", [17],
     ["step 17: kd loss is NaN; step skipped"]),
    ("ppl_after_5000", "student perplexity above 1M after step 5000", "not_reached", [], []),
    ("loss_decreasing", "loss decreasing over the run", "passed", [], []),
]


def _eval_line(step: int, ppl: float, agreement: float) -> dict:
    return {"step": step, "eval_ce_loss": math.log(ppl), "eval_ppl": ppl,
            "eval_kd_loss": 0.05 * math.log(ppl), "eval_kl": 0.01 * math.log(ppl),
            "eval_tokens": 512, "teacher_ppl": TEACHER_PPL,
            "teacher_ce_loss": math.log(TEACHER_PPL), "top1_agreement": agreement}


def _metrics(last_step: int, eval_every: int, t_start: float, t_end: float,
             final_ppl: float) -> list[dict]:
    """Lines as the trainer writes them: eval at step 0 (2.3e12, the seed's number), a NaN
    skipped at 17, a spike kept at 30, a spike rolled back at 45."""
    rng = np.random.default_rng(0)
    lines = [_eval_line(0, 2.3e12, 0.012)]
    ppls = iter(np.geomspace(5000.0, final_ppl, max(1, last_step // eval_every)))
    for step in range(1, last_step + 1):
        t = t_start + (t_end - t_start) * (step - 1) / max(1, last_step - 1)
        ce = 3.5 + 6.0 * math.exp(-step / 15) + 0.1 * rng.standard_normal()
        kd_raw = 0.4 + 2.0 * math.exp(-step / 15)
        loss = 0.5 * ce + 0.5 * kd_raw * t * t
        if step == 30:
            loss = 25.1
        line = {"step": step, "epoch": 0, "temperature": t, "lr": 3e-4 * min(1.0, step / 10),
                "loss": loss, "kd_loss": kd_raw * t * t, "kd_loss_unscaled": kd_raw,
                "ce_loss": ce, "grad_norm": float(2.0 * math.exp(-step / 20) + 0.1),
                "tokens_per_s": 1000.0 + 10 * step, "mem_gib": 1.25}
        if step == 17:
            # A skipped step is logged once, as a skipped line carrying the step's values.
            line.update(loss=float("nan"), kd_loss=float("nan"), grad_norm=float("inf"))
            lines.append({"step": 17, "skipped": True, "reason": "nonfinite:kd", **line})
        elif step == 45:
            line.update(loss=19.5)
            lines.append({"step": 45, "health": "loss_spike", "message": CHECKS[1][4][1]})
            lines.append({"step": 45, "event": "rollback", "to_step": 40, "lr_scale": 0.5,
                          "message": "restored the state of step 40; LR x0.5"})
            lines.append({"step": 45, "skipped": True, "reason": "spike", **line})
        else:
            lines.append(line)
        if step == 30:
            lines.append({"step": 30, "health": "loss_spike", "message": CHECKS[1][4][0]})
        if step == 5:
            lines.append({"step": 5, "note": "a line kind this reader does not know"})
        if step % eval_every == 0:
            lines.append(_eval_line(step, float(next(ppls)), 0.2 + step / 200))
    return lines


def make_run(root: Path, name: str = "tiny-kd", *, last_step: int = 60, eval_every: int = 20,
             finished: bool = True, t_start: float = 2.0, t_end: float = 1.5,
             final_ppl: float = 41.27) -> Path:
    """Write a run directory the way the trainer does; killed runs lack run.json/health.json."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "run": {"name": name, "seed": 0},
        "model": {"teacher": "tiny-teacher", "student": "tiny-student"},
        "data": {"block_size": 64},
        "distill": {"temperature": t_start, "min_temperature": t_end, "kd_weight": 0.5,
                    "divergence": "forward_kl", "scale_by_t2": True},
        "train": {"batch_size": 2, "lr": 3e-4, "epochs": 1, "max_steps": last_step},
        "loss": {}, "guard": {}, "health": {}, "checkpoint": {}, "debug": {},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = _metrics(last_step, eval_every, t_start, t_end, final_ppl)
    # json.dumps writes NaN / Infinity literals, exactly as the trainer's writer does.
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        checks = [{"name": n, "description": d, "status": s, "steps": st, "messages": m}
                  for n, d, s, st, m in CHECKS]
        (run_dir / "health.json").write_text(json.dumps({"verdict": "attention", "checks": checks}))
        last_eval = [x for x in lines if "eval_ppl" in x][-1]
        model = {"architecture": "LlamaForCausalLM", "vocab_size": 512}
        (run_dir / "run.json").write_text(json.dumps({
            "status": "finished", "started_at": "2025-01-01T10:00:00Z",
            "finished_at": "2025-01-01T10:02:03Z", "wall_time_s": 123.4, "exit_reason": "max_steps",
            "teacher": {"name": "tiny-teacher", "params": 7_300_000, "num_layers": 8,
                        "hidden_size": 256, **model},
            "student": {"name": "tiny-student", "params": 1_000_000, "num_layers": 2,
                        "hidden_size": 64, **model},
            "data": {"source": "corpus.txt", "train_blocks": 120, "eval_blocks": 8,
                     "block_size": 64, "train_tokens": 7680},
            "final": {k: v for k, v in last_eval.items() if k != "step"} | {"steps": last_step},
            "initial": {"eval_ce_loss": math.log(2.3e12), "eval_ppl": 2.3e12},
        }))
    return run_dir


def _eval_lines(run_dir: Path) -> list[dict]:
    out = []
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            continue
        if "eval_ppl" in obj:
            out.append(obj)
    return out


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
    report_path = write_report(run_dir)
    return run_dir, report_path.read_text()


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
    # Printed as it is: no cap, no "485M".
    assert ppl[1] == "2.3e+12"

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
    teacher = _table_row(report, "teacher")
    assert teacher[1:6] == ["tiny-teacher", "LlamaForCausalLM", "8", "256", "7.3M"]
    assert "7.3× smaller" in report
    assert _table_row(report, "KD temperature (configured start → end)")[1] == "2 → 1.5"
    assert _table_row(report, "divergence")[1] == "forward_kl"
    assert _table_row(report, "training blocks")[1] == "120"
    # tokens/s: median of the 58 training lines (1010 .. 1600 without the skipped 17 and 45),
    # the upper middle value as in run.json.
    tps = _table_row(report, "training throughput (tokens/s)")[1]
    assert tps == "1,310 (median of 58 training lines)"
    assert _table_row(report, "wall time")[1] == "2 min 03 s"


def test_temperature_table_follows_the_logged_schedule(finished_run):
    run_dir, report = finished_run
    rows = {int(r[0]): r for r in (_table_row(report, str(s)) for s in (0, 20, 40, 60))}
    train = {x["step"]: x for x in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                       .splitlines()) if "temperature" in x}
    assert float(rows[0][1]) == pytest.approx(train[1]["temperature"])  # step 0: first line
    assert float(rows[60][1]) == pytest.approx(1.5)
    assert float(rows[40][2]) == pytest.approx(train[40]["loss"], abs=1e-4)


def test_health_table_lists_every_check(finished_run):
    _, report = finished_run
    assert "**Verdict: attention** (2 of 5 checks fired)." in report
    assert len([line for line in report.splitlines() if line.startswith("| `")]) >= len(CHECKS)
    for name, _, status, steps, messages in CHECKS:
        row = _table_row(report, f"`{name}`")
        assert row[2].strip("*") == status.replace("_", " ")
        if steps:
            assert row[3] == ", ".join(map(str, steps))
            assert row[4] == messages[0]


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
    assert "did not finish" in report and "up to step 35" in report
    last = _eval_lines(run_dir)[-1]
    assert last["step"] == 20
    ppl = _table_row(report, "perplexity (exp of eval CE)")
    assert float(ppl[2]) == pytest.approx(last["eval_ppl"], rel=1e-3)
    assert "No verdict: health.json is missing" in report
    assert f"| 30 | `loss_spike` | {CHECKS[1][4][0]} |" in report  # from metrics.jsonl
    assert "the last line, cut short by a killed run" in report
    assert _table_row(report, "wall time")[1] == "unknown (no run.json)"
    for name in PLOT_FILES:
        _assert_readable_png(run_dir / "plots" / name)


def test_stopped_run_says_so(tmp_path):
    run_dir = make_run(tmp_path, "stopped")
    info = json.loads((run_dir / "run.json").read_text())
    info.update(status="stopped", exit_reason="too many skipped steps")
    (run_dir / "run.json").write_text(json.dumps(info))
    report = write_report(run_dir).read_text()
    assert report.startswith("# Distillation run `stopped`: stopped")
    assert "too many skipped steps. It did not finish" in report


def test_plots_without_data_are_skipped(tmp_path):
    run_dir = make_run(tmp_path, "no-eval", last_step=12, eval_every=1000, finished=False)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(
        "\n".join(x for x in lines if "eval_ppl" not in x) + "\n")
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "perplexity.png").write_bytes(b"stale")

    written = {p.name for p in write_plots(run_dir)}
    assert written == set(PLOT_FILES) - {"perplexity.png"}
    assert not (run_dir / "plots" / "perplexity.png").exists()
    report = write_report(run_dir).read_text()
    assert "No evaluation yet" in report and "perplexity.png" not in report

    empty = tmp_path / "just-started"
    empty.mkdir()
    (empty / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "just-started"}}))
    report = write_report(empty).read_text()
    assert write_plots(empty) == []
    assert "No plots" in report and "metrics.jsonl is missing" in report


def test_resumed_run_keeps_only_the_surviving_history(tmp_path):
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    lines = [{"step": s, "loss": 5.0, "temperature": 2.0} for s in range(1, 11)]
    lines.append(_eval_line(10, 300.0, 0.3))
    # Killed after step 10, resumed from the checkpoint at step 5, killed again at step 8.
    lines += [{"step": s, "loss": 4.0, "temperature": 2.0} for s in range(6, 9)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    record = load_run(run_dir)
    assert [x["step"] for x in record.train] == list(range(1, 9))
    assert record.train[-1]["loss"] == 4.0
    assert record.evals == [] and record.rewinds == [6]


def test_compare_runs_lists_both_runs(tmp_path):
    a = make_run(tmp_path / "runs", "t2", t_start=2.0, t_end=1.5)
    b = make_run(tmp_path / "runs", "t5", t_start=5.0, t_end=3.0, last_step=40, final_ppl=63.5)
    out = compare_runs([a, b], tmp_path / "cmp")
    text = out.read_text()
    assert out == tmp_path / "cmp" / "comparison.md"
    header = _table_row(text, "")
    assert header[1:] == ["`t2`", "`t5`"]
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
