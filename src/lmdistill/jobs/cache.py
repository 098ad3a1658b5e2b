"""``lmdistill cache-teacher``: run the teacher once over a run's blocks and write its cache.

The teacher's forward is the training signal's (``LiveLogits``, attention mask included), so a
cached run sees the numbers a live one would. With ``--student`` naming a student whose tokenizer
differs, the blocks are the student's and the teacher's view of each is the live cross-tokenizer
signal's (``LiveAligned``), carried to the student's tokens before it is kept. Several processes (``torchrun``) split the shards;
process 0 holds the cache's build lock for the whole launch and writes the manifest last.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from lmdistill.config import Config
from lmdistill.core.errors import LmdistillError
from lmdistill.core.files import model_reference
from lmdistill.core.progress import progress_bar
from lmdistill.data.sources import build_block_data
from lmdistill.data.store import tokenizer_hash
from lmdistill.default import resolve_default_teacher
from lmdistill.models.loading import (
    check_causal,
    check_vocab_covers,
    crosses_tokenizers,
    freeze,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from lmdistill.teacher import cache as tc
from lmdistill.teacher.signals import LiveAligned, LiveLogits
from lmdistill.training.setup import check_teacher_windows


def build_teacher_cache(cfg: Config, out: Path, overwrite: bool, progress: bool) -> None:
    """Write (or finish, or leave alone when complete) the teacher cache ``out`` for ``cfg``."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    with _process_group(world):
        resolve_default_teacher(cfg, progress=progress and rank == 0)
        teacher, tokenizer, teacher_name = _load_teacher(cfg)
        data, signal, request = _plan(cfg, teacher, tokenizer, teacher_name, progress)
        try:
            if _already_complete(out, request, overwrite, rank, world):
                if rank == 0:
                    print(
                        f"teacher cache '{out}' is already complete for this teacher, data and settings; nothing to do"
                    )
                return
            if rank == 0:
                _announce(out, request, data)
            started = time.perf_counter()
            _write_shards(cfg, out, request, teacher, signal, data, rank, world, progress)
            if world > 1:
                torch.distributed.barrier()
            if rank == 0:
                _report(tc.finish(out, request), out, started)
        finally:
            if rank == 0:
                tc.release(out)


# How the targets across tokenizers are made (loss/crosstok.py), in the build request: a cache made
# another way is a different cache, rebuilt rather than taken as complete. Changed with the method.
CARRIED_TARGETS = (
    "carried at pairs, with longer student tokens' text; continuations inside spans; "
    "teacher tokens as the student writes them mid-text, byte pieces by their bytes"
)


def _plan(cfg: Config, teacher, tokenizer, teacher_name: str, progress: bool):
    """(the blocks, the teacher signal that sees them, the build request): the teacher's own
    blocks, or, for a student with another tokenizer (``--student``), the student's, each with the
    teacher's tokens of its text."""
    student_tokenizer = _student_tokenizer(cfg, tokenizer, teacher_name)
    reference = model_reference(teacher_name)
    if student_tokenizer is None:
        if cfg.cache.mode == "topk" and cfg.cache.k >= len(tokenizer):
            # (k = V leaves no tail: its mass is 0, its log -inf, and every step would be nonfinite)
            raise LmdistillError(
                f"cache.k = {cfg.cache.k} (--k) is not below the vocabulary of {len(tokenizer):,} tokens; "
                f"give --k {len(tokenizer) - 1} or less, or use --mode dense to keep every logit"
            )
        data = build_block_data(cfg.data, tokenizer, progress=progress)
        signal = LiveLogits(teacher, len(tokenizer))  # the teacher's forward exactly as training runs it
        return data, signal, tc.build_request(cfg, tokenizer, data, reference, len(tokenizer))
    data = build_block_data(cfg.data, student_tokenizer, progress, teacher_tokenizer=tokenizer)
    check_teacher_windows(data, teacher)
    across = {
        "teacher_tokenizer": tokenizer_hash(tokenizer),
        "teacher_vocab_size": len(tokenizer),
        "targets": CARRIED_TARGETS,
    }
    request = tc.build_request(cfg, student_tokenizer, data, reference, len(student_tokenizer), across)
    return data, LiveAligned(teacher, tokenizer, student_tokenizer), request


@contextlib.contextmanager
def _process_group(world: int):
    """A gloo process group for the launch's processes (none for one process), closed on the way out."""
    if world == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _load_teacher(cfg: Config):
    """(teacher, tokenizer, name), checked before the data or the cache are touched: a teacher
    that does not cover the tokenizer would index past its rows, and a bidirectional one (BERT)
    is no next-token teacher."""
    name = resolve_source(cfg.model.teacher, "model.teacher")
    tokenizer = load_tokenizer(name, "teacher")
    teacher = freeze(load_causal_lm(name, "teacher", torch.float32, cfg.model.trust_remote_code))
    check_vocab_covers(teacher, len(tokenizer), "teacher", name)
    check_causal(teacher, "teacher", name, len(tokenizer))
    return teacher, tokenizer, name


def _already_complete(out: Path, request: dict, overwrite: bool, rank: int, world: int) -> bool:
    """Whether ``out`` holds this cache already (process 0 decides and takes the build lock)."""
    complete = tc.prepare_out(out, request, overwrite) if rank == 0 else False
    if world > 1:
        flag = torch.tensor([int(complete)])
        torch.distributed.broadcast(flag, 0)
        complete = bool(flag.item())
    return complete


def _student_tokenizer(cfg: Config, teacher_tokenizer, teacher_name: str):
    """The tokenizer of ``model.student`` (``--student``) when it differs from the teacher's: the
    cache is then built across the two; None without a student, or with one of the teacher's."""
    if cfg.model.student is None:
        return None
    student_name = resolve_source(cfg.model.student, "model.student")
    student_tokenizer = load_tokenizer(student_name, "student")
    if not crosses_tokenizers(cfg, teacher_tokenizer, student_tokenizer, teacher_name, student_name):
        print(f"note: student '{student_name}' uses the teacher's tokenizer: an ordinary cache serves it")
        return None
    if cfg.cache.mode == "dense":
        raise LmdistillError(
            "cache.mode = dense keeps the teacher's logits over its own vocabulary, and a student with another "
            "tokenizer trains from targets carried to its tokens; use --mode sampled or --mode topk"
        )
    if cfg.cache.mode == "topk" and cfg.cache.k >= len(student_tokenizer):
        raise LmdistillError(
            f"cache.k = {cfg.cache.k} (--k) is not below the student's vocabulary of {len(student_tokenizer):,} "
            f"tokens, which the targets are kept in; give --k {len(student_tokenizer) - 1} or less"
        )
    return student_tokenizer


def _announce(out: Path, request: dict, data) -> None:
    per_token = tc.request_bytes_per_token(request)
    positions = (len(data.train) + len(data.eval)) * request["positions_per_block"]
    vocab = request["vocab_size"]
    across = " across tokenizers, in the student's vocabulary" if request.get("cross_tokenizer") else ""
    print(
        f"caching the teacher{across}: {tc.describe(request)}, {positions:,} positions -> {out}\n"
        f"estimated size {tc.estimated_bytes(request) / 2**20:,.1f} MiB: {per_token} bytes per position "
        f"({per_token / tc.dense_fp16_bytes(vocab):.2%} of fp16 logits at V={vocab:,})"
    )


def _write_shards(
    cfg: Config, out: Path, request: dict, teacher, signal, data, rank: int, world: int, progress: bool
) -> None:
    """This process's share of the shards still to write."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    teacher.to(device)  # (in place: the signal holds this module)
    todo = tc.shards_to_do(out, request, rank, world)
    blocks = {"train": data.train, "eval": data.eval}
    positions = sum(end - start for _, _, start, end in todo) * request["positions_per_block"]
    bar = progress_bar(positions, 0, "teacher", progress and rank == 0, unit="tok")
    started = time.perf_counter()
    for split, index, start, end in todo:
        tc.write_shard(
            out, signal, blocks[split], split, index, start, end, request, cfg.cache.batch_size, device, bar.update
        )
        bar.set_postfix({"tokens/s": f"{bar.n / max(time.perf_counter() - started, 1e-9):,.0f}"})
    bar.close()


def _report(manifest: dict, out: Path, started: float) -> None:
    size = sum(s["bytes"] for s in manifest["shards"].values())
    evaluated = manifest["teacher_eval"]
    held_out = (
        f"the teacher's held-out bits per byte {evaluated['teacher_bpb']:.4f} (perplexity "
        f"{evaluated['teacher_ppl']:.4g} over its own tokens)"
        if "teacher_bpb" in evaluated
        else f"teacher held-out perplexity {evaluated['teacher_ppl']:.4g}"
    )
    student = " --student STUDENT (the one it was built for)" if manifest.get("cross_tokenizer") else ""
    print(
        f"teacher cache written: {out} ({len(manifest['shards'])} shards, {size / 2**20:,.1f} MiB, "
        f"{tc.elapsed_since(started)}); {held_out}\n"
        f"train from it: lmdistill train --teacher-cache {out}{student} --data ... (the same data settings)"
    )
