"""The ``lmdistill`` command: train, eval, report, export, prune, config-reference.

User errors (``LmdistillError``) end as one line on stderr and a non-zero exit code;
a traceback means a bug in lmdistill.

Exit codes: 0 success, 2 bad input or environment, 3 training stopped by a guard
(too many consecutive non-finite steps or rollbacks), 128 + the signal after SIGTERM, SIGINT or
SIGHUP (143, 130, 129), 141 when the reader of the output went away.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import math
import os
import sys
import time
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


def _add_train_parser(sub) -> None:
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


def _build_config(args) -> Config:
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


def cmd_train(args) -> int:
    from lmdistill import train

    cfg = _build_config(args)
    train(cfg, progress=not args.no_progress)
    return 0


def cmd_eval(args) -> int:
    import torch

    from lmdistill.config import DataConfig
    from lmdistill.data.sources import block_data_of, build_block_data
    from lmdistill.loss.views import ScoreSpec
    from lmdistill.models.loading import (
        check_causal,
        check_context_length,
        check_same_tokenizer,
        check_vocab_covers,
        freeze,
        load_causal_lm,
        load_tokenizer,
        resolve_source,
    )
    from lmdistill.teacher.signals import LiveLogits
    from lmdistill.training.evaluate import evaluate, format_ppl
    from lmdistill.training.layout import MARKER

    if args.block_size is not None and args.block_size < 2:
        raise LmdistillError(f"--block-size {args.block_size} is too small; use 2 or more (e.g. 128)")
    if args.batch_size < 1:
        raise LmdistillError(f"--batch-size {args.batch_size} must be 1 or more")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise LmdistillError(f"--max-blocks {args.max_blocks} must be 1 or more (leave it out to evaluate every block)")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise LmdistillError(
            f"--temperature {args.temperature} is not allowed: the KD temperature must be a finite "
            "number > 0 (e.g. 1.0)"
        )
    generation = _generation_settings(args)
    if args.json:
        check_writable_file(Path(args.json), "--json")
    path = Path(args.model)
    run_cfg = None
    if (path / "manifest.json").is_file():
        raise LmdistillError(
            f"'{path}' is a training checkpoint, not a model directory; export it first: lmdistill "
            f"export {path} OUT, then lmdistill eval OUT"
        )
    if (path / MARKER).is_file() and not (path / "student" / "config.json").is_file():
        raise LmdistillError(
            f"run '{path}' has no final student yet (the run did not finish); export its newest "
            f"checkpoint with lmdistill export {path} OUT and evaluate OUT, or finish the run with "
            f"lmdistill train --resume {path}"
        )
    if (path / "student" / "config.json").is_file():
        # A run directory: its final student, on the run's own held-out blocks unless --data says otherwise.
        from lmdistill.config import Config, load_yaml

        if (path / "config.yaml").is_file():
            run_cfg = Config.from_dict(load_yaml(path / "config.yaml"))
        path = path / "student"
    source = resolve_source(str(path) if path.exists() else args.model, "model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(source, "model")
    model = freeze(load_causal_lm(source, "model", torch.float32)).to(device)
    check_vocab_covers(model, len(tokenizer), "model", source)
    check_causal(model, "model", source, len(tokenizer))  # a perplexity of next-token predictions, as train
    teacher = None
    if args.teacher:
        t_source = resolve_source(args.teacher, "--teacher")
        check_same_tokenizer(load_tokenizer(t_source, "teacher"), tokenizer, t_source, source)
        teacher = freeze(load_causal_lm(t_source, "teacher", torch.float32)).to(device)
        check_vocab_covers(teacher, len(tokenizer), "teacher", t_source)
        check_causal(teacher, "teacher", t_source, len(tokenizer))
    if args.data is None:
        # A run's own held-out blocks; for any other model, the held-out split a default run of the
        # embedded corpus keeps (not every block of it: the other 95% is what such a run trains on).
        data_cfg = run_cfg.data if run_cfg is not None else DataConfig()
        if args.block_size is not None:
            data_cfg.block_size = args.block_size
        data = build_block_data(data_cfg, tokenizer)
        blocks, block_size = data.eval, data_cfg.block_size
        whose = "the run's" if run_cfg is not None else "the embedded corpus'"
        description = f"{whose} held-out blocks ({data.eval_source}; source: {data.source})"
    else:
        # Another text for a run's student: cut as the run cut its data (block size, stores, loss_on).
        data_cfg = run_cfg.data if run_cfg is not None else DataConfig()
        data_cfg.path, data_cfg.text_field, data_cfg.sources = args.data, args.text_field, None
        block_size = data_cfg.block_size = args.block_size or (run_cfg.data.block_size if run_cfg else 128)
        blocks, description = block_data_of(
            args.data, data_cfg, tokenizer, role="--data", progress=not args.no_progress
        )
    for m, role in ((model, "model"), (teacher, "teacher")):
        if m is not None:
            check_context_length(m, block_size, role, source if role == "model" else args.teacher)
    if args.max_blocks is not None:
        blocks = blocks.subset(slice(0, args.max_blocks))
    if len(blocks) == 0:
        raise LmdistillError(
            f"--data '{args.data}' gives no block of {block_size} tokens; add text or lower --block-size"
        )
    judged = None
    if generation is not None:  # first: settings that do not fit the models are refused before the evaluation
        from lmdistill.teacher.judge import judge_generations

        judged = judge_generations(model, teacher, blocks, tokenizer, len(tokenizer), block_size, **generation)
    result = evaluate(
        model,
        LiveLogits(teacher, len(tokenizer)) if teacher is not None else None,
        blocks,
        vocab_size=len(tokenizer),
        spec=ScoreSpec(args.temperature),
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )
    print(f"model: {source}\ndata: {description} ({len(blocks)} blocks of {block_size} tokens)")
    print(f"perplexity {format_ppl(result['eval_ppl'])}  (CE {result['eval_ce_loss']:.4f} nats/token)")
    if teacher is not None:
        print(f"teacher perplexity {format_ppl(result['teacher_ppl'])}  (CE {result['teacher_ce_loss']:.4f})")
        print(
            f"KL(teacher || model) at T=1: {result['eval_kl']:.4f} nats/token; "
            f"top-1 agreement {result['top1_agreement']:.1%}"
        )
    if judged is not None:
        from lmdistill.teacher.judge import describe_generations

        result.update(judged)
        print("\n".join(describe_generations(judged)))
    if args.json:
        from lmdistill.core.paths import atomic_write_json

        atomic_write_json(Path(args.json), result)
    return 0


def _generation_settings(args) -> dict | None:
    """``eval --generate``'s flags, checked one line each (defaults: distill.on_policy's); None
    without --generate."""
    from lmdistill.config import OnPolicyConfig
    from lmdistill.teacher.generation import Sampling

    defaults = OnPolicyConfig()
    prompt_tokens = args.prompt_tokens if args.prompt_tokens is not None else defaults.prompt_tokens
    max_new = args.max_new_tokens if args.max_new_tokens is not None else defaults.max_new_tokens
    for flag, value in (
        ("--gen-prompts", args.gen_prompts),
        ("--prompt-tokens", prompt_tokens),
        ("--max-new-tokens", max_new),
    ):
        if value < 1:
            raise LmdistillError(f"{flag} {value} must be 1 or more")
    if not (args.sample_temperature > 0 and math.isfinite(args.sample_temperature)):
        raise LmdistillError(
            f"--sample-temperature {args.sample_temperature} is not allowed: it must be a finite "
            "number > 0 (1 samples from the model's own distribution)"
        )
    if not args.generate:
        return None
    if not args.teacher:
        raise LmdistillError("--generate judges the model's own text with a teacher; give it with --teacher T")
    return {
        "prompts": args.gen_prompts,
        "prompt_tokens": prompt_tokens,
        "seed": args.seed,
        "sampling": Sampling(max_new, args.sample_temperature),
    }


def check_writable_file(path: Path, flag: str) -> None:
    """Refuse an output file that cannot be written before the work that fills it."""
    if path.is_dir():
        raise LmdistillError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'eval.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise LmdistillError(f"{flag} {path}: {parent} is a file, not a directory; choose another path")
    if not parent.is_dir():
        raise LmdistillError(f"{flag} {path}: the directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise LmdistillError(f"{flag} {path}: cannot write in {parent}; choose a path you may write to")


def cmd_report(args) -> int:
    from lmdistill.report import main_report

    return main_report(args.runs)


def cmd_export(args) -> int:
    from lmdistill.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} -> {out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_prune(args) -> int:
    from lmdistill.config import Config
    from lmdistill.data.sources import build_block_data
    from lmdistill.default import resolve_default_teacher
    from lmdistill.models.loading import load_models, num_params, save_model_dir

    values = {"model.student_init": "teacher"}
    if args.teacher:
        values["model.teacher"] = args.teacher
    if args.data:
        values["data.path"] = args.data
    cfg = Config.load(args.config, args.overrides, values)
    from lmdistill.export import check_new_model_dir
    from lmdistill.models.prune import SUPPORTED

    check_new_model_dir(args.out, "--out")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmdistillError(f"--out '{out}' already exists and is not an empty directory; choose a new directory")
    if not out.exists():
        check_writable_file(out, "--out")
    resolve_default_teacher(cfg)
    family = _model_type(cfg.model.teacher)
    if family is not None and family not in SUPPORTED:
        raise LmdistillError(
            f"lmdistill prune needs a teacher of the {', '.join(SUPPORTED)} families; "
            f"'{cfg.model.teacher}' is a {family} model"
        )
    models = load_models(cfg, train_blocks=lambda tokenizer: build_block_data(cfg.data, tokenizer).train)
    teacher, student = models.teacher, models.student
    importance = models.layer_importance
    print(
        f"teacher: {models.teacher_name} ({teacher.config.num_hidden_layers} layers, {num_params(teacher):,} "
        f"parameters)"
    )
    method = cfg.model.prune.layers
    print(
        f"layers kept ({method}"
        + (", block influence = 1 - cos(layer input, layer output)" if importance else "")
        + "):"
    )
    for layer in range(teacher.config.num_hidden_layers):
        score = f"  influence {importance[layer]:.4f}" if importance else ""
        kept = f"  -> student layer {models.student_layers.index(layer)}" if layer in models.student_layers else ""
        print(f"  teacher layer {layer:>3}{score}{kept}")
    c = student.config
    print(
        f"student: {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} key-value heads ({cfg.model.prune.width} width), "
        f"{num_params(student):,} parameters"
    )
    save_model_dir(student, models.tokenizer, out)
    print(f"wrote {out} (loads with AutoModelForCausalLM.from_pretrained; train it with --student {out})")
    return 0


def cmd_cache_teacher(args) -> int:
    """Run the teacher once over the run's train and eval blocks and write the cache (see cache.py)."""
    import torch

    from lmdistill.config import Config
    from lmdistill.core.files import model_reference
    from lmdistill.core.progress import progress_bar
    from lmdistill.data.sources import build_block_data
    from lmdistill.default import resolve_default_teacher
    from lmdistill.models.loading import (
        check_causal,
        check_vocab_covers,
        freeze,
        load_causal_lm,
        load_tokenizer,
        resolve_source,
    )
    from lmdistill.teacher import cache as tc

    values = {
        k: v
        for k, v in {"model.teacher": args.teacher, "data.path": args.data, "cache.mode": args.mode}.items()
        if v is not None
    }
    overrides = list(args.overrides) + [
        f"{key}={value}"
        for key, value in (
            ("cache.samples", args.samples),
            ("cache.k", args.k),
            ("cache.temperature", args.temperature),
        )
        if value is not None
    ]
    cfg = Config.load(args.config, overrides, values)
    cfg.validate()
    out = Path(args.out)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    resolve_default_teacher(cfg, progress=not args.no_progress and rank == 0)
    teacher_name = resolve_source(cfg.model.teacher, "model.teacher")
    tokenizer = load_tokenizer(teacher_name, "teacher")
    if cfg.cache.mode == "topk" and cfg.cache.k >= len(tokenizer):  # before the data, the teacher or the cache
        # (k = V leaves no tail: its mass is 0, its log -inf, and every step would be nonfinite)
        raise LmdistillError(
            f"cache.k = {cfg.cache.k} (--k) is not below the vocabulary of {len(tokenizer):,} tokens; "
            f"give --k {len(tokenizer) - 1} or less, or use --mode dense to keep every logit"
        )
    # The teacher is checked before the data or the cache are touched: one that does not cover the
    # tokenizer would index past its rows, and a bidirectional one (BERT) is no next-token teacher.
    teacher = freeze(load_causal_lm(teacher_name, "teacher", torch.float32, cfg.model.trust_remote_code))
    check_vocab_covers(teacher, len(tokenizer), "teacher", teacher_name)
    check_causal(teacher, "teacher", teacher_name, len(tokenizer))
    data = build_block_data(cfg.data, tokenizer, progress=not args.no_progress)
    request = tc.build_request(cfg, tokenizer, data, model_reference(teacher_name), len(tokenizer))
    # Rank 0 holds the cache's build lock for the whole launch (its other ranks write under it).
    try:
        complete = tc.prepare_out(out, request, args.overwrite) if rank == 0 else False
        if world > 1:
            flag = torch.tensor([int(complete)])
            dist.broadcast(flag, 0)
            complete = bool(flag.item())
        if complete:
            if rank == 0:
                print(f"teacher cache '{out}' is already complete for this teacher, data and settings; nothing to do")
            return 0
        per_token = tc.bytes_per_token(cfg.cache.mode, len(tokenizer), cfg.cache.samples, cfg.cache.k)
        if rank == 0:
            positions = (len(data.train) + len(data.eval)) * request["positions_per_block"]
            print(
                f"caching the teacher: {tc.describe(request)}, {positions:,} positions -> {out}\n"
                f"estimated size {tc.estimated_bytes(request) / 2**20:,.1f} MiB: {per_token} bytes per position "
                f"({per_token / tc.dense_fp16_bytes(len(tokenizer)):.2%} of fp16 logits at V={len(tokenizer):,})"
            )
        device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if torch.cuda.is_available()
            else (torch.device("cpu"))
        )
        teacher = teacher.to(device)
        todo = tc.shards_to_do(out, request, rank, world)
        blocks = {"train": data.train, "eval": data.eval}
        bar = progress_bar(
            sum((end - start) for _, _, start, end in todo) * request["positions_per_block"],
            0,
            "teacher",
            not args.no_progress and rank == 0,
            unit="tok",
        )
        started = time.perf_counter()
        for split, index, start, end in todo:
            tc.write_shard(
                out,
                teacher,
                blocks[split],
                split,
                index,
                start,
                end,
                request,
                cfg.cache.batch_size,
                device,
                on_batch=bar.update,
            )
            bar.set_postfix({"tokens/s": f"{bar.n / max(time.perf_counter() - started, 1e-9):,.0f}"})
        bar.close()
        if world > 1:
            dist.barrier()
        if rank == 0:
            manifest = tc.finish(out, request)
            size = sum(s["bytes"] for s in manifest["shards"].values())
            print(
                f"teacher cache written: {out} ({len(manifest['shards'])} shards, {size / 2**20:,.1f} MiB, "
                f"{tc.elapsed_since(started)}); teacher held-out perplexity "
                f"{manifest['teacher_eval']['teacher_ppl']:.4g}\n"
                f"train from it: lmdistill train --teacher-cache {out} --data ... (the same data settings)"
            )
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return 0
    finally:
        if rank == 0:
            tc.release(out)


def _model_type(source: str) -> str | None:
    """``model_type`` from a local model directory's config.json (None for a hub id or no file)."""
    import json

    try:
        return json.loads((Path(source) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def cmd_config_reference(args) -> int:
    from lmdistill.config import reference_markdown

    print(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdistill", description="Knowledge distillation for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)

    e = sub.add_parser("eval", help="perplexity (and agreement with a teacher) of a saved model")
    e.add_argument("model", help="model directory, run directory, or hub id")
    e.add_argument(
        "--data",
        default=None,
        help="text file/directory/datasets name (default: a run's held-out "
        "blocks, else the embedded corpus' held-out blocks)",
    )
    e.add_argument("--teacher", help="also report KL and top-1 agreement against this teacher")
    e.add_argument("--text-field", default="text")
    e.add_argument("--block-size", type=int, default=None, help="tokens per block (default: the run's, else 128)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-blocks", type=int, default=None)
    e.add_argument("--temperature", type=float, default=1.0, help="temperature of the reported KD divergence")
    e.add_argument(
        "--generate",
        action="store_true",
        help="also judge the model's own continuations of held-out prompts with --teacher: the teacher's "
        "NLL of them, the model's own, their difference (reverse KL), repetition and length",
    )
    e.add_argument(
        "--gen-prompts", type=int, default=16, help="held-out blocks whose prompts are continued (--generate)"
    )
    e.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="prompt length: each block's first tokens (default: distill.on_policy.prompt_tokens, 32)",
    )
    e.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens written per prompt (default: distill.on_policy.max_new_tokens, 64)",
    )
    e.add_argument(
        "--sample-temperature",
        type=float,
        default=1.0,
        help="sampling temperature of the continuations (1: the model's own distribution)",
    )
    e.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same numbers")
    e.add_argument("--json", help="also write the numbers to this JSON file")
    e.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("report", help="plots and report.md for a run; several runs: a comparison")
    r.add_argument("runs", nargs="+", help="run directories")

    x = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint")
    x.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-N, or a run directory (its newest valid checkpoint)")
    x.add_argument("out_dir", help="new directory for the model")

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
    return parser


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "report": cmd_report,
    "export": cmd_export,
    "prune": cmd_prune,
    "cache-teacher": cmd_cache_teacher,
    "config-reference": cmd_config_reference,
}


def _torch_oom() -> type:
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not faulthandler.is_enabled():
        # One process of a launch dying in native code (an abort in a collective library) otherwise
        # leaves only the launcher's exit code; this writes every thread's Python stack to stderr.
        faulthandler.enable()
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        if sys.stdout is not None:  # None when the process was started with stdout closed
            sys.stdout.flush()  # a reader that went away (| head) shows here, not as a warning at exit
        return code
    except BrokenPipeError:  # the reader of our output went away: nothing to say, and no one to say it to
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a process the pipe ended
    except LmdistillError as exc:
        print(f"lmdistill: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (MemoryError, _torch_oom()) as exc:  # a failed allocation on the CPU or the GPU
        first = (str(exc).splitlines() or ["out of memory"])[0][:160]
        print(
            f"lmdistill: error: out of memory ({first}); lower train.batch_size (raise train.grad_accum to keep "
            "the batch), use loss.impl=chunked, or a smaller data.block_size",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("lmdistill: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a write (or read) the file system refused: say where and why
        print(f"lmdistill: error: {os_error_message(exc)}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at os.devnull, so that the flush at exit does not fail again on the closed pipe
    (the pattern of Python's signal documentation, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured, or closed)
        pass


def os_error_message(exc: OSError) -> str:
    """One line for a file-system error: the path, the cause, what to do."""
    path = exc.filename or "standard output or a file"
    reason = exc.strerror or str(exc) or type(exc).__name__
    disk = f"the disk that holds {path}" if exc.filename else "its disk"
    advice = {
        errno.ENOSPC: f"free space on {disk}; files written before are kept",
        errno.EDQUOT: f"free space on {disk}; files written before are kept",
        errno.EROFS: "write somewhere else: that file system is read-only",
        errno.EACCES: "choose a path you may write to, or change its permissions",
        errno.EPERM: "choose a path you may write to, or change its permissions",
        errno.EISDIR: "it is a directory; give a file name",
        errno.ENOTDIR: "a part of the path is a file, not a directory; fix the path",
        errno.ENOENT: "check the path",
    }.get(exc.errno, "check the path and the file system")
    return f"{reason}: {path}; {advice}"


if __name__ == "__main__":
    sys.exit(main())
