"""Several runs side by side: overlaid curves and a table of their final numbers."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from lmdistill.core.errors import LmdistillError
from lmdistill.core.paths import atomic_write
from lmdistill.report.markdown import (
    DASH,
    fmt_duration,
    fmt_loss,
    fmt_pct,
    fmt_ppl,
    fmt_rate,
    fmt_value,
    status_line,
    table,
    write_report,
)
from lmdistill.report.plots import COMPARE_PLOT_FILES, plot_overlay
from lmdistill.report.reading import RunRecord, get, load_run, median_tokens_per_s

# plot file -> (which lines, metric, log scale, y label)
_OVERLAYS = {
    "compare_loss.png": (lambda r: r.train, "loss", False, "total training loss (nats/token)"),
    "compare_perplexity.png": (lambda r: r.evals, "eval_ppl", True, "student perplexity"),
    "compare_temperature.png": (lambda r: r.train, "temperature", False, "KD temperature T"),
    "compare_grad_norm.png": (lambda r: r.train, "grad_norm", True, "gradient norm"),
}


def compare_runs(run_dirs: list[Path], out_dir: Path) -> Path:
    """Overlay the runs' curves and tabulate their final metrics side by side.

    Writes ``out_dir/comparison.md`` and PNGs under ``out_dir/plots/``; returns the .md path.
    Each run's numbers come from its own files exactly as in its report.md.
    """
    if not run_dirs:
        raise LmdistillError("report: no run directories given; pass two or more runs/NAME")
    records = [load_run(d) for d in run_dirs]
    labels = unique_labels(records)
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    plots = []
    for name, (lines_of, key, log_y, ylabel) in _OVERLAYS.items():
        path = out_dir / "plots" / name
        if plot_overlay(records, labels, lines_of, key, log_y, ylabel, COMPARE_PLOT_FILES[name], path):
            plots.append(path)
        elif path.exists():
            path.unlink()
    out = [f"# Comparison of {len(records)} distillation runs", ""]
    for r, label in zip(records, labels):
        link = ""
        if (r.run_dir / "report.md").is_file():
            link = f", [report]({Path(os.path.relpath(r.run_dir / 'report.md', out_dir)).as_posix()})"
        out.append(f"- `{label}`: `{r.run_dir}` ({status_line(r)[0]}){link}")
    out += [
        "",
        "Final = each run's last evaluation line in metrics.jsonl; before = its evaluation at step 0; "
        "tokens/s = median over its training lines.",
        "",
    ]
    out += table(["", *[f"`{label}`" for label in labels]], _comparison_rows(records))
    out += ["", "## Plots", ""]
    for p in plots:
        out += [f"### {COMPARE_PLOT_FILES[p.name]}", "", f"![{COMPARE_PLOT_FILES[p.name]}](plots/{p.name})", ""]
    if not plots:
        out += ["No plots: none of the runs logged plottable data.", ""]
    return atomic_write(out_dir / "comparison.md", "\n".join(out).rstrip() + "\n")


def unique_labels(records: list[RunRecord]) -> list[str]:
    """Run names, made distinct: two runs of one preset share ``run.name``."""
    labels = [r.name for r in records]
    for attempt in (
        lambda r: r.run_dir.resolve().name,
        lambda r: f"{r.run_dir.resolve().parent.name}/{r.run_dir.resolve().name}",
    ):
        counts = Counter(labels)
        labels = [attempt(r) if counts[label] > 1 else label for r, label in zip(records, labels)]
    counts, seen, out = Counter(labels), Counter(), []
    for label in labels:  # the same directory given twice: number the copies
        seen[label] += 1
        out.append(f"{label} #{seen[label]}" if counts[label] > 1 else label)
    return out


def _comparison_rows(records: list[RunRecord]) -> list[list[Any]]:
    def row(label, fn):
        return [label, *[fn(r) for r in records]]

    def final(key, fmt):
        return lambda r: fmt((r.final_eval or {}).get(key))

    def cfg(key):
        return lambda r: fmt_value(get(r.config, key))

    def model(role):
        return lambda r: fmt_value(get(r.run_info, f"{role}.name") or get(r.config, f"model.{role}"))

    return [
        row("status", lambda r: status_line(r)[0]),
        row("teacher", model("teacher")),
        row("student", model("student")),
        row(
            "KD temperature start → end",
            lambda r: f"{cfg('distill.temperature')(r)} → {cfg('distill.min_temperature')(r)}",
        ),
        row("KD weight", cfg("distill.kd_weight")),
        row("divergence", cfg("distill.divergence")),
        row("KD term × T²", cfg("distill.scale_by_t2")),
        row("learning rate", cfg("train.lr")),
        row("batch size", cfg("train.batch_size")),
        row("last step", lambda r: fmt_value(r.last_step)),
        row("student ppl before", lambda r: fmt_ppl((r.initial_eval or {}).get("eval_ppl"))),
        row("student ppl after", final("eval_ppl", fmt_ppl)),
        row("teacher ppl", final("teacher_ppl", fmt_ppl)),
        # across tokenizers (runs with another tokenizer than the teacher's): the figure that compares
        row("student bits/byte after", final("eval_bpb", fmt_loss)),
        row("teacher bits/byte", final("teacher_bpb", fmt_loss)),
        row("eval CE (nats/token)", final("eval_ce_loss", fmt_loss)),
        row("KD term on eval data (eval_kd_loss)", final("eval_kd_loss", fmt_loss)),
        row("KL(teacher ‖ student) at T=1 (eval_kl)", final("eval_kl", fmt_loss)),
        row("top-1 agreement", final("top1_agreement", fmt_pct)),
        row("tokens/s (median)", lambda r: fmt_rate(median_tokens_per_s(r))),
        row("wall time", lambda r: fmt_duration(get(r.run_info, "wall_time_s"))),
        row("skipped steps", lambda r: str(len(r.skipped))),
        row("health verdict", lambda r: fmt_value((r.health or {}).get("verdict")) if r.health else DASH),
    ]


def main_report(paths: list[str]) -> int:
    """``lmdistill report RUN_DIR [RUN_DIR ...]``: write the report(s) and print the path.

    One run: ``RUN_DIR/report.md``. Several: each run's report.md, then a comparison in
    ``<parent of the first run>/comparison-<name1>-<name2>.../comparison.md``.
    """
    if not paths:
        raise LmdistillError("report: give at least one run directory (runs/NAME)")
    run_dirs = [Path(p) for p in paths]
    records = [load_run(d) for d in run_dirs]  # validate all before writing anything
    if len(run_dirs) == 1:
        print(write_report(run_dirs[0]))
        return 0
    for d in run_dirs:
        write_report(d)  # so the comparison can link each run's own report
    joined = "-".join(_slug(label) for label in unique_labels(records))
    if len(joined) > 80:  # keep the folder name usable on every filesystem
        joined = f"{_slug(records[0].name)}-and-{len(records) - 1}-more"
    print(compare_runs(run_dirs, run_dirs[0].resolve().parent / f"comparison-{joined}"))
    return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
