"""Plots and a Markdown report for a training run, read from its run directory.

The trainer writes the run directory (DESIGN.md, "The run directory"); this module only
reads it. It therefore also works on a run that is still going or was killed: a metrics
line cut in half is skipped and counted, a missing or unreadable run.json / health.json is
reported as missing, and the report says the run did not finish. ``lmdistill report RUN_DIR``
goes through :func:`main_report`.

Where the numbers in report.md come from (all from the files on disk, never recomputed):

- "after" / final metrics: the last evaluation line of metrics.jsonl; "before": the
  evaluation line at step 0 (the student before distillation). run.json's ``final`` and
  ``initial`` are used only when metrics.jsonl has no evaluation line.
- tokens/s: the median of ``tokens_per_s`` over the training lines (skipped steps excluded;
  the upper middle value for an even count, as the trainer computes run.json's
  ``final.tokens_per_s``). The median, because the first steps (warm-up, compilation) and
  evaluation pauses would drag a mean down.
- perplexity is printed with 4 significant digits and never capped: 2.3e+12 stays 2.3e+12.

A step that appears again in metrics.jsonl (a resumed run, or a rollback that replays steps)
supersedes the training and evaluation lines at and after it, so curves and final numbers
follow the history that produced the final weights. Skipped-step, health and other event
lines are all kept: they explain why the run went back.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmdistill.errors import LmdistillError

__all__ = [
    "RunRecord",
    "load_run",
    "write_plots",
    "write_report",
    "compare_runs",
    "main_report",
    "median_tokens_per_s",
    "PLOT_FILES",
    "COMPARE_PLOT_FILES",
]

# File names of the per-run plots, in report order, with the heading each gets in report.md.
PLOT_FILES: dict[str, str] = {
    "losses.png": "Training loss terms",
    "schedule.png": "KD temperature and learning rate",
    "grad_norm.png": "Gradient norm",
    "perplexity.png": "Held-out perplexity: student vs teacher",
    "throughput.png": "Throughput",
}
COMPARE_PLOT_FILES: dict[str, str] = {
    "compare_loss.png": "Training loss",
    "compare_perplexity.png": "Held-out student perplexity",
    "compare_temperature.png": "KD temperature",
    "compare_grad_norm.png": "Gradient norm",
}

_RUN_FILES = ("metrics.jsonl", "config.yaml", "run.json")
_EVAL_KEYS = ("eval_ce_loss", "eval_ppl", "eval_kd_loss", "eval_kl", "teacher_ppl",
              "top1_agreement")
_DASH = "—"  # shown where a value is absent, so a table never has an empty cell
_FIG_DPI = 110


# --------------------------------------------------------------------------- reading


@dataclass
class RunRecord:
    """Everything a report needs from one run directory, parsed and tolerant of gaps.

    ``train`` and ``evals`` hold the metrics lines of the surviving history (see the module
    docstring on resumed runs), sorted by step. ``config``, ``health`` and ``run_info`` are
    the parsed config.yaml, health.json and run.json; an empty dict / ``None`` when the file
    is missing or unreadable, with the reason in ``problems``.
    """

    run_dir: Path
    name: str
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    health_events: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    health: dict[str, Any] | None = None
    run_info: dict[str, Any] | None = None
    metrics_lines: int = 0
    metrics_last_lineno: int = 0
    unreadable_lines: list[int] = field(default_factory=list)
    rewinds: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str | None:
        """run.json's status ("running", "finished", "stopped", "failed"), None without it."""
        status = (self.run_info or {}).get("status")
        return str(status) if status is not None else None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def last_step(self) -> int | None:
        """The highest step any surviving training or evaluation line reached."""
        steps = [line["step"] for line in self.train + self.evals]
        return max(steps) if steps else None

    @property
    def initial_eval(self) -> dict[str, Any] | None:
        """The evaluation of the student before distillation (the eval line at step 0)."""
        if self.evals and self.evals[0]["step"] == 0:
            return self.evals[0]
        initial = (self.run_info or {}).get("initial")
        return {"step": 0, **initial} if isinstance(initial, dict) else None

    @property
    def final_eval(self) -> dict[str, Any] | None:
        """The last evaluation line; run.json's ``final`` only if metrics.jsonl has none."""
        if self.evals:
            return self.evals[-1]
        final = (self.run_info or {}).get("final")
        if isinstance(final, dict) and any(_num(final.get(k)) is not None for k in _EVAL_KEYS):
            return {"step": final.get("steps"), **final}
        return None


def load_run(run_dir: Path | str) -> RunRecord:
    """Read a run directory; raise ``LmdistillError`` if it is not one.

    A directory counts as a run directory when it holds at least one of metrics.jsonl,
    config.yaml and run.json. Partial and malformed files are tolerated and noted.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise LmdistillError(
            f"{run_dir}: no such run directory; pass the directory a training run wrote "
            "(runs/NAME)"
        )
    if not run_dir.is_dir():
        raise LmdistillError(
            f"{run_dir}: is a file, not a run directory; pass the directory a training run "
            "wrote (runs/NAME)"
        )
    if not any((run_dir / name).is_file() for name in _RUN_FILES):
        raise LmdistillError(
            f"{run_dir}: not a run directory (it has none of {', '.join(_RUN_FILES)}); pass "
            "the directory a training run wrote (runs/NAME)"
        )

    problems: list[str] = []
    config = _read_yaml(run_dir / "config.yaml", problems)
    run_info = _read_json(run_dir / "run.json", problems)
    health = _read_json(run_dir / "health.json", problems)
    if health is not None and not isinstance(health.get("checks", []), list):
        problems.append("health.json: `checks` is not a list; health table left out")
        health = None
    name = _get(config, "run.name")
    record = RunRecord(
        run_dir=run_dir,
        name=str(name) if name else run_dir.resolve().name,
        config=config,
        health=health,
        run_info=run_info,
        problems=problems,
    )
    _read_metrics(run_dir / "metrics.jsonl", record)
    return record


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        problems.append(f"{path.name} could not be parsed ({type(err).__name__})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not hold a mapping")
        return {}
    return data


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None  # absence is reported where the file's content would have been shown
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A run killed while writing it; the trainer writes these atomically, but an older
        # or foreign writer may not.
        problems.append(f"{path.name} is not valid JSON (cut short?); treated as missing")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not hold a JSON object; treated as missing")
        return None
    return data


def _read_metrics(path: Path, record: RunRecord) -> None:
    """Sort metrics.jsonl lines into the record's series; skip lines that do not parse."""
    if not path.is_file():
        return
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, text in enumerate(f, start=1):
            text = text.strip()
            if not text:
                continue
            record.metrics_lines += 1
            record.metrics_last_lineno = lineno
            try:
                # Python's json reads the NaN / Infinity literals its writer produces.
                obj = json.loads(text)
            except json.JSONDecodeError:
                record.unreadable_lines.append(lineno)
                continue
            step = _step(obj.get("step")) if isinstance(obj, dict) else None
            if step is None:
                record.unreadable_lines.append(lineno)
                continue
            obj["step"] = step
            if obj.get("skipped") is True:
                record.skipped.append(obj)
            elif "health" in obj:
                record.health_events.append(obj)
            elif "event" in obj:
                record.events.append(obj)
            elif any(key in obj for key in _EVAL_KEYS):
                _rewind(record.evals, step)
                record.evals.append(obj)
            elif "loss" in obj:
                if record.train and step <= record.train[-1]["step"]:
                    # A resumed or rolled-back run replays from `step`: what was logged at
                    # and after it belongs to a history the final weights did not come from.
                    record.rewinds.append(step)
                    _rewind(record.train, step)
                    _rewind(record.evals, step + 1)
                record.train.append(obj)
            # Anything else is a line kind this version does not know; ignore it.


def _rewind(series: list[dict[str, Any]], step: int) -> None:
    """Drop the lines of ``series`` at ``step`` or later (series is sorted by step)."""
    while series and series[-1]["step"] >= step:
        series.pop()


def _step(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _num(value: Any) -> float | None:
    """A metric value as a float (NaN and inf included); None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "NaN", "Infinity" from writers that quote them
        except ValueError:
            return None
    return None


def _finite(value: Any) -> float | None:
    x = _num(value)
    return x if x is not None and math.isfinite(x) else None


def _get(mapping: Any, dotted: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``; None where any level is missing."""
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _series(lines: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` over the lines that have it as a number (NaN kept)."""
    steps, values = [], []
    for line in lines:
        x = _num(line.get(key))
        if x is not None:
            steps.append(line["step"])
            values.append(x)
    return steps, values


def median_tokens_per_s(record: RunRecord) -> float | None:
    """The documented throughput figure: median tokens_per_s over training lines."""
    values = _valid_rates(record)
    # median_high, not median: an actual logged value, and the same one run.json reports.
    return statistics.median_high(values) if values else None


def _valid_rates(record: RunRecord) -> list[float]:
    _, rates = _series(record.train, "tokens_per_s")
    return [x for x in rates if math.isfinite(x) and x > 0]


# --------------------------------------------------------------------------- plots


def _new_figure(nrows: int = 1, height: float = 4.6):
    # Figure + its own canvas, not pyplot: no global backend switch in the caller's process
    # (a notebook keeps its backend), no figure registry to leak, and PNGs render with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, height), dpi=_FIG_DPI, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


def _legend(fig, ax) -> None:
    """Legend below the axes: inside, it would hide the start of a curve or a spike."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)),
                   fontsize=8, frameon=False)


def _mark_steps(ax, steps: list[int], label: str, color: str, style: str) -> None:
    """Vertical lines over the full height of ``ax`` at ``steps``, one legend entry."""
    if steps:
        ax.vlines(
            sorted(set(steps)), 0, 1, transform=ax.get_xaxis_transform(),
            colors=color, linestyles=style, linewidth=1.0, alpha=0.7,
            label=f"{label} ({len(steps)})",
        )


def _mark_nonfinite(ax, steps: list[int], label: str) -> None:
    """Crosses along the top edge where a value was NaN/inf and so cannot be drawn."""
    if steps:
        ax.plot(
            steps, [0.97] * len(steps), "x", color="red", markersize=8, mew=2,
            transform=ax.get_xaxis_transform(), label=f"{label} ({len(steps)})", clip_on=False,
        )


def _rolling_mean(values: list[float], window: int):
    """Centred moving average that ignores NaN/inf, so one bad step leaves no hole."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    ok = np.isfinite(a)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, a, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _use_log_if_wide(ax, values: Iterable[float], ratio: float = 200.0) -> None:
    # A loss that starts at 38 and ends at 3 reads best on a linear axis; one with a spike
    # to 1e4 would flatten everything else, so switch to log only for a range that wide.
    positive = [x for x in values if math.isfinite(x) and x > 0]
    if positive and max(positive) / min(positive) > ratio:
        ax.set_yscale("log")


def _plot_losses(record: RunRecord, path: Path) -> Path | None:
    terms = [
        ("loss", "total loss", "tab:blue"),
        ("kd_loss", "KD term (×T² if scaled)", "tab:green"),
        ("ce_loss", "LM cross-entropy", "tab:orange"),
    ]
    series = {key: _series(record.train, key) for key, _, _ in terms}
    if not any(series[key][0] for key, _, _ in terms):
        return None
    fig, (ax,) = _new_figure(height=5.0)
    n = len(record.train)
    # With batch size 2 the per-step loss is mostly noise; a moving average shows the trend
    # the seed's reader looks for (steady decrease, 17 -> 25 -> 17 spikes).
    window = max(1, n // 50) if n > 150 else 1
    drawn: list[float] = []  # what the log-or-linear decision looks at: trends, not noise
    for key, label, color in terms:
        steps, values = series[key]
        if not steps:
            continue
        if window > 1:
            smooth = _rolling_mean(values, window)
            drawn += list(smooth)
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth, color=color, linewidth=1.8,
                    label=f"{label} (moving avg, {window} steps)")
        else:
            drawn += values
            ax.plot(steps, values, color=color, linewidth=1.5, marker="." if n <= 60 else None,
                    label=label)
    eval_steps, eval_ce = _series(record.evals, "eval_ce_loss")
    if eval_steps:
        drawn += eval_ce
        ax.plot(eval_steps, eval_ce, "o--", color="black", markersize=4, linewidth=1,
                label="eval CE, student (held-out)")
    _use_log_if_wide(ax, drawn)
    # Skipped steps are not in the training series (the trainer logs them as skipped lines),
    # but their loss is what the reader wants to see: the spike that was refused, or the NaN.
    loss_steps, losses = series["loss"]
    skip_steps, skip_losses = _series(record.skipped, "loss")
    spikes = [(s, x) for s, x in zip(skip_steps, skip_losses) if math.isfinite(x)]
    if spikes:
        ax.plot(*zip(*spikes), "v", color="red", markersize=7,
                label=f"total loss of a skipped step ({len(spikes)})")
    _mark_nonfinite(ax, [s for s, x in zip(loss_steps + skip_steps, losses + skip_losses)
                         if not math.isfinite(x)], "non-finite total loss")
    _mark_steps(ax, [e["step"] for e in record.skipped], "skipped step", "red", "solid")
    _mark_steps(ax, [e["step"] for e in record.health_events], "health check fired",
                "darkorange", "dashed")
    _mark_steps(ax, [e["step"] for e in record.events], "guard event (spike / rollback)",
                "purple", "dashdot")
    ax.set_title(f"{record.name}: training loss terms")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


def _plot_schedule(record: RunRecord, path: Path) -> Path | None:
    t_steps, temps = _series(record.train, "temperature")
    lr_steps, lrs = _series(record.train, "lr")
    if not t_steps and not lr_steps:
        return None
    fig, (ax_t, ax_lr) = _new_figure(nrows=2, height=5.6)
    if t_steps:
        ax_t.plot(t_steps, temps, color="tab:red", linewidth=1.8)
    else:
        ax_t.text(0.5, 0.5, "no temperature logged", ha="center", transform=ax_t.transAxes)
    ax_t.set_ylabel("KD temperature T")
    ax_t.set_title(f"{record.name}: KD temperature and learning rate schedules")
    ax_t.grid(True, alpha=0.3)
    if lr_steps:
        ax_lr.plot(lr_steps, lrs, color="tab:purple", linewidth=1.8)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        ax_lr.text(0.5, 0.5, "no learning rate logged", ha="center", transform=ax_lr.transAxes)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(True, alpha=0.3)
    return _save(fig, path)


def _plot_grad_norm(record: RunRecord, path: Path) -> Path | None:
    steps, norms = _series(record.train, "grad_norm")
    if not steps:
        return None
    fig, (ax,) = _new_figure()
    good = [(s, x) for s, x in zip(steps, norms) if math.isfinite(x) and x > 0]
    if good:
        ax.plot(*zip(*good), color="tab:blue", linewidth=1.0,
                marker="." if len(good) <= 60 else None,
                label="global gradient norm (before clipping)")
        ax.set_yscale("log")
    clip = _finite(_get(record.config, "train.max_grad_norm"))
    if clip and clip > 0:
        ax.axhline(clip, color="gray", linestyle="--", linewidth=1,
                   label=f"clip threshold {clip:g}")
    _mark_nonfinite(ax, [s for s, x in zip(steps, norms) if not math.isfinite(x)],
                    "non-finite gradient norm")
    _mark_steps(ax, [e["step"] for e in record.skipped], "skipped step", "red", "solid")
    ax.set_title(f"{record.name}: global gradient norm (log scale)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("L2 norm of all gradients")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


def _plot_perplexity(record: RunRecord, path: Path) -> Path | None:
    s_steps, s_ppl = _series(record.evals, "eval_ppl")
    t_steps, t_ppl = _series(record.evals, "teacher_ppl")
    if not s_steps and not t_steps:
        return None
    fig, (ax,) = _new_figure()
    s_good = [(s, x) for s, x in zip(s_steps, s_ppl) if math.isfinite(x) and x > 0]
    t_good = [(s, x) for s, x in zip(t_steps, t_ppl) if math.isfinite(x) and x > 0]
    if s_good:
        ax.plot(*zip(*s_good), "o-", color="tab:blue", markersize=4, label="student")
        # Label both ends with the printed numbers so the plot and report.md agree at a glance.
        for s, x in {s_good[0], s_good[-1]}:
            ax.annotate(f"{x:.4g}", (s, x), textcoords="offset points", xytext=(4, 6), fontsize=8)
    if t_good:
        ax.plot(*zip(*t_good), "s--", color="tab:gray", markersize=3, label="teacher")
    if s_good or t_good:
        ax.set_yscale("log")
    _mark_nonfinite(ax, [s for s, x in zip(s_steps, s_ppl) if not math.isfinite(x)],
                    "non-finite student perplexity")
    ax.set_title(f"{record.name}: held-out perplexity (exp of token-mean CE, log scale)")
    ax.set_xlabel("optimizer step (step 0 = student before distillation)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


def _plot_throughput(record: RunRecord, path: Path) -> Path | None:
    steps, rates = _series(record.train, "tokens_per_s")
    good = [(s, x) for s, x in zip(steps, rates) if math.isfinite(x)]
    if not good:
        return None
    fig, (ax,) = _new_figure(height=4.0)
    ax.plot(*zip(*good), color="tab:green", linewidth=1.0, marker="." if len(good) <= 60 else None)
    median = median_tokens_per_s(record)
    if median is not None:
        ax.axhline(median, color="black", linestyle="--", linewidth=1,
                   label=f"median {median:,.0f} tokens/s")
        _legend(fig, ax)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{record.name}: training throughput")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens/s")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


_PLOTTERS = {
    "losses.png": _plot_losses,
    "schedule.png": _plot_schedule,
    "grad_norm.png": _plot_grad_norm,
    "perplexity.png": _plot_perplexity,
    "throughput.png": _plot_throughput,
}


def write_plots(run_dir: Path) -> list[Path]:
    """Write the run's PNG plots into ``run_dir/plots/``; return the paths written.

    A plot whose data is absent (no eval lines yet, no gradient norms logged) is skipped,
    and a PNG of that name left by an earlier call is removed, so plots/ matches the data.
    """
    return _write_plots(load_run(run_dir))


def _write_plots(record: RunRecord) -> list[Path]:
    plot_dir = record.run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    written = []
    for name, plot in _PLOTTERS.items():
        path = plot_dir / name
        if plot(record, path) is not None:
            written.append(path)
        elif path.exists():
            path.unlink()
    return written


# --------------------------------------------------------------------------- formatting


def _fmt_ppl(x: Any) -> str:
    """Perplexity: 4 significant digits, never capped (2.3e+12 stays 2.3e+12)."""
    v = _num(x)
    return _DASH if v is None else f"{v:.4g}"


def _fmt_temp(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None else f"{v:.3f}"


def _fmt_loss(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None else f"{v:.4f}"


def _fmt_pct(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None else f"{100 * v:.2f} %"


def _fmt_rate(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None or not math.isfinite(v) else f"{v:,.0f}"


def _fmt_params(x: Any) -> str:
    v = _finite(x)
    if v is None:
        return _DASH
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def _fmt_duration(seconds: Any) -> str:
    v = _finite(seconds)
    if v is None:
        return _DASH
    if v < 60:
        return f"{v:.1f} s"
    minutes, secs = divmod(round(v), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def _fmt_value(x: Any) -> str:
    if x is None:
        return _DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def _fmt_steps(steps: Iterable[Any], limit: int = 8) -> str:
    steps = list(steps)
    if not steps:
        return _DASH
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" (+{len(steps) - limit} more)" if len(steps) > limit else "")


def _cell(text: Any) -> str:
    """Text safe inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") if text not in (None, "") else _DASH


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------- report


def _status_line(record: RunRecord) -> tuple[str, str]:
    """A short status for the title and a sentence that says what the report covers."""
    last = record.last_step
    upto = f"up to step {last}" if last is not None else "which has no step logged yet"
    reason = (record.run_info or {}).get("exit_reason")
    why = f": {reason}" if reason else ""
    status = record.status
    if status == "finished":
        return "finished", f"The run finished{why}."
    if status in ("stopped", "failed"):
        return status, (
            f"The run {status} before the end{why}. It did not finish; this report covers "
            f"what it wrote, {upto}."
        )
    if status == "running":
        return "running or killed", (
            "run.json says the run is still running: either it is, or it was killed. It has not "
            f"finished; this report covers what was on disk when it was written, {upto}."
        )
    if status is None:
        return "did not finish", (
            "The run did not finish: there is no readable run.json, so it was killed (or is in "
            f"its first steps). This report covers what is on disk, {upto}."
        )
    return status, f"run.json status `{status}`{why}; this report covers what is on disk, {upto}."


def _model_rows(record: RunRecord) -> tuple[list[list[Any]], str | None]:
    info = record.run_info or {}
    rows = []
    params = {}
    for role in ("teacher", "student"):
        m = info.get(role) if isinstance(info.get(role), dict) else {}
        name = m.get("name") or _get(record.config, f"model.{role}") or _get(
            record.config, f"model.{role}_name")
        if role in info and info[role] is None:
            name = "none (plain language-model training, no KD)"
        elif name is None and not m and isinstance(record.config.get("model"), dict):
            # config.yaml says null: the embedded default teacher, or a student built fresh.
            name = ("embedded default teacher" if role == "teacher"
                    else "new, built from model.student_config")
        params[role] = _finite(m.get("params"))
        rows.append([role, _fmt_value(name), _fmt_value(m.get("architecture")),
                     _fmt_value(m.get("num_layers")),
                     _fmt_value(m.get("hidden_size")), _fmt_params(m.get("params")),
                     _fmt_value(m.get("vocab_size"))])
    ratio = None
    if params["teacher"] and params["student"]:
        ratio = (f"Compression: the student has {params['student'] / params['teacher']:.3g} of the "
                 f"teacher's parameters ({params['teacher'] / params['student']:.3g}× smaller).")
    return rows, ratio


def _config_rows(record: RunRecord) -> list[list[Any]]:
    cfg = record.config
    t_start, t_end = _get(cfg, "distill.temperature"), _get(cfg, "distill.min_temperature")
    t_steps, temps = _series(record.train, "temperature")
    observed = _DASH
    if t_steps:
        observed = (f"{_fmt_temp(temps[0])} at step {t_steps[0]} → {_fmt_temp(temps[-1])} "
                    f"at step {t_steps[-1]}")
    scale = _get(cfg, "distill.scale_by_t2")
    return [
        ["KD temperature (configured start → end)",
         f"{_fmt_value(t_start)} → {_fmt_value(t_end)}"],
        ["KD temperature (logged)", observed],
        ["KD weight (share of the KD term in the loss)",
         _fmt_value(_get(cfg, "distill.kd_weight"))],
        ["divergence", _fmt_value(_get(cfg, "distill.divergence"))],
        ["KD term multiplied by T²", _fmt_value(scale)],
        ["learning rate (peak)", _fmt_value(_get(cfg, "train.lr"))],
        ["batch size (sequences)", _fmt_value(_get(cfg, "train.batch_size"))],
        ["epochs", _fmt_value(_get(cfg, "train.epochs"))],
        ["max steps", _fmt_value(_get(cfg, "train.max_steps"))],
        ["steps logged", _fmt_value(record.train[-1]["step"] if record.train else None)],
    ]


def _data_rows(record: RunRecord) -> list[list[Any]]:
    data = (record.run_info or {}).get("data")
    data = data if isinstance(data, dict) else {}
    cfg = record.config
    source = data.get("source") or _get(cfg, "data.source") or _get(cfg, "data.path") or _get(
        cfg, "data.dataset")
    return [
        ["source", _fmt_value(source)],
        ["block size (tokens)", _fmt_value(data.get("block_size") or _get(cfg, "data.block_size"))],
        ["training blocks", _fmt_value(data.get("train_blocks"))],
        ["evaluation blocks", _fmt_value(data.get("eval_blocks"))],
        ["training tokens", _fmt_value(data.get("train_tokens"))],
    ]


def _final_table(record: RunRecord) -> list[str]:
    before, after = record.initial_eval or {}, record.final_eval or {}
    after_step = after.get("step")
    header = ["metric", "student before (step 0)",
              f"student after (step {after_step if after_step is not None else '?'})", "teacher"]
    rows = [
        ["perplexity (exp of eval CE)", _fmt_ppl(before.get("eval_ppl")),
         _fmt_ppl(after.get("eval_ppl")), _fmt_ppl(after.get("teacher_ppl"))],
        ["eval CE (nats/token)", _fmt_loss(before.get("eval_ce_loss")),
         _fmt_loss(after.get("eval_ce_loss")), _fmt_loss(after.get("teacher_ce_loss"))],
        ["KD term on eval data, as trained (eval_kd_loss)",
         _fmt_loss(before.get("eval_kd_loss")), _fmt_loss(after.get("eval_kd_loss")), _DASH],
        ["KL(teacher ‖ student) at T=1, nats/token (eval_kl)", _fmt_loss(before.get("eval_kl")),
         _fmt_loss(after.get("eval_kl")), _DASH],
        ["top-1 agreement with the teacher", _fmt_pct(before.get("top1_agreement")),
         _fmt_pct(after.get("top1_agreement")), _DASH],
    ]
    return _table(header, rows)


def _run_rows(record: RunRecord) -> list[list[Any]]:
    info = record.run_info or {}
    tps = median_tokens_per_s(record)
    if tps is not None:
        tps_text = f"{_fmt_rate(tps)} (median of {len(_valid_rates(record))} training lines)"
    elif _finite(_get(info, "final.tokens_per_s")) is not None:
        tps_text = (f"{_fmt_rate(_get(info, 'final.tokens_per_s'))} "
                    "(from run.json; none in metrics.jsonl)")
    else:
        tps_text = _DASH
    wall = info.get("wall_time_s")
    wall_text = _fmt_duration(wall) if wall is not None else (
        "unknown (no run.json)" if record.run_info is None else _DASH)
    losses = [(line["step"], _num(line.get("loss"))) for line in record.train
              if _num(line.get("loss")) is not None]
    finite_losses = [(s, x) for s, x in losses if math.isfinite(x)]
    rows = [
        ["training throughput (tokens/s)", tps_text],
        ["wall time", wall_text],
        ["started / finished",
         f"{_fmt_value(info.get('started_at'))} / {_fmt_value(info.get('finished_at'))}"],
    ]
    if finite_losses:
        (s0, l0), (s1, l1) = finite_losses[0], finite_losses[-1]
        rows.append(["total loss, first → last logged",
                     f"{l0:.4f} (step {s0}) → {l1:.4f} (step {s1})"])
    # The seed's "any NaN warning": count skipped lines too, that is where a guarded run's
    # NaN losses are logged.
    bad = sorted(line["step"] for line in record.train + record.skipped
                 if (x := _num(line.get("loss"))) is not None and not math.isfinite(x))
    rows.append(["steps with a non-finite total loss",
                 f"{_fmt_steps(bad)} ({len(bad)} in all)" if bad else "none"])
    return rows


def _temperature_table(record: RunRecord, max_rows: int = 7) -> list[str]:
    """The seed's trajectory table: a few steps with T, the losses and perplexity."""
    anchors = record.evals if record.evals else record.train
    if not anchors:
        return ["No training or evaluation lines yet."]
    if len(anchors) > max_rows:
        # A fixed stride keeps the rows evenly spaced (0, 5000, 10000, ... as in the seed's
        # table); the last line is always kept, it is the final state.
        stride = math.ceil((len(anchors) - 1) / (max_rows - 1))
        picks = sorted(set(range(0, len(anchors), stride)) | {len(anchors) - 1})
        anchors = [anchors[i] for i in picks]
    header = ["step", "temperature T", "total loss", "KD term", "LM CE", "eval CE (nats/token)",
              "student ppl"]
    rows = []
    for anchor in anchors:
        step = anchor["step"]
        train = _train_line_at(record, step)
        ev = anchor if record.evals else None
        rows.append([
            step,
            _fmt_temp(train.get("temperature")) if train else _DASH,
            _fmt_loss(train.get("loss")) if train else _DASH,
            _fmt_loss(train.get("kd_loss")) if train else _DASH,
            _fmt_loss(train.get("ce_loss")) if train else _DASH,
            _fmt_loss(ev.get("eval_ce_loss")) if ev else _DASH,
            _fmt_ppl(ev.get("eval_ppl")) if ev else _DASH,
        ])
    lines = _table(header, rows)
    if record.evals:
        lines += ["", "Rows are evaluation steps. The training columns come from the training "
                      "line at that step or the nearest earlier one; for step 0, which is "
                      "evaluated before any training, from the first training line."]
    return lines


def _train_line_at(record: RunRecord, step: int) -> dict[str, Any] | None:
    best = None
    for line in record.train:
        if line["step"] <= step:
            best = line
        else:
            break
    return best if best is not None else (record.train[0] if record.train else None)


def _health_section(record: RunRecord) -> list[str]:
    if record.health is not None:
        checks = [c for c in record.health.get("checks", []) if isinstance(c, dict)]
        fired = [c for c in checks if c.get("status") == "fired"]
        verdict = record.health.get("verdict", _DASH)
        rows = []
        for c in checks:
            status = str(c.get("status", _DASH)).replace("_", " ")
            messages = c.get("messages") or []
            rows.append([
                f"`{c.get('name', '?')}`", c.get("description"),
                f"**{status}**" if status == "fired" else status,
                _fmt_steps(c.get("steps") or []),
                messages[0] if messages else None,
            ])
        return [f"**Verdict: {verdict}** ({len(fired)} of {len(checks)} checks fired).", ""] + \
            _table(["check", "what it watches", "result", "at steps", "first message"], rows)

    # No health.json: the verdict is written when the run ends, but the events that would
    # have led to it are already in metrics.jsonl.
    lines = ["No verdict: health.json is missing or unreadable (it is written when the run "
             "ends, so a killed run has none).", ""]
    if not record.health_events:
        return lines + ["No health events in metrics.jsonl."]
    shown = record.health_events[:20]
    lines += [f"Health events in metrics.jsonl so far ({len(record.health_events)}):", ""]
    lines += _table(["step", "check", "message"],
                    [[e["step"], f"`{e.get('health')}`", e.get("message")] for e in shown])
    if len(record.health_events) > len(shown):
        lines += ["", f"… and {len(record.health_events) - len(shown)} more."]
    return lines


def _steps_section(record: RunRecord) -> list[str]:
    n = len(record.skipped)
    lines = [f"Skipped steps (no optimizer update; weights and optimizer state untouched): "
             f"**{n}**."]
    if n:
        by_reason: dict[str, list[int]] = {}
        for e in record.skipped:
            by_reason.setdefault(str(e.get("reason", "unknown")), []).append(e["step"])
        rows = [[f"`{reason}`", len(steps), _fmt_steps(steps)]
                for reason, steps in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]
        lines += [""] + _table(["reason", "count", "steps"], rows)
    if record.events:
        by_kind: dict[str, list[int]] = {}
        for e in record.events:
            by_kind.setdefault(str(e.get("event")), []).append(e["step"])
        parts = [f"{kind} × {len(steps)} (steps {_fmt_steps(steps)})"
                 for kind, steps in sorted(by_kind.items(), key=lambda kv: -len(kv[1]))]
        lines += ["", "Guard events: " + ", ".join(parts) + "."]
    return lines


def _notes(record: RunRecord) -> list[str]:
    notes = list(record.problems)
    if not (record.run_dir / "metrics.jsonl").is_file():
        notes.append("metrics.jsonl is missing: no step was logged")
    if record.unreadable_lines:
        last_only = record.unreadable_lines == [record.metrics_last_lineno]
        what = "the last line, cut short by a killed run" if last_only else \
            f"lines {_fmt_steps(record.unreadable_lines)}"
        notes.append(f"{len(record.unreadable_lines)} of {record.metrics_lines} metrics.jsonl "
                     f"lines could not be read and were skipped ({what})")
    if record.rewinds:
        notes.append(f"the run went back {len(record.rewinds)} time(s) (resume or rollback, at "
                     f"steps {_fmt_steps(record.rewinds)}); lines it replaced are not plotted "
                     "or reported")
    return notes


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` (and the plots it links); return the report's path."""
    record = load_run(run_dir)
    plots = _write_plots(record)
    path = record.run_dir / "report.md"
    _atomic_write(path, _render_report(record, plots))
    return path


def _render_report(record: RunRecord, plots: list[Path]) -> str:
    short, sentence = _status_line(record)
    out = [f"# Distillation run `{record.name}`: {short}", "", sentence, ""]
    out += [f"Run directory: `{record.run_dir}`", ""]

    out += ["## What was distilled into what", ""]
    model_rows, ratio = _model_rows(record)
    if all(cell == _DASH for row in model_rows for cell in row[1:]):
        out.append("Not recorded: run.json, which describes the models, is missing.")
    else:
        out += _table(["role", "model", "architecture", "layers", "hidden size", "parameters",
                       "vocabulary"], model_rows)
    if ratio:
        out += ["", ratio]
    out += ["", "## Data", ""]
    data_rows = _data_rows(record)
    if all(row[1] == _DASH for row in data_rows):
        out.append("Not recorded: neither run.json nor config.yaml describes the data.")
    else:
        out += _table(["", ""], data_rows)
    out += ["", "## Key configuration", ""]
    out += _table(["setting", "value"], _config_rows(record))

    out += ["", "## Final metrics", ""]
    if record.final_eval is None:
        out.append("No evaluation yet: metrics.jsonl has no evaluation line.")
    else:
        src = "the last evaluation line of metrics.jsonl" if record.evals else "run.json (`final`)"
        out += [f"From {src}; \"before\" is the evaluation at step 0. Perplexity is exp of "
                "the token-mean cross-entropy on held-out data, printed as computed (never "
                "capped).", ""]
        out += _final_table(record)
    out += [""]
    out += _table(["run", ""], _run_rows(record))

    out += ["", "## Temperature and loss trajectory", ""]
    out += _temperature_table(record)
    out += ["", "## Health checks", ""]
    out += _health_section(record)
    out += ["", "## Skipped steps and guard events", ""]
    out += _steps_section(record)

    out += ["", "## Plots", ""]
    if plots:
        for p in plots:
            title = PLOT_FILES[p.name]
            out += [f"### {title}", "", f"![{title}](plots/{p.name})", ""]
    else:
        out += ["No plots: nothing plottable was logged yet.", ""]
    notes = _notes(record)
    if notes:
        out += ["## Notes on the files read", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- comparison


def compare_runs(run_dirs: list[Path], out_dir: Path) -> Path:
    """Overlay the runs' curves and tabulate their final metrics side by side.

    Writes ``out_dir/comparison.md`` and PNGs under ``out_dir/plots/``; returns the .md path.
    Each run's numbers come from its own files exactly as in :func:`write_report`.
    """
    if not run_dirs:
        raise LmdistillError("compare_runs: no run directories given; pass two or more runs/NAME")
    records = [load_run(d) for d in run_dirs]
    labels = _unique_labels(records)
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, (lines_of, key, log_y, ylabel) in {
        "compare_loss.png": (lambda r: r.train, "loss", False, "total training loss (nats/token)"),
        "compare_perplexity.png": (lambda r: r.evals, "eval_ppl", True, "student perplexity"),
        "compare_temperature.png": (lambda r: r.train, "temperature", False, "KD temperature T"),
        "compare_grad_norm.png": (lambda r: r.train, "grad_norm", True, "gradient norm"),
    }.items():
        path = plot_dir / name
        if _plot_overlay(records, labels, lines_of, key, log_y, ylabel,
                         COMPARE_PLOT_FILES[name], path):
            plots.append(path)
        elif path.exists():
            path.unlink()

    out = [f"# Comparison of {len(records)} distillation runs", ""]
    out += [f"- `{label}`: `{r.run_dir}` ({_status_line(r)[0]})"
            + (f", [report]({Path(os.path.relpath(r.run_dir / 'report.md', out_dir)).as_posix()})"
               if (r.run_dir / "report.md").is_file() else "")
            for r, label in zip(records, labels)]
    out += ["", "Final = each run's last evaluation line in metrics.jsonl; before = its evaluation "
                "at step 0; tokens/s = median over its training lines.", ""]
    out += _table(["", *[f"`{label}`" for label in labels]], _comparison_rows(records))
    out += ["", "## Plots", ""]
    for p in plots:
        title = COMPARE_PLOT_FILES[p.name]
        out += [f"### {title}", "", f"![{title}](plots/{p.name})", ""]
    if not plots:
        out += ["No plots: none of the runs logged plottable data.", ""]
    path = out_dir / "comparison.md"
    _atomic_write(path, "\n".join(out).rstrip() + "\n")
    return path


def _unique_labels(records: list[RunRecord]) -> list[str]:
    """Run names, made distinct: two runs of one preset share ``run.name``."""
    labels = [r.name for r in records]
    for attempt in (lambda r: r.run_dir.resolve().name,
                    lambda r: f"{r.run_dir.resolve().parent.name}/{r.run_dir.resolve().name}"):
        counts = Counter(labels)
        labels = [attempt(r) if counts[label] > 1 else label for r, label in zip(records, labels)]
    counts, seen = Counter(labels), Counter()
    out = []
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
        return lambda r: _fmt_value(_get(r.config, key))

    def model(role):
        def name(r):
            m = _get(r.run_info, role)
            return (m.get("name") if isinstance(m, dict) else None) or _fmt_value(
                _get(r.config, f"model.{role}"))
        return name

    return [
        row("status", lambda r: _status_line(r)[0]),
        row("teacher", model("teacher")),
        row("student", model("student")),
        row("KD temperature start → end",
            lambda r: f"{_fmt_value(_get(r.config, 'distill.temperature'))} → "
                      f"{_fmt_value(_get(r.config, 'distill.min_temperature'))}"),
        row("KD weight", cfg("distill.kd_weight")),
        row("divergence", cfg("distill.divergence")),
        row("KD term × T²", cfg("distill.scale_by_t2")),
        row("learning rate", cfg("train.lr")),
        row("batch size", cfg("train.batch_size")),
        row("last step", lambda r: _fmt_value(r.last_step)),
        row("student ppl before", lambda r: _fmt_ppl((r.initial_eval or {}).get("eval_ppl"))),
        row("student ppl after", final("eval_ppl", _fmt_ppl)),
        row("teacher ppl", final("teacher_ppl", _fmt_ppl)),
        row("eval CE (nats/token)", final("eval_ce_loss", _fmt_loss)),
        row("KD term on eval data (eval_kd_loss)", final("eval_kd_loss", _fmt_loss)),
        row("KL(teacher ‖ student) at T=1 (eval_kl)", final("eval_kl", _fmt_loss)),
        row("top-1 agreement", final("top1_agreement", _fmt_pct)),
        row("tokens/s (median)", lambda r: _fmt_rate(median_tokens_per_s(r))),
        row("wall time", lambda r: _fmt_duration(_get(r.run_info, "wall_time_s"))),
        row("skipped steps", lambda r: str(len(r.skipped))),
        row("health verdict", lambda r: _fmt_value((r.health or {}).get("verdict"))),
    ]


def _plot_overlay(records, labels, lines_of, key, log_y, ylabel, title, path) -> bool:
    curves = []
    for record, label in zip(records, labels):
        steps, values = _series(lines_of(record), key)
        # NaN, not a dropped point, where a value cannot be drawn: the curve shows a gap there.
        values = [x if math.isfinite(x) and (x > 0 or not log_y) else math.nan for x in values]
        if any(not math.isnan(x) for x in values):
            curves.append((label, list(zip(steps, values))))
    if not curves:
        return False
    fig, (ax,) = _new_figure()
    for label, pts in curves:
        steps, values = zip(*pts)
        if key == "loss" and len(values) > 150:
            window = len(values) // 50
            ax.plot(steps, _rolling_mean(list(values), window), linewidth=1.6,
                    label=f"{label} (moving avg, {window} steps)")
        else:
            ax.plot(steps, values, linewidth=1.5, marker="o" if key == "eval_ppl" else None,
                    markersize=3, label=label)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(f"{title}{' (log scale)' if log_y else ''}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- CLI entry


def main_report(paths: list[str]) -> int:
    """``lmdistill report RUN_DIR [RUN_DIR ...]``: write and print the report's path.

    One run: ``RUN_DIR/report.md``. Several: each run's report.md, then a comparison in
    ``<parent of the first run>/comparison-<name1>-<name2>.../comparison.md``. Returns the
    exit code (0); user errors raise ``LmdistillError``.
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
    joined = "-".join(_slug(label) for label in _unique_labels(records))
    if len(joined) > 80:  # keep the folder name usable on every filesystem
        joined = f"{_slug(records[0].name)}-and-{len(records) - 1}-more"
    out_dir = run_dirs[0].resolve().parent / f"comparison-{joined}"
    print(compare_runs(run_dirs, out_dir))
    return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
