"""report.md: one run's models, data, settings, final numbers, health and plots, in Markdown.

Where the numbers come from (all from the files on disk, never recomputed):
- "after": the last evaluation line of metrics.jsonl; "before": the one at step 0;
- tokens/s: the median of ``tokens_per_s`` over the training lines (skipped steps excluded),
  on-policy steps apart;
- perplexity is printed with 4 significant digits and never capped: 2.3e+12 stays 2.3e+12.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmdistill.core.paths import atomic_write
from lmdistill.report.plots import OPTIONAL_PLOT_FILES, PLOT_FILES, plots_for
from lmdistill.report.reading import RunRecord, get, load_run, median_tokens_per_s, num, valid_rates, value_of

DASH = "—"  # shown where a value is absent, so a table never has an empty cell


# --------------------------------------------------------------------------- formatting
def _number_format(spec: str, scale: float = 1.0, suffix: str = "", finite_only: bool = False):
    """A formatter of metric values: ``spec`` applied to ``scale * x``, the dash when absent."""

    def fmt(x: Any) -> str:
        v = num(x)
        if v is None or (finite_only and not math.isfinite(v)):
            return DASH
        return f"{scale * v:{spec}}{suffix}"

    return fmt


fmt_ppl = _number_format(".4g")  # 4 significant digits, never capped: 2.3e+12 stays 2.3e+12
fmt_temp = _number_format(".3f")
fmt_loss = _number_format(".4f")
fmt_pct = _number_format(".2f", 100, " %")
fmt_rate = _number_format(",.0f", finite_only=True)


def fmt_params(x: Any) -> str:
    v = num(x)
    if v is None:
        return DASH
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def fmt_duration(seconds: Any) -> str:
    v = num(seconds)
    if v is None:
        return DASH
    if v < 60:
        return f"{v:.1f} s"
    minutes, secs = divmod(round(v), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def fmt_value(x: Any) -> str:
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def fmt_steps(steps: Iterable[Any], limit: int = 8) -> str:
    steps = list(steps)
    if not steps:
        return DASH
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" (+{len(steps) - limit} more)" if len(steps) > limit else "")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(text: Any) -> str:  # text safe inside one Markdown table cell
        return " ".join(str(text).split()).replace("|", "\\|") if text not in (None, "") else DASH

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


# --------------------------------------------------------------------------- sections
def status_line(record: RunRecord) -> tuple[str, str]:
    """A short status for the title and a sentence that says what the report covers."""
    last = record.last_step
    upto = f"up to step {last}" if last is not None else "which has no step logged yet"
    reason = (record.run_info or {}).get("exit_reason")
    why = f": {reason}" if reason else ""
    status = record.status
    if status == "finished":
        return "finished", f"The run finished{why}."
    if status is None or status == "running":
        return "did not finish", (
            "The run did not finish: run.json is missing or still says it is running, so it was killed (or is "
            f"still going). This report covers what was on disk when it was written, {upto}."
        )
    return status, f"The run {status} before the end{why}. It did not finish; this report covers what it wrote, {upto}."


def _model_rows(record: RunRecord) -> tuple[list[list[Any]], str | None]:
    info = record.run_info or {}
    rows, params = [], {}
    for role in ("teacher", "student"):
        m = info.get(role) if isinstance(info.get(role), dict) else {}
        name = m.get("name") or get(record.config, f"model.{role}")
        cache = info.get("teacher_cache") if role == "teacher" else None
        if isinstance(cache, dict):  # no teacher model in the run: its targets come from the cache
            of = f"; teacher {cache['teacher']}" if cache.get("teacher") else ""
            name = f"teacher cache {cache.get('path')} ({cache.get('mode')}{of})"
        elif role in info and info[role] is None:
            name = "none (plain language-model training, no KD)"
        params[role] = num(m.get("params"))
        rows.append(
            [
                role,
                fmt_value(name),
                fmt_value(m.get("architecture")),
                fmt_value(m.get("num_layers")),
                fmt_value(m.get("hidden_size")),
                fmt_params(m.get("params")),
                fmt_value(m.get("vocab_size")),
            ]
        )
    ratio = None
    if params["teacher"] and params["student"]:
        ratio = (
            f"Compression: the student has {params['student'] / params['teacher']:.3g} of the teacher's "
            f"parameters ({params['teacher'] / params['student']:.3g}× smaller)."
        )
    return rows, ratio


def _config_rows(record: RunRecord) -> list[list[Any]]:
    cfg = record.config
    steps = [line["step"] for line in record.train if value_of(line, "temperature") is not None]
    temps = [value_of(line, "temperature") for line in record.train if value_of(line, "temperature") is not None]
    observed = f"{fmt_temp(temps[0])} at step {steps[0]} → {fmt_temp(temps[-1])} at step {steps[-1]}" if steps else DASH
    return [
        [
            "KD temperature (configured start → end)",
            f"{fmt_value(get(cfg, 'distill.temperature'))} → {fmt_value(get(cfg, 'distill.min_temperature'))}",
        ],
        ["KD temperature (logged)", observed],
        ["KD weight (share of the KD term in the loss)", fmt_value(get(cfg, "distill.kd_weight"))],
        ["divergence", fmt_value(get(cfg, "distill.divergence"))],
        ["KD term multiplied by T²", fmt_value(get(cfg, "distill.scale_by_t2"))],
        ["learning rate (peak)", fmt_value(get(cfg, "train.lr"))],
        ["batch size (sequences)", fmt_value(get(cfg, "train.batch_size"))],
        ["epochs", fmt_value(get(cfg, "train.epochs"))],
        ["max steps", fmt_value(get(cfg, "train.max_steps"))],
        ["optimizer steps done", fmt_value(record.train[-1]["step"] + 1 if record.train else None)],  # 0-based
    ]


def _data_rows(record: RunRecord) -> list[list[Any]]:
    data = (record.run_info or {}).get("data") or {}
    return [
        ["source", fmt_value(data.get("source") or get(record.config, "data.path"))],
        ["block size (tokens)", fmt_value(data.get("block_size") or get(record.config, "data.block_size"))],
        ["training blocks", fmt_value(data.get("train_blocks"))],
        ["evaluation blocks", fmt_value(data.get("eval_blocks"))],
        ["training tokens", fmt_value(data.get("train_tokens"))],
        [
            "target tokens: training / evaluation (tokens with a loss on them)",
            f"{fmt_value(data.get('train_targets'))} / {fmt_value(data.get('eval_targets'))}",
        ],
    ]


def _source_rows(record: RunRecord) -> list[list[Any]]:
    """One row per source: its store, format, what the loss is on, and its share of the blocks seen."""
    data = (record.run_info or {}).get("data") or {}
    shares = next((line["source_share"] for line in reversed(record.train) if "source_share" in line), {})
    rows = []
    for s in data.get("sources") or []:
        skipped = s.get("skipped_no_assistant") or 0
        rows.append(
            [
                s.get("name"),
                fmt_value(s.get("weight")),
                s.get("format"),
                s.get("loss_on"),
                fmt_value(s.get("tokens")),
                fmt_value(s.get("train_targets")),
                f"{shares[s['name']]:.1%}" if s.get("name") in shares else DASH,
                fmt_value(skipped) if skipped else "0",
                f"`{s.get('store')}`",
            ]
        )
    return rows


SOURCE_HEADER = [
    "source",
    "weight",
    "format",
    "loss on",
    "tokens",
    "training targets",
    "share of blocks seen",
    "records skipped (no assistant turn)",
    "store",
]


def _bpb_rows(before: dict, after: dict) -> list[list[str]]:
    """Across tokenizers, bits per byte of the held-out text: the one figure teacher and student
    share (their perplexities count different tokens)."""
    if "eval_bpb" not in after:
        return []
    rows = [
        [
            "bits per byte of the held-out text (compare these across tokenizers)",
            fmt_loss(before.get("eval_bpb")),
            fmt_loss(after.get("eval_bpb")),
            fmt_loss(after.get("teacher_bpb")),
        ]
    ]
    if "aligned_fraction" in after:
        share = after["aligned_fraction"]
        rows.append(["student positions aligned with a teacher position", DASH, f"{share:.1%}", DASH])
    return rows


def _final_table(record: RunRecord) -> list[str]:
    before, after = record.initial_eval or {}, record.final_eval or {}
    header = ["metric", "student before (step 0)", f"student after (step {after.get('step', '?')})", "teacher"]
    return table(header, _quality_rows(before, after) + _drafting_rows(before, after))


def _quality_rows(before: dict, after: dict) -> list[list[str]]:
    own = " (its own tokens)" if "teacher_bpb" in after else ""  # a teacher with another tokenizer
    return _bpb_rows(before, after) + [
        [
            "perplexity (exp of eval CE)",
            fmt_ppl(before.get("eval_ppl")),
            fmt_ppl(after.get("eval_ppl")),
            fmt_ppl(after.get("teacher_ppl")) + own,
        ],
        [
            "eval CE (nats/token)",
            fmt_loss(before.get("eval_ce_loss")),
            fmt_loss(after.get("eval_ce_loss")),
            fmt_loss(after.get("teacher_ce_loss")),
        ],
        [
            "KD term on eval data, as trained (eval_kd_loss)",
            fmt_loss(before.get("eval_kd_loss")),
            fmt_loss(after.get("eval_kd_loss")),
            DASH,
        ],
        [
            "KL(teacher ‖ student) at T=1, nats/token (eval_kl)",
            fmt_loss(before.get("eval_kl")),
            fmt_loss(after.get("eval_kl")),
            DASH,
        ],
        [
            "top-1 agreement with the teacher",
            fmt_pct(before.get("top1_agreement")),
            fmt_pct(after.get("top1_agreement")),
            DASH,
        ],
        [
            "expected acceptance as a draft model (speculative sampling)",
            fmt_pct(before.get("draft_acceptance")),
            fmt_pct(after.get("draft_acceptance")),
            DASH,
        ],
    ]


def _drafting_rows(before: dict, after: dict) -> list[list[str]]:
    """The student's own text judged by the teacher, and the student drafting for it, where measured."""
    rows = []
    if "gen_teacher_nll" in after:
        rows.append(
            [
                "teacher NLL of the student's own text, nats/token",
                fmt_loss(before.get("gen_teacher_nll")),
                fmt_loss(after.get("gen_teacher_nll")),
                DASH,
            ]
        )
    for mode in ("greedy", "sampled"):
        if f"draft_{mode}_speedup" not in after:
            continue
        rows.append(
            [
                f"drafting for the teacher, {mode}: draft tokens accepted per teacher forward",
                fmt_loss(before.get(f"draft_{mode}_accepted_per_forward")),
                fmt_loss(after.get(f"draft_{mode}_accepted_per_forward")),
                DASH,
            ]
        )
        rows.append(
            [
                f"drafting for the teacher, {mode}: speedup over the teacher alone (wall clock)",
                fmt_times(before.get(f"draft_{mode}_speedup")),
                fmt_times(after.get(f"draft_{mode}_speedup")),
                DASH,
            ]
        )
    return rows


def fmt_times(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}x"


def _run_rows(record: RunRecord) -> list[list[Any]]:
    info = record.run_info or {}
    tps = median_tokens_per_s(record)
    tps_text = f"{fmt_rate(tps)} (median of {len(valid_rates(record))} training lines)" if tps is not None else DASH
    wall = fmt_duration(info.get("wall_time_s")) if record.run_info is not None else "unknown (no run.json)"
    rows = [["training throughput (tokens/s)", tps_text]]
    on_policy = median_tokens_per_s(record, on_policy=True)
    if on_policy is not None:
        rows[0][0] = "training throughput of ordinary steps (tokens/s)"
        rows.append(
            [
                "throughput of on-policy steps, generation included (tokens/s)",
                f"{fmt_rate(on_policy)} (median of {len(valid_rates(record, on_policy=True))} training lines)",
            ]
        )
    rows += [
        ["wall time", wall],
        ["started / finished", f"{fmt_value(info.get('started_at'))} / {fmt_value(info.get('finished_at'))}"],
    ]
    losses = [(line["step"], value_of(line, "loss")) for line in record.train]
    finite = [(s, x) for s, x in losses if x is not None and math.isfinite(x)]
    if finite:
        (s0, l0), (s1, l1) = finite[0], finite[-1]
        rows.append(["total loss, first → last logged", f"{l0:.4f} (step {s0}) → {l1:.4f} (step {s1})"])
    # The original report's "any NaN warning": a guarded run logs its NaN losses in skipped lines.
    bad = sorted(
        line["step"]
        for line in record.train + record.skipped
        if (x := value_of(line, "loss")) is not None and not math.isfinite(x)
    )
    rows.append(["steps with a non-finite total loss", f"{fmt_steps(bad)} ({len(bad)} in all)" if bad else "none"])
    return rows


def _temperature_table(record: RunRecord, max_rows: int = 7) -> list[str]:
    """The original report's trajectory table: a few steps with T, the losses and perplexity."""
    anchors = record.evals or record.train
    if not anchors:
        return ["No training or evaluation lines yet."]
    if len(anchors) > max_rows:
        # A fixed stride keeps the rows evenly spaced (0, 5000, 10000, ... as in the original
        # report's table); the last line is always kept, it is the final state.
        stride = math.ceil((len(anchors) - 1) / (max_rows - 1))
        anchors = [anchors[i] for i in sorted(set(range(0, len(anchors), stride)) | {len(anchors) - 1})]
    hidden = any("hidden_loss" in line for line in record.train)  # the run trained a hidden-state term
    rows = []
    for anchor in anchors:
        train = _train_line_at(record, anchor["step"]) or {}
        ev = anchor if record.evals else {}
        terms = [fmt_loss(value_of(train, "kd_loss")), fmt_loss(value_of(train, "ce_loss"))]
        if hidden:
            terms.append(fmt_loss(value_of(train, "hidden_loss")))
        rows.append(
            [
                anchor["step"],
                fmt_temp(value_of(train, "temperature")),
                fmt_loss(value_of(train, "loss")),
                *terms,
                fmt_loss(ev.get("eval_ce_loss")),
                fmt_ppl(ev.get("eval_ppl")),
            ]
        )
    lines = table(
        [
            "step",
            "temperature T",
            "total loss",
            "KD term",
            "LM CE",
            *(["hidden term"] if hidden else []),
            "eval CE (nats/token)",
            "student ppl",
        ],
        rows,
    )
    if record.evals:
        lines += [
            "",
            "Rows are evaluation steps. The training columns come from the training line at that step or "
            "the nearest earlier one; for step 0, which is evaluated before any training, from the first "
            "training line.",
        ]
    return lines


def _train_line_at(record: RunRecord, step: int) -> dict[str, Any] | None:
    best = None
    for line in record.train:
        if line["step"] > step:
            break
        best = line
    return best if best is not None else (record.train[0] if record.train else None)


def _health_section(record: RunRecord) -> list[str]:
    if record.health is not None:
        checks = [c for c in record.health.get("checks", []) if isinstance(c, dict)]
        fired = [c for c in checks if c.get("status") == "fired"]
        rows = []
        for c in checks:
            status = str(c.get("status", DASH)).replace("_", " ")
            messages = c.get("messages") or []
            rows.append(
                [
                    f"`{c.get('name', '?')}`",
                    c.get("description"),
                    f"**{status}**" if status == "fired" else status,
                    fmt_steps(c.get("steps") or []),
                    messages[0] if messages else None,
                ]
            )
        return [
            f"**Verdict: {record.health.get('verdict', DASH)}** ({len(fired)} of {len(checks)} checks fired).",
            "",
        ] + table(["check", "what it watches", "result", "at steps", "first message"], rows)
    # No health.json: the verdict is written when the run ends, but the events that would
    # have led to it are already in metrics.jsonl.
    lines = ["No verdict: health.json is missing (it is written when the run ends, so a killed run has none).", ""]
    if not record.health_events:
        return lines + ["No health events in metrics.jsonl."]
    shown = record.health_events[:20]
    lines += [f"Health events in metrics.jsonl so far ({len(record.health_events)}):", ""]
    lines += table(["step", "check", "message"], [[e["step"], f"`{e.get('health')}`", e.get("message")] for e in shown])
    if len(record.health_events) > len(shown):
        lines += ["", f"… and {len(record.health_events) - len(shown)} more."]
    return lines


def _generations_section(record: RunRecord) -> list[str]:
    """On-policy runs and runs with eval.generate: the student's continuations of held-out prompts
    at each evaluation."""
    judged = [e for e in record.evals if "gen_teacher_nll" in e]
    if not judged:
        return []
    on = [line for line in record.train if line.get("on_policy")]
    steps = f"On-policy steps: **{len(on)}** of {len(record.train)} logged. " if on else ""
    lines = [
        "",
        "## The student's own text",
        "",
        f"{steps}At each evaluation the student continues the first tokens of "
        f"{judged[-1].get('gen_prompts', '?')} held-out blocks with the same seed; the teacher's NLL per "
        "written token is the teacher-judged score (lower is better).",
        "",
    ]
    lines += table(
        [
            "step",
            "teacher NLL / token",
            "student's own NLL",
            "reverse KL (difference)",
            "repeated 4-grams",
            "tokens written",
        ],
        [
            [
                e["step"],
                fmt_value(e["gen_teacher_nll"]),
                fmt_value(e.get("gen_student_nll")),
                fmt_value(e.get("gen_reverse_kl")),
                f"{100 * e.get('gen_repetition', 0):.1f}%",
                fmt_value(e.get("gen_length")),
            ]
            for e in judged
        ],
    )
    for title, e in (("before", judged[0]), ("after", judged[-1])):
        for sample in e.get("gen_samples", [])[:2]:
            lines += [
                "",
                f"*{title} (step {e['step']})*: prompt `{_one_line(sample['prompt'])}` "
                f"→ `{_one_line(sample['continuation'])}`",
            ]
    return lines


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _grouped_steps(lines: list[dict[str, Any]], key: str) -> list[tuple[str, list[int]]]:
    groups: dict[str, list[int]] = {}
    for line in lines:
        groups.setdefault(str(line.get(key, "unknown")), []).append(line["step"])
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def _steps_section(record: RunRecord) -> list[str]:
    lines = [f"Skipped steps (no optimizer update; weights and optimizer state untouched): **{len(record.skipped)}**."]
    if record.skipped:
        rows = [
            [f"`{reason}`", len(steps), fmt_steps(steps)] for reason, steps in _grouped_steps(record.skipped, "reason")
        ]
        lines += [""] + table(["reason", "count", "steps"], rows)
    if record.events:
        parts = [
            f"{kind} × {len(steps)} (steps {fmt_steps(steps)})"
            for kind, steps in _grouped_steps(record.events, "event")
        ]
        lines += ["", "Guard events: " + ", ".join(parts) + "."]
    return lines


def _notes(record: RunRecord) -> list[str]:
    notes = list(record.problems)
    if not (record.run_dir / "metrics.jsonl").is_file():
        notes.append("metrics.jsonl is missing: no step was logged")
    if record.bad_lines:
        last_only = record.bad_lines == [record.metrics_lines]
        what = "the last line, cut short by a killed run" if last_only else f"lines {fmt_steps(record.bad_lines)}"
        notes.append(
            f"{len(record.bad_lines)} of {record.metrics_lines} metrics.jsonl lines could not be read and "
            f"were skipped ({what})"
        )
    return notes


# --------------------------------------------------------------------------- the report
def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` (and the plots it links); return the report's path."""
    record = load_run(run_dir)
    plots = plots_for(record)
    return atomic_write(record.run_dir / "report.md", render_report(record, plots))


def render_report(record: RunRecord, plots: list[Path]) -> str:
    short, sentence = status_line(record)
    out = [
        f"# Distillation run `{record.name}`: {short}",
        "",
        sentence,
        "",
        f"Run directory: `{record.run_dir}`",
        "",
        "## What was distilled into what",
        "",
    ]
    model_rows, ratio = _model_rows(record)
    if record.run_info is None:
        out.append("Not recorded: run.json, which describes the models, is missing.")
    else:
        out += table(["role", "model", "architecture", "layers", "hidden size", "parameters", "vocabulary"], model_rows)
    out += ["", ratio] if ratio else []
    out += ["", "## Data", ""] + table(["", ""], _data_rows(record))
    sources = _source_rows(record)
    if sources:
        out += ["", "Sources (each tokenized once into a data store):", ""] + table(SOURCE_HEADER, sources)
    out += ["", "## Key configuration", ""] + table(["setting", "value"], _config_rows(record))
    out += ["", "## Final metrics", ""]
    if record.final_eval is None:
        out.append("No evaluation yet: metrics.jsonl has no evaluation line.")
    else:
        out += [
            'From the last evaluation line of metrics.jsonl; "before" is the evaluation at step 0. Perplexity '
            "is exp of the token-mean cross-entropy on held-out data, printed as computed (never capped).",
            "",
        ]
        out += _final_table(record)
    out += [""] + table(["run", ""], _run_rows(record))
    out += ["", "## Temperature and loss trajectory", ""] + _temperature_table(record)
    out += _generations_section(record)
    out += ["", "## Health checks", ""] + _health_section(record)
    out += ["", "## Skipped steps and guard events", ""] + _steps_section(record)
    out += ["", "## Plots", ""]
    for p in plots:
        title = {**PLOT_FILES, **OPTIONAL_PLOT_FILES}[p.name]
        out += [f"### {title}", "", f"![{title}](plots/{p.name})", ""]
    if not plots:
        out += ["No plots: nothing plottable was logged yet.", ""]
    notes = _notes(record)
    if notes:
        out += ["## Notes on the files read", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out).rstrip() + "\n"
