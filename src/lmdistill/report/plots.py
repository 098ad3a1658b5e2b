"""PNG plots of one run (``plots/``) and overlays of several (the comparison)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

from lmdistill.core.paths import atomic_write
from lmdistill.report.reading import RunRecord, get, load_run, median_tokens_per_s, num, series

# File name -> heading in report.md, in report order.
PLOT_FILES: dict[str, str] = {
    "losses.png": "Training loss terms",
    "schedule.png": "KD temperature and learning rate",
    "grad_norm.png": "Gradient norm",
    "perplexity.png": "Held-out perplexity: student vs teacher",
    "throughput.png": "Throughput",
}
# Plots of what only some runs log: on-policy runs judge the student's own text.
OPTIONAL_PLOT_FILES: dict[str, str] = {
    "generations.png": "The student's own text, judged by the teacher",
}
COMPARE_PLOT_FILES: dict[str, str] = {
    "compare_loss.png": "Training loss",
    "compare_perplexity.png": "Held-out student perplexity",
    "compare_temperature.png": "KD temperature",
    "compare_grad_norm.png": "Gradient norm",
}
_FIG_DPI = 110


def _new_figure(nrows: int = 1, height: float = 4.6):
    # A Figure with its own canvas, not pyplot: no global backend switch in the caller's
    # process (a notebook keeps its backend) and no figure registry to leak.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, height), dpi=_FIG_DPI, layout="constrained")
    return fig, list(fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0])


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))  # a reader never sees half a PNG


def _legend(fig, ax) -> None:
    """Legend below the axes: inside, it would hide the start of a curve or a spike."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), fontsize=8, frameon=False)


def _mark_steps(ax, steps: list[int], label: str, color: str, style: str) -> None:
    """Vertical lines over the full height of ``ax`` at ``steps``, one legend entry."""
    if steps:
        ax.vlines(
            sorted(set(steps)),
            0,
            1,
            transform=ax.get_xaxis_transform(),
            colors=color,
            linestyles=style,
            linewidth=1.0,
            alpha=0.7,
            label=f"{label} ({len(steps)})",
        )


def _mark_nonfinite(ax, steps: list[int], label: str) -> None:
    """Crosses along the top edge where a value was NaN/inf and so cannot be drawn."""
    if steps:
        ax.plot(
            steps,
            [0.97] * len(steps),
            "x",
            color="red",
            markersize=8,
            mew=2,
            transform=ax.get_xaxis_transform(),
            label=f"{label} ({len(steps)})",
            clip_on=False,
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


def _finish_axes(fig, ax, title: str, ylabel: str, *, legend: bool = True, xlabel: str = "optimizer step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        _legend(fig, ax)


def _plot_losses(record: RunRecord, path: Path) -> Path | None:
    terms = [
        ("loss", "total loss", "tab:blue"),
        ("kd_loss", "KD term (×T² if scaled)", "tab:green"),
        ("ce_loss", "LM cross-entropy", "tab:orange"),
        ("hidden_loss", "hidden-state term", "tab:purple"),
    ]
    curves = {key: series(record.train, key) for key, _, _ in terms}
    if not any(curves[key][0] for key, _, _ in terms):
        return None
    fig, (ax,) = _new_figure(height=5.0)
    n = len(record.train)
    # With batch size 2 the per-step loss is mostly noise; a moving average shows the trend
    # the original report's reader looks for (steady decrease, 17 -> 25 -> 17 spikes).
    window = max(1, n // 50) if n > 150 else 1
    drawn: list[float] = []  # what the log-or-linear decision looks at: trends, not noise
    for key, label, color in terms:
        steps, values = curves[key]
        if not steps:
            continue
        if window > 1:
            smooth = _rolling_mean(values, window)
            drawn += list(smooth)
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth, color=color, linewidth=1.8, label=f"{label} (moving avg, {window} steps)")
        else:
            drawn += values
            ax.plot(steps, values, color=color, linewidth=1.5, marker="." if n <= 60 else None, label=label)
    eval_steps, eval_ce = series(record.evals, "eval_ce_loss")
    if eval_steps:
        drawn += eval_ce
        ax.plot(
            eval_steps, eval_ce, "o--", color="black", markersize=4, linewidth=1, label="eval CE, student (held-out)"
        )
    _use_log_if_wide(ax, drawn)
    # A skipped step's loss is in its skipped line: the spike that was refused, or the NaN.
    loss_steps, losses = curves["loss"]
    skip_steps, skip_losses = series(record.skipped, "loss")
    refused = [(s, x) for s, x in zip(skip_steps, skip_losses) if math.isfinite(x)]
    if refused:
        ax.plot(*zip(*refused), "v", color="red", markersize=7, label=f"total loss of a skipped step ({len(refused)})")
    _mark_nonfinite(
        ax,
        [s for s, x in zip(loss_steps + skip_steps, losses + skip_losses) if not math.isfinite(x)],
        "non-finite total loss",
    )
    _mark_steps(ax, [e["step"] for e in record.skipped], "skipped step", "red", "solid")
    _mark_steps(ax, [e["step"] for e in record.health_events], "health check fired", "darkorange", "dashed")
    _mark_steps(ax, [e["step"] for e in record.events], "guard event (rollback)", "purple", "dashdot")
    _finish_axes(fig, ax, f"{record.name}: training loss terms", "loss (nats/token)")
    return _save(fig, path)


def _plot_schedule(record: RunRecord, path: Path) -> Path | None:
    t_steps, temps = series(record.train, "temperature")
    lr_steps, lrs = series(record.train, "lr")
    if not t_steps and not lr_steps:
        return None
    fig, (ax_t, ax_lr) = _new_figure(nrows=2, height=5.6)
    for ax, steps, values, color, what in (
        (ax_t, t_steps, temps, "tab:red", "temperature"),
        (ax_lr, lr_steps, lrs, "tab:purple", "learning rate"),
    ):
        if steps:
            ax.plot(steps, values, color=color, linewidth=1.8)
        else:
            ax.text(0.5, 0.5, f"no {what} logged", ha="center", transform=ax.transAxes)
        ax.grid(True, alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_t.set_ylabel("KD temperature T")
    ax_t.set_title(f"{record.name}: KD temperature and learning rate schedules")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    return _save(fig, path)


def _plot_grad_norm(record: RunRecord, path: Path) -> Path | None:
    steps, norms = series(record.train, "grad_norm")
    if not steps:
        return None
    fig, (ax,) = _new_figure()
    good = [(s, x) for s, x in zip(steps, norms) if math.isfinite(x) and x > 0]
    if good:
        ax.plot(
            *zip(*good),
            color="tab:blue",
            linewidth=1.0,
            marker="." if len(good) <= 60 else None,
            label="global gradient norm (before clipping)",
        )
        ax.set_yscale("log")
    clip = num(get(record.config, "train.max_grad_norm"))
    if clip and clip > 0:
        ax.axhline(clip, color="gray", linestyle="--", linewidth=1, label=f"clip threshold {clip:g}")
    _mark_nonfinite(ax, [s for s, x in zip(steps, norms) if not math.isfinite(x)], "non-finite gradient norm")
    _mark_steps(ax, [e["step"] for e in record.skipped], "skipped step", "red", "solid")
    _finish_axes(fig, ax, f"{record.name}: global gradient norm (log scale)", "L2 norm of all gradients")
    return _save(fig, path)


def _plot_perplexity(record: RunRecord, path: Path) -> Path | None:
    s_steps, s_ppl = series(record.evals, "eval_ppl")
    t_steps, t_ppl = series(record.evals, "teacher_ppl")
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
    _mark_nonfinite(ax, [s for s, x in zip(s_steps, s_ppl) if not math.isfinite(x)], "non-finite student perplexity")
    _finish_axes(
        fig,
        ax,
        f"{record.name}: held-out perplexity (exp of token-mean CE, log scale)",
        "perplexity",
        xlabel="optimizer step (step 0 = student before distillation)",
    )
    return _save(fig, path)


def _plot_throughput(record: RunRecord, path: Path) -> Path | None:
    steps, rates = series(record.train, "tokens_per_s")
    good = [(s, x) for s, x in zip(steps, rates) if math.isfinite(x)]
    if not good:
        return None
    fig, (ax,) = _new_figure(height=4.0)
    ax.plot(*zip(*good), color="tab:green", linewidth=1.0, marker="." if len(good) <= 60 else None)
    median = median_tokens_per_s(record)
    if median is not None:
        ax.axhline(median, color="black", linestyle="--", linewidth=1, label=f"median {median:,.0f} tokens/s")
    ax.set_ylim(bottom=0)
    _finish_axes(fig, ax, f"{record.name}: training throughput", "tokens/s", legend=median is not None)
    return _save(fig, path)


def _plot_generations(record: RunRecord, path: Path) -> Path | None:
    steps, teacher = series(record.evals, "gen_teacher_nll")
    if not steps:
        return None
    _, student = series(record.evals, "gen_student_nll")
    fig, (ax,) = _new_figure(height=4.0)
    ax.plot(steps, teacher, "o-", color="tab:red", markersize=4, label="teacher NLL (teacher-judged score)")
    if len(student) == len(steps):
        ax.plot(steps, student, "s--", color="tab:blue", markersize=3, label="student's own NLL")
    _finish_axes(
        fig,
        ax,
        f"{record.name}: NLL per token of the student's continuations of held-out prompts (lower is better)",
        "nats/token",
        xlabel="optimizer step (step 0 = student before distillation)",
    )
    return _save(fig, path)


_PLOTTERS: dict[str, Callable[[RunRecord, Path], Path | None]] = {
    "losses.png": _plot_losses,
    "schedule.png": _plot_schedule,
    "grad_norm.png": _plot_grad_norm,
    "perplexity.png": _plot_perplexity,
    "throughput.png": _plot_throughput,
    "generations.png": _plot_generations,
}


def write_plots(run_dir: Path) -> list[Path]:
    """Write the run's PNG plots into ``run_dir/plots/``; return the paths written."""
    return plots_for(load_run(run_dir))


def plots_for(record: RunRecord) -> list[Path]:
    """The plots of ``record``. A plot whose data is absent (no eval lines yet) is skipped, and a
    PNG of that name left by an earlier call is removed, so plots/ matches the data."""
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


def plot_overlay(
    records: list[RunRecord], labels: list[str], lines_of, key: str, log_y: bool, ylabel: str, title: str, path: Path
) -> bool:
    """One curve per run; False (nothing written) when no run has a drawable value."""
    curves = []
    for record, label in zip(records, labels):
        steps, values = series(lines_of(record), key)
        # NaN, not a dropped point, where a value cannot be drawn: the curve shows a gap there.
        values = [x if math.isfinite(x) and (x > 0 or not log_y) else math.nan for x in values]
        if any(not math.isnan(x) for x in values):
            curves.append((label, steps, values))
    if not curves:
        return False
    fig, (ax,) = _new_figure()
    for label, steps, values in curves:
        if key == "loss" and len(values) > 150:
            window = len(values) // 50
            ax.plot(steps, _rolling_mean(values, window), linewidth=1.6, label=f"{label} (moving avg, {window} steps)")
        else:
            ax.plot(steps, values, linewidth=1.5, marker="o" if key == "eval_ppl" else None, markersize=3, label=label)
    if log_y:
        ax.set_yscale("log")
    _finish_axes(fig, ax, f"{title}{' (log scale)' if log_y else ''}", ylabel)
    _save(fig, path)
    return True
