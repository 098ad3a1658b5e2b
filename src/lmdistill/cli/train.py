"""``lmdistill train``: its flags, and the config they make."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmdistill.core.errors import LmdistillError

if TYPE_CHECKING:
    from lmdistill.config import Config

# Named flags of `train` -> config keys. Everything else goes through --set.
TRAIN_FLAGS = {
    "batch_size": ("train.batch_size", int, "blocks per micro-batch"),
    "epochs": ("train.epochs", int, "passes over the training data"),
    "max_steps": ("train.max_steps", int, "optimizer steps (overrides --epochs)"),
    "grad_accum": ("train.grad_accum", int, "micro-batches per optimizer step"),
    "lr": ("train.lr", float, "peak learning rate"),
    "eval_every": ("train.eval_every", int, "evaluate every N steps"),
    "temperature": ("distill.temperature", float, "KD temperature at the start (default 2.0)"),
    "min_temperature": ("distill.min_temperature", float, "KD temperature at the end (default 1.5)"),
    "kd_weight": ("distill.kd_weight", float, "weight of the KD term, in [0, 1]"),
    "teacher": ("model.teacher", str, "teacher model directory or hub id"),
    "teacher_cache": ("model.teacher_cache", str, "distill from this teacher cache (lmdistill cache-teacher)"),
    "student": ("model.student", str, "student model directory or hub id (default: build one)"),
    "data": ("data.path", str, "training text: .txt/.jsonl/.parquet file, directory, or datasets name"),
    "output_dir": ("run.output_dir", str, "run directory"),
    "seed": ("run.seed", int, "random seed"),
    "device": ("run.device", str, "auto, cpu or cuda"),
    "mixed_precision": ("run.mixed_precision", str, "auto, no, bf16 or fp16"),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="distill a student from a teacher",
        description="Distill a student LM from a frozen teacher. With no arguments: the embedded "
        "default (offline, CPU, a few minutes).",
    )
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config key, e.g. --set guard.spike=rollback (repeatable)",
    )
    for name, (key, _type, help_text) in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=str, default=None, help=f"{help_text} [{key}]")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that holds a run")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue an unfinished run (RUN_DIR or --output-dir) from its newest valid checkpoint, "
        "with the run's saved config unless --config is given",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


def build_config(args) -> Config:
    from lmdistill.config import Config

    overrides = list(args.overrides)
    values: dict = {}  # named flags: paths and names verbatim, numbers parsed like --set values
    for name, (key, typ, _help) in TRAIN_FLAGS.items():
        value = getattr(args, name)
        if value is not None:
            if typ is str:
                values[key] = value
            else:
                overrides.append(f"{key}={value}")
    if args.overwrite:
        values["run.overwrite"] = True
    config_file = args.config
    if args.resume is not None:
        if isinstance(args.resume, str):
            values["run.output_dir"] = args.resume
        values["run.resume"] = True
        run_dir = values.get("run.output_dir")
        saved = Path(run_dir) / "config.yaml" if run_dir else None
        if config_file is None and saved is not None and saved.is_file():
            config_file = saved  # the run's own settings; flags still apply on top
        elif config_file is None and saved is not None and _is_run(saved.parent):
            from lmdistill.training.rundir import RunDirectory

            # (a run that has just started holds its lock before it writes config.yaml)
            RunDirectory(saved.parent).refuse_if_in_use()
            raise LmdistillError(
                f"run '{run_dir}' has no config.yaml; pass the run's settings with --config FILE "
                "(without them the resume would use the defaults, not the run's)"
            )
    return Config.load(config_file, overrides, values)


def _is_run(path: Path) -> bool:
    from lmdistill.training.rundir import RunDirectory

    return RunDirectory(path).is_run()


def run(args) -> int:
    from lmdistill import train

    cfg = build_config(args)
    train(cfg, progress=not args.no_progress)
    return 0
