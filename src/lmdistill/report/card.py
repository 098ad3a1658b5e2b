"""A model card for a trained student: ``README.md`` with the metadata block the Hugging Face hub
reads, written into the final ``student/`` and into every export.

It says how the student was made, from the run directory alone: the teacher, the data (sources
and the fingerprints of their stores), the recipe (objective, temperatures, steps, tokens), how
the student started (loaded, cut out of the teacher, fresh; LoRA adapters), its held-out numbers
against the teacher at the step it holds, the run's health verdict, and the loss plot (copied
beside it as ``loss.png``). The metadata's ``license`` is the teacher's where its files say it
(the YAML block of a local model's README.md, or a GGUF file's ``general.license``), and
``base_model`` is the teacher's hub id when it was given as one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmdistill.core.paths import atomic_write, cache_home, is_hub_id
from lmdistill.report.markdown import fmt_loss, fmt_pct, fmt_ppl, fmt_times, table
from lmdistill.report.reading import RunRecord, load_run

CARD = "README.md"
LOSS_PLOT = "loss.png"
TAGS = ["lmdistill", "knowledge-distillation", "text-generation"]


def write_model_card(
    run_dir: Path, model_dir: Path, *, step: int | None = None, adapter: bool = False, name: str | None = None
) -> Path:
    """``README.md`` (and ``loss.png``) in ``model_dir`` for the student of ``run_dir`` at
    ``step`` (None: the run's last evaluation); ``adapter``: the directory holds LoRA adapters
    alone; ``name``: the hub repository it goes to, for the card's example code."""
    record = load_run(run_dir)
    plot = Path(run_dir) / "plots" / "losses.png"
    if plot.is_file():
        shutil.copyfile(plot, Path(model_dir) / LOSS_PLOT)
    text = model_card(record, step=step, adapter=adapter, plot=plot.is_file(), name=name or str(model_dir))
    atomic_write(Path(model_dir) / CARD, text)
    return Path(model_dir) / CARD


def model_card(
    record: RunRecord, *, step: int | None = None, adapter: bool = False, plot: bool = False, name: str = "."
) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg, info = record.config, record.run_info or {}
    teacher = _teacher_source(cfg, info)
    origin = cfg.get("model", {}).get("student") or teacher  # where the student's weights come from
    metadata = ModelCardData(
        base_model=origin if origin and _is_hub_id(origin) else None,
        library_name="peft" if adapter else "transformers",
        license=teacher_license(origin),
        tags=TAGS,
        pipeline_tag="text-generation",
    )
    sections = [
        f"# {cfg.get('run', {}).get('name', 'student')}: a student trained with lmdistill",
        _summary(cfg, info, teacher, adapter),
        *_made(cfg, info, teacher, adapter),
        *_data(info),
        *_recipe(cfg, info, step),
        *_results(record, step),
        *([f"![Training losses]({LOSS_PLOT})"] if plot else []),
        *_use(adapter, name),
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n").content


def teacher_license(source: str | None) -> str | None:
    """The teacher's license where its own files state it; None when unknown."""
    if not source:
        return None
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        try:
            from gguf import GGUFReader

            field = GGUFReader(path).fields.get("general.license")
            return str(field.contents()) if field is not None else None
        except Exception:  # (a damaged file, the gguf package missing): the license stays unknown
            return None
    readme = path / CARD
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(readme).data.license
        except Exception:
            return None
    return None


def _is_hub_id(source: str) -> bool:
    """A hub id with an owner (``org/name``), as the hub's ``base_model`` takes it, not a local path."""
    return "/" in source and is_hub_id(source) and not Path(source).exists()


def _teacher_source(cfg: dict, info: dict) -> str | None:
    """The teacher as the run named it; None for the embedded default teacher (built and cached
    by lmdistill itself, under its cache's ``teachers/``)."""
    model = cfg.get("model", {})
    source = model.get("teacher") or (info.get("teacher_cache") or {}).get("teacher")
    if source and Path(source).parent == cache_home() / "teachers":
        return None
    return str(source) if source else None


def _summary(cfg: dict, info: dict, teacher: str | None, adapter: bool) -> str:
    who = f"`{teacher}`" if teacher else "lmdistill's embedded default teacher (pretrained on its embedded corpus)"
    student = info.get("student") or {}
    size = f" of {_short(_student_params(student, adapter))} parameters" if student.get("params") else ""
    kd = float(cfg.get("distill", {}).get("kd_weight", 0))
    how = (
        f"trained by knowledge distillation from the teacher {who}"
        if kd > 0
        else f"trained with the ordinary language-model loss alone (kd_weight 0), with the teacher {who} as the "
        "reference it is measured against"
    )
    lines = [f"A causal language model{size}, {how}."]
    licence = teacher_license(teacher) if teacher else None
    if kd > 0 and licence:
        lines.append(f"The teacher's license, as its own files state it: {licence}.")
    lines.append("Everything below was written by lmdistill from the training run's own records.")
    return " ".join(lines)


def _made(cfg: dict, info: dict, teacher: str | None, adapter: bool) -> list[str]:
    t, s = info.get("teacher") or {}, info.get("student") or {}
    cache = info.get("teacher_cache") or {}
    shown = teacher or t.get("name") or "the embedded default teacher"
    where = f" (read from a {cache.get('mode')} cache)" if cache else ""
    rows = [
        ["model", f"`{shown}`{where}", s.get("name", "—")],
        ["architecture", t.get("architecture", "—"), s.get("architecture", "—")],
        ["parameters", _count(t.get("params")), _count(_student_params(s, adapter))],
        ["layers x hidden size", _shape(t), _shape(s)],
        ["vocabulary", _count(t.get("vocab_size")), _count(s.get("vocab_size"))],
    ]
    lines = ["## How it was made", "\n".join(table(["", "teacher", "student"], rows))]
    start = cfg.get("model", {})
    if s.get("init"):
        init = s["init"]
        width = f", and {init['width']}" if init.get("width") else ""
        lines.append(
            f"The student was cut out of the teacher before training: it kept teacher layers {init['layers']} "
            f"(chosen by {init['layer_choice']}){width}."
        )
    elif start.get("student"):
        lines.append(f"The student started from `{start['student']}`.")
    else:
        lines.append(f"The student started as: {s.get('name', 'unknown')}.")
    lora = s.get("lora")
    if lora:
        how = "This repository holds the adapters alone." if adapter else "They are merged into these weights."
        lines.append(
            f"Only LoRA adapters were trained (r {lora['r']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, "
            f"on {lora['target_modules']}): {_count(s.get('trained_params'))} parameters; the rest stayed frozen. "
            + how
        )
    return lines


def _data(info: dict) -> list[str]:
    data = info.get("data") or {}
    rows = [
        [s.get("name", "—"), f"{s.get('weight', 1):g}", s.get("format", "—"), _count(s.get("tokens")), _fp(s)]
        for s in data.get("sources", [])
    ]
    lines = ["## Data"]
    if rows:
        lines.append("\n".join(table(["source", "weight", "format", "tokens", "store fingerprint"], rows)))
    layout = data.get("layout") or {}
    lines.append(
        f"Blocks of {data.get('block_size', '?')} tokens; held out: {data.get('eval_source', '?')}. "
        f"Fingerprints of the block split: train `{layout.get('train', '?')}`, held-out `{layout.get('eval', '?')}`."
    )
    return lines


def _recipe(cfg: dict, info: dict, step: int | None) -> list[str]:
    d, tr, plan = cfg.get("distill", {}), cfg.get("train", {}), info.get("plan") or {}
    kd = float(d.get("kd_weight", 0))
    items = [
        f"- loss = {kd:g} x KD + {1 - kd:g} x CE; KD: {d.get('divergence')}"
        + (" scaled by T²" if d.get("scale_by_t2") else ""),
        f"- temperature {d.get('temperature')} to {d.get('min_temperature')} ({d.get('temperature_schedule')})",
    ]
    if float(d.get("hidden", {}).get("weight", 0)) > 0:
        items.append(f"- hidden-state term: weight {d['hidden']['weight']}, {d['hidden'].get('loss')}")
    if float(d.get("on_policy", {}).get("fraction", 0)) > 0:
        o = d["on_policy"]
        items.append(
            f"- on-policy steps: {o['fraction']:.0%} of steps on the student's own text ({o.get('divergence')})"
        )
    if cfg.get("model", {}).get("teacher_cache"):
        items.append(f"- teacher signal from a cache: {(info.get('teacher_cache') or {}).get('mode')} targets")
    planned = plan.get("total_steps")
    steps = step if step is not None else info.get("steps_done", planned)
    batch = tr.get("batch_size", 0) * tr.get("grad_accum", 1) * plan.get("processes", 1)
    tokens = steps * batch * (info.get("data") or {}).get("block_size", 0) if steps is not None else None
    of = f" (of {planned} planned)" if planned is not None and steps != planned else ""
    on_policy = (
        " on the ordinary steps; on-policy steps train on the student's own continuations"
        if (float(d.get("on_policy", {}).get("fraction", 0)) > 0)
        else ""
    )
    items.append(
        f"- {steps} optimizer steps{of} of {batch} blocks ({_count(tokens)} tokens{on_policy}); AdamW, lr "
        f"{_number(tr.get('lr'))} ({tr.get('lr_schedule')}), weight decay {tr.get('weight_decay')}; precision "
        f"{plan.get('mixed_precision')}"
    )
    return ["## Recipe", "\n".join(items)]


def _results(record: RunRecord, step: int | None) -> list[str]:
    evals = record.evals
    if not evals:
        return ["## Results", "The run wrote no evaluation."]
    at = [e for e in evals if step is None or e["step"] <= step]
    after = at[-1] if at else evals[0]
    note = ""
    if step is not None and after["step"] != step:
        note = f" The checkpoint of step {step} was not evaluated; these are the numbers of step {after['step']}."
    cache = (record.run_info or {}).get("teacher_cache") or {}
    sparse = bool(cache) and cache.get("mode") != "dense"
    if sparse:
        note += (
            f" The teacher was read from a {cache.get('mode')} cache: its KL and agreement with the student are "
            "estimates from the cached targets, in the run's report.md."
        )
    rows = _result_rows(record.initial_eval or {}, after, sparse)
    return [
        "## Results",
        f"Held-out, at step {after['step']} of the run.{note}",
        "\n".join(table(["metric", "student at step 0", "this student", "teacher"], rows)),
        _verdict(record.health),
    ]


def _result_rows(before: dict, after: dict, sparse: bool) -> list[list[str]]:
    def row(label, key, fmt, teacher):
        return [label, fmt(before.get(key)), fmt(after.get(key)), teacher]

    if "teacher_bpb" in after:  # a teacher with another tokenizer: bits per byte compare, perplexities do not
        return [
            row("bits per byte of the held-out text", "eval_bpb", fmt_loss, fmt_loss(after.get("teacher_bpb"))),
            row("perplexity (each over its own tokens)", "eval_ppl", fmt_ppl, fmt_ppl(after.get("teacher_ppl"))),
            row(
                "CE, nats/token (each over its own tokens)",
                "eval_ce_loss",
                fmt_loss,
                fmt_loss(after.get("teacher_ce_loss")),
            ),
        ]
    rows = [
        row("perplexity", "eval_ppl", fmt_ppl, fmt_ppl(after.get("teacher_ppl"))),
        row("CE, nats/token", "eval_ce_loss", fmt_loss, fmt_loss(after.get("teacher_ce_loss"))),
    ]
    if not sparse:  # KL, agreement and acceptance against a sparse cache are estimates of their own kind
        rows += [
            row("KL(teacher ‖ student) at T=1", "eval_kl", fmt_loss, "0"),
            row("top-1 agreement with the teacher", "top1_agreement", fmt_pct, fmt_pct(1.0)),
            row("expected acceptance as the teacher's draft model", "draft_acceptance", fmt_pct, fmt_pct(1.0)),
        ]
    for mode in ("greedy", "sampled"):
        if f"draft_{mode}_speedup" in after:
            label = f"assisted generation, {mode}: speedup over the teacher alone"
            rows.append(row(label, f"draft_{mode}_speedup", fmt_times, "1.00x"))
    return rows


def _verdict(health: dict | None) -> str:
    if health is None:
        return "The run did not finish, so it has no health verdict; see its report.md."
    fired = ", ".join(health.get("fired", [])) or "none"
    return f"Health of the whole run: **{health.get('verdict', 'unknown')}** (checks that fired: {fired})."


def _use(adapter: bool, name: str) -> list[str]:
    if adapter:
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")  # the base model, then these adapters\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")'
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")'
        )
    return ["## Use", f"```python\n{code}\n```"]


def _student_params(student: dict, adapter: bool) -> int | None:
    """The student's parameters as saved: without the adapters once they are merged into it."""
    params = student.get("params")
    if params is not None and student.get("lora") and not adapter:
        return params - student.get("trained_params", 0)
    return params


def _number(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _short(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "—"


def _shape(m: dict) -> str:
    return f"{m.get('num_layers', '?')} x {m.get('hidden_size', '?')}" if m else "—"


def _fp(source: dict) -> str:
    fp = source.get("fingerprint")
    return f"`{fp}`" if fp else "—"
