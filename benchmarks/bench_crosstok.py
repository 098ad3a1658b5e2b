"""Cross-tokenizer distillation against ordinary KD, in held-out bits per byte at equal steps.

Two settings, each with two fresh students of one shape that differ only in their tokenizer:
one with the teacher's (where ordinary, same-tokenizer KD exists) and one with another. Each
student trains CE-only and with the original report's recipe (kd 0.5, T 2.0 -> 1.5):

  embedded  the embedded default teacher (byte-level BPE of 4,096 tokens); the other tokenizer
            is a byte-level BPE of 1,024 tokens trained on the same corpus. Students: half the
            teacher (as the default student), 1 epoch of the training documents at batch 2.
  smollm2   SmolLM2-135M-Instruct (vocabulary 49,152; ``benchmarks/real_teacher.py``); the other
            tokenizer is the embedded default's (4,096 tokens, another corpus and another
            pre-tokenizer). Students: the embedded teacher's shape (4 layers, hidden 192). Rows
            ``wide_ce`` and ``wide_kd`` (named with ``--rows``) train the other tokenizer's student
            at the parameter count of the one with SmolLM2's (20.6M: 4 layers, hidden 576), to
            tell a smaller model from a harder signal.

The text is the embedded corpus, its documents split 9:1 into training and held-out files, so
every row is scored on the same held-out text: bits per byte are comparable across tokenizers
where perplexities are not. Same-tokenizer rows run with ``distill.cross_tokenizer: always``
(the ordinary KD loss, tested equal, and the evaluation in bits per byte); one more row runs
ordinary KD on its own path, for the step time and memory of the cross-tokenizer path against
it with everything else equal. ``cross_kd_cached`` trains the other-tokenizer student from a
teacher cache built for it (``cache-teacher --student``: sampled, S = 12, captured at T = 2.0);
the build is timed on its own; ``same_kd_t1``, ``cross_kd_t1`` and ``cross_kd_cached_t1`` (named with ``--rows``) are
the KD rows at T = 1 throughout, the cache captured at T = 1 (its draws then need no re-weighting).
Every row is its own process (peak RSS via ``os.wait4``).

    OMP_NUM_THREADS=1 python benchmarks/bench_crosstok.py --setting embedded --out benchmarks/results/crosstok_embedded.json
    OMP_NUM_THREADS=1 python benchmarks/bench_crosstok.py --setting smollm2 --out benchmarks/results/crosstok_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import run_measured
from real_teacher import fetch

RECIPE = ["--kd-weight", "0.5", "--temperature", "2.0", "--min-temperature", "1.5"]
RECIPE_T1 = ["--kd-weight", "0.5", "--temperature", "1.0", "--min-temperature", "1.0"]
ALWAYS = ["--set", "distill.cross_tokenizer=always"]
SETTINGS = {
    "embedded": {"lr": 1e-3, "other_vocab": 1024, "shape": None, "common": ["--epochs", "1"]},
    "smollm2": {
        "lr": 1e-3,
        "other_vocab": None,  # the embedded default teacher's tokenizer
        "shape": {
            "num_hidden_layers": 4,
            "hidden_size": 192,
            "intermediate_size": 512,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 48,
        },
        # The other tokenizer's student made as large as the one with SmolLM2's (20.6M parameters,
        # most of them its 49,152-row embeddings): the same 4 layers, wider. Rows wide_ce, wide_kd.
        "wide_shape": {
            "num_hidden_layers": 4,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 12,
            "num_key_value_heads": 12,
            "head_dim": 48,
        },
        "common": ["--max-steps", "300", "--eval-every", "300", "--set", "data.max_tokens=80000"],
    },
}
ROWS = {
    "same_ce": ("same", ["--kd-weight", "0", *ALWAYS]),
    "same_kd": ("same", [*RECIPE, *ALWAYS]),
    "same_kd_ordinary": ("same", [*RECIPE, "--set", "distill.cross_tokenizer=never"]),
    "cross_ce": ("other", ["--kd-weight", "0"]),
    "cross_kd": ("other", RECIPE),
    # the same, from a teacher cache built across tokenizers (sampled, captured at the recipe's T = 2.0)
    "cross_kd_cached": ("other", RECIPE),
    # the other tokenizer's student at the same-tokenizer student's parameter count (smollm2 only)
    "wide_ce": ("wide", ["--kd-weight", "0"]),
    "wide_kd": ("wide", RECIPE),
    # live and cached at T = 1 throughout: a sampled cache's draws then need no re-weighting
    "same_kd_t1": ("same", [*RECIPE_T1, *ALWAYS]),
    "cross_kd_t1": ("other", RECIPE_T1),
    "cross_kd_cached_t1": ("other", RECIPE_T1),
}
CACHED = {"cross_kd_cached": 2.0, "cross_kd_cached_t1": 1.0}  # row -> the temperature its cache is captured at
OPTIONAL = {"wide_ce", "wide_kd", "same_kd_t1", "cross_kd_t1", "cross_kd_cached_t1"}  # run when named in --rows
DEFAULT_ROWS = [name for name in ROWS if name not in OPTIONAL]


def split_corpus(work: Path) -> tuple[Path, Path]:
    """The embedded corpus as train.jsonl and eval.jsonl: the last tenth of every document's lines
    held out, so that the held-out text is a tenth of the corpus and samples all of it."""
    from lmdistill.data.sources import embedded_corpus_texts

    train, held_out = work / "train.jsonl", work / "eval.jsonl"
    if not held_out.is_file():
        parts: dict[Path, list[str]] = {train: [], held_out: []}
        for text in embedded_corpus_texts():
            lines = text.splitlines(keepends=True)
            cut = len(lines) - max(1, len(lines) // 10)
            for path, piece in ((train, "".join(lines[:cut])), (held_out, "".join(lines[cut:]))):
                if piece.strip():
                    parts[path].append(json.dumps({"text": piece}) + "\n")
        for path, records in parts.items():
            path.write_text("".join(records))
    return train, held_out


def make_student(path: Path, teacher_dir: Path, tokenizer, shape: dict | None, seed: int = 0) -> Path:
    """A fresh student of ``shape`` (None: half the teacher) for ``tokenizer``, saved with it."""
    from transformers import AutoConfig

    from lmdistill.models.loading import build_fresh_student
    from lmdistill.models.shapes import student_config_from_teacher

    if (path / "config.json").is_file():
        return path
    config = student_config_from_teacher(AutoConfig.from_pretrained(teacher_dir), shape or {})
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.tie_word_embeddings = False
    build_fresh_student(config, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def students(setting: str, work: Path, teacher_dir: Path) -> dict[str, Path]:
    from transformers import AutoTokenizer

    from lmdistill.data.sources import embedded_corpus_texts
    from lmdistill.default import ensure_default_teacher, train_tokenizer

    spec = SETTINGS[setting]
    same = AutoTokenizer.from_pretrained(teacher_dir)
    if spec["other_vocab"]:
        other = train_tokenizer(embedded_corpus_texts(), spec["other_vocab"])
    else:
        other = AutoTokenizer.from_pretrained(ensure_default_teacher(progress=False))
    made = {
        "same": make_student(work / "student-same", teacher_dir, same, spec["shape"]),
        "other": make_student(work / "student-other", teacher_dir, other, spec["shape"]),
    }
    if "wide_shape" in spec:
        made["wide"] = make_student(work / "student-wide", teacher_dir, other, spec["wide_shape"])
    return made


def summary(run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    final = info["final"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x][5:]  # past the first steps' warm-up
    return {
        "eval_bpb": final.get("eval_bpb"),
        "teacher_bpb": final.get("teacher_bpb"),
        "eval_ppl": final["eval_ppl"],
        "aligned_fraction": final.get("aligned_fraction"),
        "steps": info["steps_done"],
        "student_params": info["student"]["params"],
        "median_tokens_per_s": statistics.median(rates) if rates else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="embedded")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"some of {', '.join(ROWS)}")
    parser.add_argument("--work", default="/tmp/lmdistill-bench-crosstok")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, help="steps of every row (default: the setting's)")
    args = parser.parse_args()
    from lmdistill.default import ensure_default_teacher
    from lmdistill.models.loading import resolve_source

    spec = SETTINGS[args.setting]
    work = Path(args.work) / (args.setting + (f"-{args.max_steps}" if args.max_steps else ""))
    work.mkdir(parents=True, exist_ok=True)
    teacher = fetch(say=lambda _: None) if args.setting == "smollm2" else ensure_default_teacher(progress=False)
    train, held_out = split_corpus(Path(args.work))
    student_dirs = students(args.setting, work, Path(resolve_source(str(teacher), "teacher")))  # (a GGUF: converted)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch threads {os.environ.get('OMP_NUM_THREADS')}",
        setting=args.setting,
        lr=spec["lr"],
        max_steps=args.max_steps,
    )
    results.setdefault("rows", {})
    common = [
        "--teacher", str(teacher), "--data", str(train), "--set", f"data.eval_path={held_out}",
        "--set", "data.max_eval_blocks=null", "--batch-size", "2", "--lr", str(spec["lr"]), "--no-progress",
        "--set", "checkpoint.keep=1", *spec["common"],
    ]  # fmt: skip
    if args.max_steps:  # (every row: the same number of steps, evaluated at the start and the end)
        common += ["--max-steps", str(args.max_steps), "--eval-every", str(args.max_steps)]
    for name in args.rows.split(","):
        student, extra = ROWS[name]
        run = work / name
        print(f"{args.setting}: {name}", flush=True)
        teacher_args = common[:2]
        if name in CACHED:  # the teacher runs once, into the cache; the run reads the cache instead
            cache = work / f"{name}-cache"
            results.setdefault("cache_builds", {})[name] = build_cache(
                common, student_dirs[student], cache, work, CACHED[name]
            )
            teacher_args = ["--teacher-cache", str(cache)]
        cmd = ["train", *teacher_args, *common[2:], "--student", str(student_dirs[student]), *extra]
        measured = run_measured([*cmd, "--output-dir", str(run), "--overwrite"], work / f"{name}.log")
        results["rows"][name] = {**summary(run), **measured, "tokenizer": student}
        out.write_text(json.dumps(results, indent=2) + "\n")
    table(results)


def build_cache(common: list[str], student: Path, cache: Path, work: Path, temperature: float) -> dict:
    """``cache-teacher --student`` with the runs' teacher and data settings: its wall time, peak
    memory and size on disk."""
    data = [
        x for i, x in enumerate(common) if x.startswith("data.") or (x == "--set" and common[i + 1].startswith("data."))
    ]
    cmd = [
        "cache-teacher",
        *common[:4],
        *data,
        "--student",
        str(student),
        "--temperature",
        str(temperature),
        "--out",
        str(cache),
    ]
    measured = run_measured([*cmd, "--overwrite", "--no-progress"], work / f"{cache.name}.log")
    manifest = json.loads((cache / "manifest.json").read_text())
    size = sum(shard["bytes"] for shard in manifest["shards"].values())
    return {**measured, "mib": round(size / 2**20, 1), "teacher_bpb": manifest["teacher_eval"]["teacher_bpb"]}


def gap_closed(rows: dict, ce: str, kd: str) -> float | None:
    """The share of the CE-only student's bits-per-byte gap to the teacher that KD closes."""
    if ce not in rows or kd not in rows:
        return None
    teacher = rows[kd]["teacher_bpb"]
    return (rows[ce]["eval_bpb"] - rows[kd]["eval_bpb"]) / (rows[ce]["eval_bpb"] - teacher)


def table(results: dict) -> None:
    rows = results["rows"]
    print(f"\n{results['setting']} (bits per byte of the held-out text; lower is better)\n")
    print("| row | student tokenizer | bits/byte | teacher bits/byte | aligned | tokens/s | peak RSS | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        aligned = f"{r['aligned_fraction']:.1%}" if r.get("aligned_fraction") is not None else "-"
        bpb = f"{r['eval_bpb']:.4f}" if r.get("eval_bpb") is not None else "-"
        teacher = f"{r['teacher_bpb']:.4f}" if r.get("teacher_bpb") is not None else "-"
        print(
            f"| {name} | {r['tokenizer']} | {bpb} | {teacher} | {aligned} | {r['median_tokens_per_s']:,.0f} | "
            f"{r['peak_rss_mib']:.0f} MiB | {r['wall_s']:.0f} s |"
        )
    same, cross = gap_closed(rows, "same_ce", "same_kd"), gap_closed(rows, "cross_ce", "cross_kd")
    if same is not None and cross is not None:
        print(f"\ngap to the teacher closed: same tokenizer {same:.1%}, across tokenizers {cross:.1%}")
        print(f"cross-tokenizer KD keeps {cross / same:.0%} of ordinary KD's gain (goal: at least 50%)")
    wide = gap_closed(rows, "wide_ce", "wide_kd")
    if same is not None and wide is not None:
        print(f"at equal parameters: across tokenizers {wide:.1%}, keeping {wide / same:.0%} of ordinary KD's gain")
    for name, build in results.get("cache_builds", {}).items():
        cached = gap_closed(rows, "cross_ce", name)
        closes = f"closes {cached:.1%} of the gap; " if cached is not None else ""
        print(
            f"{name}: {closes}its cache took {build['wall_s']:.0f} s to build "
            f"({build['mib']:,.1f} MiB, peak RSS {build['peak_rss_mib']:.0f} MiB)"
        )
    same_t1, live_t1 = gap_closed(rows, "same_ce", "same_kd_t1"), gap_closed(rows, "cross_ce", "cross_kd_t1")
    if same_t1 is not None and live_t1 is not None:
        print(f"at T = 1: same tokenizer {same_t1:.1%}, across {live_t1:.1%}: keeps {live_t1 / same_t1:.0%}")


if __name__ == "__main__":
    main()
