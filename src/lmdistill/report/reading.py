"""Reading a run directory into a ``RunRecord``: what the report and the comparison show.

Only files the trainer writes are read (see ``rundir.py``): config.yaml, metrics.jsonl
through ``metrics.read_metrics``, and run.json / health.json, which are written
atomically at the start and the end of a run. A killed run has no health.json and a
run.json that still says "running"; its metrics.jsonl may end in a line cut short.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmdistill.config import parse_yaml
from lmdistill.core.errors import ConfigError, LmdistillError
from lmdistill.report.metrics import read_metrics

EVAL_KEYS = ("eval_ce_loss", "eval_ppl", "eval_kd_loss", "eval_kl", "teacher_ppl", "top1_agreement")
_RUN_FILES = ("metrics.jsonl", "config.yaml", "run.json")


@dataclass
class RunRecord:
    """One run directory, parsed: the metrics lines sorted by kind, and the JSON/YAML files.

    ``config``, ``health`` and ``run_info`` are the parsed config.yaml, health.json and
    run.json; empty or None when the file is missing (a killed run has no health.json).
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
    bad_lines: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str | None:
        """run.json's status ("running", "finished", "stopped", ...), None without run.json."""
        return (self.run_info or {}).get("status")

    @property
    def last_step(self) -> int | None:
        steps = [line["step"] for line in self.train + self.evals]
        return max(steps) if steps else None

    @property
    def initial_eval(self) -> dict[str, Any] | None:
        """The evaluation of the student before training (the eval line at step 0)."""
        return self.evals[0] if self.evals and self.evals[0]["step"] == 0 else None

    @property
    def final_eval(self) -> dict[str, Any] | None:
        """The last evaluation line."""
        return self.evals[-1] if self.evals else None


def load_run(run_dir: Path | str) -> RunRecord:
    """Read a run directory; ``LmdistillError`` if it is not one."""
    run_dir = Path(run_dir)
    hint = "pass the directory a training run wrote (runs/NAME)"
    if not run_dir.exists():
        raise LmdistillError(f"{run_dir}: no such run directory; {hint}")
    if not run_dir.is_dir():
        raise LmdistillError(f"{run_dir}: is a file, not a run directory; {hint}")
    if not any((run_dir / name).is_file() for name in _RUN_FILES):
        raise LmdistillError(f"{run_dir}: not a run directory (it has none of {', '.join(_RUN_FILES)}); {hint}")
    problems: list[str] = []
    config = _read_file(run_dir / "config.yaml", lambda text: parse_yaml(text, "config.yaml"), problems) or {}
    if not all(isinstance(section, dict) or section is None for section in config.values()):
        problems.append("config.yaml does not hold a mapping of sections (run:, model:, ...); treated as missing")
        config = {}
    name = get(config, "run.name")
    record = RunRecord(
        run_dir=run_dir,
        name=str(name) if name else run_dir.resolve().name,
        config=config,
        run_info=_read_file(run_dir / "run.json", json.loads, problems),
        health=_read_file(run_dir / "health.json", json.loads, problems),
        problems=problems,
    )
    _sort_metrics(run_dir / "metrics.jsonl", record)
    return record


def _read_file(path: Path, parse, problems: list[str]) -> dict | None:
    """A mapping parsed from ``path``; None (with a note) when it is missing or unreadable."""
    if not path.is_file():
        if path.name == "config.yaml":
            problems.append("config.yaml is missing")
        return None
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError, ConfigError) as err:
        problems.append(f"{path.name} could not be parsed ({type(err).__name__}); treated as missing")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not hold a mapping; treated as missing")
        return None
    return data


def _sort_metrics(path: Path, record: RunRecord) -> None:
    """Sort the metrics lines by kind; lines that do not parse are counted, not used."""
    if not path.is_file():
        return
    lines = read_metrics(path, bad_lines=record.bad_lines)
    record.metrics_lines = len(lines) + len(record.bad_lines)
    for line in lines:
        if not isinstance(line.get("step"), int):
            continue
        if line.get("skipped") is True:
            record.skipped.append(line)
        elif "health" in line:
            record.health_events.append(line)
        elif "event" in line:
            record.events.append(line)
        elif any(key in line for key in EVAL_KEYS):
            record.evals.append(line)
        elif "loss" in line:
            record.train.append(line)


def num(value: Any) -> float | None:
    """A metric as a float; None when absent or not a number. Non-finite values are
    written as null (with the term named in the line's ``nonfinite`` list) and read as NaN."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def value_of(line: dict[str, Any], key: str) -> float | None:
    """``line[key]`` as a float; NaN where the writer recorded the term as non-finite."""
    if line.get(key) is None and key in (line.get("nonfinite") or ()):
        return math.nan
    return num(line.get(key))


def series(lines: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` over the lines that have it (NaN kept)."""
    steps, values = [], []
    for line in lines:
        x = value_of(line, key)
        if x is not None:
            steps.append(line["step"])
            values.append(x)
    return steps, values


def get(mapping: Any, dotted: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``; None where any level is missing."""
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def valid_rates(record: RunRecord, on_policy: bool = False) -> list[float]:
    """tokens_per_s of the training lines of one kind: ordinary steps, or on-policy steps (whose
    time includes generation; the two are kept apart, as in run.json)."""
    _, rates = series([line for line in record.train if bool(line.get("on_policy")) == on_policy], "tokens_per_s")
    return [x for x in rates if math.isfinite(x) and x > 0]


def median_tokens_per_s(record: RunRecord, on_policy: bool = False) -> float | None:
    """The throughput figure: median tokens_per_s over the training lines of ordinary steps (or
    of on-policy ones); the upper middle value for an even count: an actual logged value, as
    the trainer's run.json gives."""
    values = valid_rates(record, on_policy)
    return statistics.median_high(values) if values else None
