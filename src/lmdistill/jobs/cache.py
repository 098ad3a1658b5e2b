"""``lmdistill cache-teacher``: run the teacher once over a run's blocks and write its cache.

The teacher's forward is the training signal's (``LiveLogits``, attention mask included), so a
cached run sees the numbers a live one would. Several processes (``torchrun``) split the shards;
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


def build_teacher_cache(cfg: Config, out: Path, overwrite: bool, progress: bool) -> None:
    """Write (or finish, or leave alone when complete) the teacher cache ``out`` for ``cfg``."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    with _process_group(world):
        resolve_default_teacher(cfg, progress=progress and rank == 0)
        teacher, tokenizer, teacher_name = _load_teacher(cfg)
        data = build_block_data(cfg.data, tokenizer, progress=progress)
        request = tc.build_request(cfg, tokenizer, data, model_reference(teacher_name), len(tokenizer))
        try:
            if _already_complete(out, request, overwrite, rank, world):
                if rank == 0:
                    print(
                        f"teacher cache '{out}' is already complete for this teacher, data and settings; nothing to do"
                    )
                return
            if rank == 0:
                _announce(cfg, out, request, data, len(tokenizer))
            started = time.perf_counter()
            _write_shards(cfg, out, request, teacher, data, rank, world, progress)
            if world > 1:
                torch.distributed.barrier()
            if rank == 0:
                _report(tc.finish(out, request), out, started)
        finally:
            if rank == 0:
                tc.release(out)


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
    if cfg.cache.mode == "topk" and cfg.cache.k >= len(tokenizer):
        # (k = V leaves no tail: its mass is 0, its log -inf, and every step would be nonfinite)
        raise LmdistillError(
            f"cache.k = {cfg.cache.k} (--k) is not below the vocabulary of {len(tokenizer):,} tokens; "
            f"give --k {len(tokenizer) - 1} or less, or use --mode dense to keep every logit"
        )
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


def _announce(cfg: Config, out: Path, request: dict, data, vocab: int) -> None:
    per_token = tc.bytes_per_token(cfg.cache.mode, vocab, cfg.cache.samples, cfg.cache.k)
    positions = (len(data.train) + len(data.eval)) * request["positions_per_block"]
    print(
        f"caching the teacher: {tc.describe(request)}, {positions:,} positions -> {out}\n"
        f"estimated size {tc.estimated_bytes(request) / 2**20:,.1f} MiB: {per_token} bytes per position "
        f"({per_token / tc.dense_fp16_bytes(vocab):.2%} of fp16 logits at V={vocab:,})"
    )


def _write_shards(cfg: Config, out: Path, request: dict, teacher, data, rank: int, world: int, progress: bool):
    """This process's share of the shards still to write."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    teacher = teacher.to(device)
    todo = tc.shards_to_do(out, request, rank, world)
    blocks = {"train": data.train, "eval": data.eval}
    positions = sum(end - start for _, _, start, end in todo) * request["positions_per_block"]
    bar = progress_bar(positions, 0, "teacher", progress and rank == 0, unit="tok")
    started = time.perf_counter()
    for split, index, start, end in todo:
        tc.write_shard(
            out, teacher, blocks[split], split, index, start, end, request, cfg.cache.batch_size, device, bar.update
        )
        bar.set_postfix({"tokens/s": f"{bar.n / max(time.perf_counter() - started, 1e-9):,.0f}"})
    bar.close()


def _report(manifest: dict, out: Path, started: float) -> None:
    size = sum(s["bytes"] for s in manifest["shards"].values())
    print(
        f"teacher cache written: {out} ({len(manifest['shards'])} shards, {size / 2**20:,.1f} MiB, "
        f"{tc.elapsed_since(started)}); teacher held-out perplexity "
        f"{manifest['teacher_eval']['teacher_ppl']:.4g}\n"
        f"train from it: lmdistill train --teacher-cache {out} --data ... (the same data settings)"
    )
