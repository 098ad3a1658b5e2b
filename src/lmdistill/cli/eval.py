"""``lmdistill eval``: its flags, checked one line each, then the job (``jobs/evaluate.py``)."""

from __future__ import annotations

import math
from pathlib import Path

from lmdistill.cli.files import check_writable_file
from lmdistill.core.errors import LmdistillError


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity (and agreement with a teacher) of a saved model")
    e.add_argument("model", help="model directory, run directory, or hub id")
    e.add_argument(
        "--data",
        default=None,
        help="text file/directory/datasets name (default: a run's held-out "
        "blocks, else the embedded corpus' held-out blocks)",
    )
    e.add_argument("--teacher", help="also report KL and top-1 agreement against this teacher")
    e.add_argument(
        "--draft-for",
        metavar="TEACHER",
        help="the model as a draft model for TEACHER (speculative decoding): besides everything --teacher "
        "reports, assisted generation on held-out prompts, greedy and sampled: draft tokens accepted per "
        "teacher forward and the wall-clock speedup over the teacher alone",
    )
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
        "--gen-prompts",
        type=int,
        default=None,
        help="held-out blocks whose prompts are continued (default: 16 for --generate, 8 for --draft-for)",
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
    e.add_argument(
        "--repeats", type=int, default=3, help="--draft-for: timed passes over the prompts (the median is reported)"
    )
    e.add_argument("--json", help="also write the numbers to this JSON file")
    e.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from lmdistill.jobs.evaluate import EvalRequest, evaluate_model

    _check_flags(args)
    teacher = _teacher_of(args)
    generation, draft = _generation_settings(args, teacher)
    if args.json:
        check_writable_file(Path(args.json), "--json")
    request = EvalRequest(
        model=args.model,
        data=args.data,
        teacher=teacher,
        text_field=args.text_field,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_blocks=args.max_blocks,
        temperature=args.temperature,
        generation=generation,
        draft=draft,
        json=Path(args.json) if args.json else None,
        progress=not args.no_progress,
    )
    evaluate_model(request)
    return 0


def _check_flags(args) -> None:
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


def _teacher_of(args) -> str | None:
    if args.draft_for and args.teacher and args.draft_for != args.teacher:
        raise LmdistillError(
            f"--teacher {args.teacher} and --draft-for {args.draft_for} name two teachers; --draft-for is also the "
            "teacher every other number is measured against: give one of them"
        )
    return args.draft_for or args.teacher


def _generation_settings(args, teacher: str | None):
    """(``--generate``'s settings or None, ``--draft-for``'s DraftSettings or None), each flag
    checked in one line (defaults: distill.on_policy's)."""
    from lmdistill.config import OnPolicyConfig
    from lmdistill.teacher.generation import Sampling
    from lmdistill.teacher.speculative import DraftSettings

    defaults = OnPolicyConfig()
    prompt_tokens = args.prompt_tokens if args.prompt_tokens is not None else defaults.prompt_tokens
    max_new = args.max_new_tokens if args.max_new_tokens is not None else defaults.max_new_tokens
    for flag, value in (
        ("--gen-prompts", args.gen_prompts if args.gen_prompts is not None else 1),
        ("--prompt-tokens", prompt_tokens),
        ("--max-new-tokens", max_new),
        ("--repeats", args.repeats),
    ):
        if value < 1:
            raise LmdistillError(f"{flag} {value} must be 1 or more")
    if not (args.sample_temperature > 0 and math.isfinite(args.sample_temperature)):
        raise LmdistillError(
            f"--sample-temperature {args.sample_temperature} is not allowed: it must be a finite "
            "number > 0 (1 samples from the model's own distribution)"
        )
    if args.generate and not teacher:
        raise LmdistillError("--generate judges the model's own text with a teacher; give it with --teacher T")
    generation = draft = None
    if args.generate:
        prompts = args.gen_prompts if args.gen_prompts is not None else 16
        sampling = Sampling(max_new, args.sample_temperature)
        generation = {"prompts": prompts, "prompt_tokens": prompt_tokens, "seed": args.seed, "sampling": sampling}
    if args.draft_for:
        prompts = args.gen_prompts if args.gen_prompts is not None else 8
        draft = DraftSettings(prompts, prompt_tokens, max_new, args.repeats, args.seed)
    return generation, draft
