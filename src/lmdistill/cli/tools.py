"""The other commands: report, export, prune, cache-teacher and config-reference."""

from __future__ import annotations

from pathlib import Path

from lmdistill.cli.files import check_writable_file
from lmdistill.core.errors import LmdistillError


def add_parsers(sub) -> None:
    r = sub.add_parser("report", help="plots and report.md for a run; several runs: a comparison")
    r.add_argument("runs", nargs="+", help="run directories")

    x = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint")
    x.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-N, or a run directory (its newest valid checkpoint)")
    x.add_argument("out_dir", help="new directory for the model")
    x.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA student: write its adapters alone (peft's format) instead of the merged model",
    )
    x.add_argument(
        "--push-to-hub",
        metavar="NAME",
        help="also upload the exported directory to this Hugging Face hub repository (hf auth login first)",
    )

    pr = sub.add_parser(
        "prune",
        help="write a student cut out of the teacher (no training)",
        description="Cut a smaller model of the teacher's family out of the teacher, as "
        "model.student_init: teacher does before training, and save it.",
    )
    pr.add_argument("--teacher", help="teacher model directory or hub id (default: the embedded default teacher)")
    pr.add_argument("--out", required=True, help="new directory for the pruned student")
    pr.add_argument("--data", help="calibration text (default: the embedded corpus) [data.path]")
    pr.add_argument("--config", help="YAML config file: its model and data sections are used")
    pr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. --set model.student_config={num_hidden_layers: 2} --set model.prune.layers=uniform",
    )

    c = sub.add_parser(
        "cache-teacher",
        help="run the teacher once and write a cache to distill from",
        description="Run the teacher over the train and eval blocks of the data (as training would "
        "pack them) and keep sparse targets (sampled, topk) or dense logits.",
    )
    c.add_argument("--teacher", help="teacher model directory or hub id (default: the embedded default teacher)")
    c.add_argument("--data", help="training text, as for train [data.path]")
    c.add_argument(
        "--student",
        help="a student with another tokenizer than the teacher's: the cache then holds the teacher's targets "
        "carried to the student's tokens, on the student's blocks [model.student]",
    )
    c.add_argument("--out", required=True, help="directory for the cache")
    c.add_argument("--mode", choices=["sampled", "topk", "dense"], help="what to keep per position [cache.mode]")
    c.add_argument("--samples", type=int, help="draws per position, sampled mode [cache.samples]")
    c.add_argument("--k", type=int, help="logits kept per position, topk mode [cache.k]")
    c.add_argument("--temperature", type=float, help="capture temperature [cache.temperature]")
    c.add_argument("--config", help="YAML config file: its model, data and cache sections are used")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--overwrite", action="store_true", help="replace a different cache in --out")
    c.add_argument("--no-progress", action="store_true")

    sub.add_parser("config-reference", help="print every config key with its default and meaning")


def report(args) -> int:
    from lmdistill.report import main_report

    return main_report(args.runs)


def export(args) -> int:
    from lmdistill.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, adapter=args.adapter, push_to=args.push_to_hub)
    loads_with = "peft.AutoPeftModelForCausalLM" if args.adapter else "AutoModelForCausalLM"
    print(f"exported {args.checkpoint} -> {out} (loads with {loads_with}.from_pretrained)")
    return 0


def prune(args) -> int:
    from lmdistill.config import Config
    from lmdistill.export import check_new_model_dir
    from lmdistill.jobs.prune import prune_to

    values = {"model.student_init": "teacher"}
    if args.teacher:
        values["model.teacher"] = args.teacher
    if args.data:
        values["data.path"] = args.data
    cfg = Config.load(args.config, args.overrides, values)
    check_new_model_dir(args.out, "--out")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmdistillError(f"--out '{out}' already exists and is not an empty directory; choose a new directory")
    if not out.exists():
        check_writable_file(out, "--out")
    prune_to(cfg, out)
    return 0


def cache_teacher(args) -> int:
    from lmdistill.config import Config
    from lmdistill.jobs.cache import build_teacher_cache

    flags = {
        "model.teacher": args.teacher,
        "model.student": args.student,
        "data.path": args.data,
        "cache.mode": args.mode,
    }
    values = {key: value for key, value in flags.items() if value is not None}
    numbers = (("cache.samples", args.samples), ("cache.k", args.k), ("cache.temperature", args.temperature))
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in numbers if value is not None]
    cfg = Config.load(args.config, overrides, values)
    cfg.validate()
    build_teacher_cache(cfg, Path(args.out), args.overwrite, progress=not args.no_progress)
    return 0


def config_reference(args) -> int:
    from lmdistill.config import reference_markdown

    print(reference_markdown())
    return 0
