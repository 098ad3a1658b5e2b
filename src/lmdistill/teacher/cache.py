"""The offline teacher cache: run the teacher once, train any number of students from it.

``lmdistill cache-teacher`` runs the teacher over the run's packed train and eval blocks and
keeps, per predicting position, what the mode needs:

- ``sampled`` (default): S draws (``cache.samples``, 12) from the teacher's distribution at
  the capture temperature (systematic sampling), as unique ids with their counts, the
  teacher's logits at those ids, the log-normaliser log Z and the entropy. Random-sampled KD
  (Anshumann et al. 2025): an unbiased estimate of the forward-KL loss and gradient
  (``sparse.py``).
- ``topk``: the k largest logits (``cache.k``) with their ids, log Z, the entropy and the
  tail mass outside them (an explicit bucket; biased, exact as a (k + 1)-bucket KL).
- ``dense``: every logit, fp32: the reference, for small vocabularies.

A cache is a directory::

    CACHE/
      .lmdistill-cache      the marker, written first: this directory is a teacher cache
      .lmdistill-cache.lock held (flock) by the build writing the cache; names its pid meanwhile
      build.json            what the build was asked to do (a rerun with the same request
                            resumes)
      train-00000.safetensors ...   rows [i R, (i + 1) R) of the train blocks, in row order
      eval-00000.safetensors  ...   the same for the eval blocks (also the teacher's CE sum)
      manifest.json         written last: format version, mode, S or k, capture temperature,
                            tokenizer and teacher content hashes, the data (store
                            fingerprints, block layout: block size, split seed, the order of
                            the train and eval blocks), dtypes, per-shard SHA-256 and the
                            teacher's held-out perplexity

A cache for a student with another tokenizer (``cache-teacher --student``) is built on the
student's blocks: the teacher runs on its own tokens of each block's text, and what it predicts
is carried to the student's vocabulary as in a live cross-tokenizer run (``loss/crosstok.py``)
and kept as the log-probabilities of a teacher over that vocabulary, in any of the modes above,
with each position's kind of target (``kind``: none, a pair, inside a span); its manifest names
the teacher's tokenizer and holds the teacher's held-out bits per byte.

Safetensors shards, not Arrow: each shard is a few fixed-shape arrays per block, read back a
block slice at a time (``safe_open(...).get_slice``) without parsing; the format is the one
the models already use, checked (sizes in its header) and memory-mapped when read.

Building is deterministic: shard i draws its samples from a generator seeded by (cache.seed,
split, i), so a build killed and rerun (finished shards are kept: each is renamed into place
when complete) ends byte-identical to an uninterrupted one, and ``torchrun --nproc_per_node
N`` (shard i on rank i mod N) writes the same cache as one process.

Only a cache is ever replaced (``--overwrite``): a directory with the marker (or, written
before the marker existed, a manifest or build.json of this format) and nothing but cache
files in it. One build writes a cache at a time: rank 0 holds the lock from the first check to
the manifest, and a second build is refused naming the first's pid.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmdistill.core.batch import IGNORE_INDEX
from lmdistill.core.errors import LmdistillError
from lmdistill.core.files import ManifestDir, file_record
from lmdistill.core.paths import LockHeld, atomic_write_json, claim_lock, is_plain_file, protected_place, sha256_file
from lmdistill.data.store import id_dtype, tokenizer_hash
from lmdistill.loss.crosstok import carried_distribution
from lmdistill.loss.sparse import SparseTargets
from lmdistill.loss.views import TeacherAligned

FORMAT_VERSION = 1
MODES = ("sampled", "topk", "dense")
MANIFEST, BUILD = "manifest.json", "build.json"
MARKER, LOCK = ".lmdistill-cache", ".lmdistill-cache.lock"
# A marker's content is fixed: caches built alike stay byte-identical, the marker included.
MARKER_CONTENT = {"format": "lmdistill-teacher-cache", "version": 1}
_CACHE_FILE = re.compile(r"^(train|eval)-\d{5}\.safetensors$")
_TEMPORARY = re.compile(r"^\.(.+)\.tmp-\d+$")  # an unfinished shard or JSON write: ".<name>.tmp-<pid>"
_HELD: dict[Path, int] = {}  # caches whose build lock this process holds -> the lock's descriptor


# ---------------------------------------------------------------------------- the format
def tensor_layout(
    mode: str, positions: int, vocab_size: int, samples: int, k: int, across: bool = False
) -> dict[str, tuple]:
    """name -> (shape per block, numpy dtype) of a shard's per-block tensors. ``across``: a cache
    for a student with another tokenizer, which also says what the teacher's target at each
    position is (``kind``: ``NONE``, ``PAIR`` or ``INSIDE``)."""

    ids = id_dtype(vocab_size)
    marks = {"kind": ((positions,), "uint8")} if across else {}
    if mode == "sampled":
        return {
            "ids": ((positions, samples), ids),
            "counts": ((positions, samples), "uint8"),
            "logits": ((positions, samples), "float32"),
            "logz": ((positions,), "float32"),
            "entropy": ((positions,), "float32"),
            **marks,
        }
    if mode == "topk":
        return {
            "ids": ((positions, k), ids),
            "logits": ((positions, k), "float32"),
            "logz": ((positions,), "float32"),
            "entropy": ((positions,), "float32"),
            "tail": ((positions,), "float32"),
            **marks,
        }
    return {"logits": ((positions, vocab_size), "float32")}


def layout_of(record: dict) -> dict[str, tuple]:
    """``tensor_layout`` of a build request or manifest."""
    return tensor_layout(
        record["mode"],
        record["positions_per_block"],
        record["vocab_size"],
        record.get("samples") or 0,
        record.get("k") or 0,
        record.get("cross_tokenizer") is not None,
    )


def bytes_per_token(mode: str, vocab_size: int, samples: int = 12, k: int = 12) -> int:
    """What one position costs on disk in ``mode`` (from the format, not measured)."""
    layout = tensor_layout(mode, 1, vocab_size, samples, k)
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layout.values())


def dense_fp16_bytes(vocab_size: int) -> int:
    """The usual yardstick: one position's full logits in fp16."""
    return 2 * vocab_size


# ---------------------------------------------------------------------------- capture
def capture(
    logits: torch.Tensor, mode: str, temperature: float, samples: int, k: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """What a cache keeps of (N, V) fp32 teacher logits."""
    if mode == "dense":
        return {"logits": logits}
    scaled = logits / temperature
    logz = torch.logsumexp(scaled, dim=-1)
    log_p = scaled - logz.unsqueeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    if mode == "topk":
        top, ids = logits.topk(k, dim=-1)
        tail = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), dim=-1).exp()
        return {"ids": ids, "logits": top, "logz": logz, "entropy": entropy, "tail": tail}
    ids, counts = unique_with_counts(systematic_draws(log_p.exp(), samples, generator))
    return {"ids": ids, "counts": counts, "logits": logits.gather(1, ids), "logz": logz, "entropy": entropy}


def systematic_draws(probs: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """(N, S) draws per row of (N, V) ``probs`` by systematic sampling: S points u, u + 1/S, ...
    (one uniform u per row) read through the row's cumulative distribution.

    Every token is still drawn S p times in expectation, so ``counts / S`` stays an unbiased
    estimate of p, but its count is always floor(S p) or ceil(S p): a token with p >= 1/S is
    never missed and the head of the distribution is nearly exact, where independent draws
    leave a variance of p (1 - p) / S on every token (docs/cache.md has the measured effect).
    """
    cdf = probs.double().cumsum(-1)
    offsets = torch.rand(len(cdf), 1, generator=generator, dtype=torch.float64)
    points = (torch.arange(samples, dtype=torch.float64) + offsets) / samples * cdf[:, -1:]
    return torch.searchsorted(cdf, points, right=True).clamp_max_(cdf.shape[-1] - 1)


def unique_with_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (N, S) draws: the distinct ids, ascending and left-aligned, with their counts;
    the unused slots hold id 0 with count 0."""
    ordered = draws.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = first.long().cumsum(1) - 1
    ids = torch.zeros_like(ordered).scatter_(1, slot, ordered)
    counts = torch.zeros_like(ordered).scatter_add_(1, slot, torch.ones_like(ordered))
    return ids, counts


def retempered(
    ids, counts, logits, logz, entropy, samples: float, t_capture: float, temperature: float
) -> SparseTargets:
    """Sampled targets at ``temperature`` from draws made at ``t_capture``.

    At the capture temperature the draws' own frequencies ``counts / S`` (exact in
    expectation). At another one, self-normalised importance weights
    ``w_j ~ c_j exp(z_j (1/T - 1/T_c))``, with log Z_T estimated from the same draws: consistent
    as S grows, biased for a few draws (the weights stay on the ids that were drawn).
    """
    if temperature == t_capture:
        logp = logits / t_capture - logz.unsqueeze(1)
        return SparseTargets(ids, counts / samples, logp, None, entropy)
    log_ratio = torch.where(counts > 0, counts.log() + logits * (1 / temperature - 1 / t_capture), float("-inf"))
    weights = torch.softmax(log_ratio, dim=-1)
    log_z = logz + torch.logsumexp(log_ratio, dim=-1) - math.log(samples)
    logp = logits / temperature - log_z.unsqueeze(1)
    return SparseTargets(ids, weights, logp)


# ---------------------------------------------------------------------------- the cache on disk
@dataclass
class TeacherCache:
    """A finished cache, opened for training: shards are read a block slice at a time."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> TeacherCache:
        path = Path(path).expanduser()
        if not (path / MANIFEST).is_file():
            what = (
                "an unfinished cache build (rerun lmdistill cache-teacher to finish it)"
                if (path / BUILD).is_file()
                else "not a teacher cache"
            )
            raise LmdistillError(
                f"model.teacher_cache '{path}' is {what}; give the directory lmdistill cache-teacher --out wrote"
            )
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            manifest, problem = None, f"not valid JSON: {exc}"
        else:
            problem = manifest_problem(manifest)
        if (
            isinstance(manifest, dict)
            and isinstance(manifest.get("format_version"), int)
            and manifest["format_version"] != FORMAT_VERSION
        ):
            raise LmdistillError(
                f"teacher cache '{path}' has format version {manifest.get('format_version')}; this "
                f"lmdistill reads {FORMAT_VERSION}: rebuild it with lmdistill cache-teacher"
            )
        if problem is not None:
            raise LmdistillError(
                f"teacher cache '{path}': {MANIFEST} is damaged or was not written by lmdistill "
                f"({problem}); rebuild the cache with lmdistill cache-teacher"
            )
        cache = cls(path, manifest)
        if verify:
            cache.verify()
        return cache

    def verify(self) -> None:
        """Every shard's SHA-256 against the manifest: a corrupt shard is an error, never used."""
        for name, record in self.manifest["shards"].items():
            file = self.path / name
            if not file.is_file() or file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
                raise LmdistillError(
                    f"teacher cache '{self.path}': shard {name} does not match its SHA-256 in the "
                    "manifest (damaged or changed); rebuild the cache with lmdistill cache-teacher"
                )
            problem = shard_values_problem(file, self.manifest)
            if problem is not None:
                raise LmdistillError(
                    f"teacher cache '{self.path}': shard {name} is damaged ({problem}); rebuild the "
                    "cache with lmdistill cache-teacher"
                )

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def temperature(self) -> float:
        return float(self.manifest["capture_temperature"])

    @property
    def across(self) -> dict | None:
        """For a student with another tokenizer than the teacher's (``cache-teacher --student``):
        the teacher's tokenizer hash and vocabulary size; None for a cache in the teacher's tokenizer."""
        return self.manifest.get("cross_tokenizer")

    def read(self, split: str, rows) -> dict[str, torch.Tensor]:
        """The cached tensors of ``rows`` (indices into the split's blocks), stacked in that order."""
        from safetensors import safe_open

        rows = torch.as_tensor(rows, dtype=torch.long)
        per = self.manifest["shard_rows"]
        parts: dict[str, list] = {}
        order = []
        for shard in torch.unique(rows // per).tolist():
            local = rows[rows // per == shard] - shard * per
            order.append(torch.nonzero(rows // per == shard).squeeze(1))
            with safe_open(self.path / f"{split}-{shard:05d}.safetensors", framework="np") as f:
                for name in self.manifest["tensors"]:
                    block = f.get_slice(name)
                    lo, hi = int(local.min()), int(local.max()) + 1
                    parts.setdefault(name, []).append(
                        torch.from_numpy(
                            np.ascontiguousarray(block[lo:hi]).astype(_torch_safe(self.manifest["tensors"][name]))
                        )[local - lo]
                    )
        position = torch.cat(order)
        out = {}
        for name, pieces in parts.items():
            stacked = torch.cat(pieces)
            out[name] = torch.empty_like(stacked).index_copy_(0, position, stacked)
        return out

    def targets(self, split: str, rows, temperature: float) -> SparseTargets | torch.Tensor:
        """The teacher's view of ``rows`` at ``temperature``: (B, P, V) logits for ``dense``,
        else ``SparseTargets`` of shape (B * P, slots)."""
        data = self.read(split, rows)
        if self.mode == "dense":
            return data["logits"]
        ids = data["ids"].long().flatten(0, 1)
        logits = data["logits"].flatten(0, 1)
        logz, entropy = data["logz"].flatten(), data["entropy"].flatten()
        t_c = self.temperature
        if self.mode == "topk":
            if temperature != t_c:
                raise LmdistillError(
                    f"a topk cache trains at its capture temperature {t_c:g} only, not {temperature:g}; "
                    "set distill.temperature and distill.min_temperature to it, or use a sampled "
                    "or dense cache"
                )
            logp = logits / t_c - logz.unsqueeze(1)
            targets = SparseTargets(ids, logp.exp(), logp, data["tail"].flatten())
        else:
            counts = data["counts"].float().flatten(0, 1)
            samples = float(self.manifest["samples"])
            targets = retempered(ids, counts, logits, logz, entropy, samples, t_c, temperature)
        if "kind" in data:  # across tokenizers: where the teacher is silent, the data's token alone
            kind = data["kind"].flatten()
            targets.present, targets.paired = kind != NONE, kind == PAIR
        return targets

    def check_run(self, tokenizer, data, vocab_size: int) -> None:
        """One line naming what differs when this cache was not built for this run's data."""

        m = self.manifest
        if m["tokenizer"] != tokenizer_hash(tokenizer):
            built_for = (
                "for a student with another tokenizer than this run's student's (cache-teacher --student)"
                if self.across
                else "with another tokenizer than this run's student's"
            )
            raise LmdistillError(
                f"teacher cache '{self.path}' was built {built_for}; a cache serves students of the tokenizer it was "
                "built for only: train a student with that tokenizer, build a cache for this student with "
                "lmdistill cache-teacher --student, or name the teacher itself in model.teacher (lmdistill then "
                "distils across the two tokenizers)"
            )
        if m["vocab_size"] != vocab_size:
            raise LmdistillError(
                f"teacher cache '{self.path}' has a vocabulary of {m['vocab_size']} tokens, this run "
                f"{vocab_size}; rebuild the cache for this run's tokenizer"
            )
        cached, now = m["data"]["layout"], data.layout
        for key, what in (
            ("block_size", "block size (data.block_size)"),
            ("split_seed", "split (data.split_seed)"),
            ("eval_fraction", "eval split (data.eval_fraction)"),
        ):
            if cached.get(key) != now.get(key):
                raise LmdistillError(
                    f"teacher cache '{self.path}' was built for {what} {cached.get(key)}, this run "
                    f"uses {now.get(key)}; set it back or rebuild the cache"
                )
        if [s["fingerprint"] for s in m["data"]["sources"]] != [s.store.fingerprint for s in data.sources]:
            raise LmdistillError(
                f"teacher cache '{self.path}' was built from other data (its data store fingerprints "
                "differ from this run's); give the data it was built from, or rebuild the cache"
            )
        for split in ("train", "eval"):
            if cached.get(split) != now.get(split):
                raise LmdistillError(
                    f"teacher cache '{self.path}': this run's {split} blocks are not the ones it was "
                    f"built for (other data.max_eval_blocks, data.loss_on or sources); match the "
                    "cache's settings or rebuild it"
                )


def manifest_problem(m) -> str | None:
    """What makes ``m`` something other than a manifest ``finish`` wrote, in words; None when it has
    that shape: the mode known, the numbers of the right type and range, the tensors those of the
    mode, and one shard record for every shard of its blocks (and no other)."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    if m.get("format_version") != FORMAT_VERSION:
        return f"format_version is {m.get('format_version')!r}"
    if m.get("mode") not in MODES:
        return f"mode {m.get('mode')!r} is none of {', '.join(MODES)}"
    return _numbers_problem(m) or _sources_problem(m) or _shards_problem(m)


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _numbers_problem(m: dict) -> str | None:
    wanted = {"samples": m["mode"] == "sampled", "k": m["mode"] == "topk"}
    for key, least in (
        ("shard_rows", 1),
        ("positions_per_block", 1),
        ("vocab_size", 1),
        ("seed", 0),
        *((key, 1) for key, used in wanted.items() if used),
    ):
        if not _whole(m.get(key), least):
            return f"{key} is {m.get(key)!r}, not a whole number >= {least}"
    if m["mode"] == "topk" and m["k"] >= m["vocab_size"]:
        return f"k = {m['k']} leaves no tail below the vocabulary of {m['vocab_size']} tokens"
    temperature = m.get("capture_temperature")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        return f"capture_temperature is {temperature!r}, not a number > 0"
    rows = m.get("rows")
    if not isinstance(rows, dict) or not all(_whole(rows.get(split), 0) for split in ("train", "eval")):
        return f"rows is {rows!r}, not the train and eval block counts"
    return None


def _sources_problem(m: dict) -> str | None:
    if not isinstance(m.get("tokenizer"), str) or not isinstance(m.get("teacher"), dict):
        return "the tokenizer hash or the teacher reference is missing"
    data = m.get("data")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("layout"), dict)
        or not isinstance(data.get("sources"), list)
        or not all(isinstance(s, dict) and "fingerprint" in s for s in data["sources"])
    ):
        return "the data it was built from (layout, sources) is missing"
    evaluated = m.get("teacher_eval")
    if (
        not isinstance(evaluated, dict)
        or isinstance(evaluated.get("teacher_ce_loss"), bool)
        or not isinstance(evaluated.get("teacher_ce_loss"), (int, float))
    ):
        return "the teacher's held-out loss (teacher_eval) is missing"
    return _across_problem(m, evaluated)


def _across_problem(m: dict, evaluated: dict) -> str | None:
    """A cache built across tokenizers names the teacher's tokenizer and vocabulary, and records
    the teacher's held-out bits per byte."""
    across = m.get("cross_tokenizer")
    if across is None:
        return None
    if (
        not isinstance(across, dict)
        or not isinstance(across.get("teacher_tokenizer"), str)
        or not _whole(across.get("teacher_vocab_size"), 1)
    ):
        return "cross_tokenizer does not name the teacher's tokenizer and vocabulary size"
    bpb = evaluated.get("teacher_bpb")
    if isinstance(bpb, bool) or not isinstance(bpb, (int, float)):
        return "the teacher's held-out bits per byte (teacher_eval.teacher_bpb) are missing"
    return None


def _shards_problem(m: dict) -> str | None:
    layout = layout_of(m)
    if m.get("tensors") != {name: dtype for name, (_, dtype) in layout.items()}:
        return f"its tensors are not those of a {m['mode']} cache"
    rows = m["rows"]
    shards, names = m.get("shards"), {f"{split}-{i:05d}.safetensors" for split, i, _, _ in shard_plan(m)}
    if not isinstance(shards, dict) or set(shards) != names:
        return (
            f"its shard list does not match its {rows['train']} train and {rows['eval']} eval blocks "
            f"({len(names)} shards)"
        )
    for name, record in shards.items():
        if (
            not isinstance(record, dict)
            or not _whole(record.get("bytes"), 0)
            or not isinstance(record.get("sha256"), str)
        ):
            return f"the record of shard {name} is not its size and SHA-256"
    return None


def shard_values_problem(file: Path, m: dict) -> str | None:
    """What makes a shard's values something ``write_shard`` never writes, in words; None when
    they fit the manifest: ids in [0, vocab), counts summing to S at every position (sampled),
    tail masses in [0, 1] (topk), no NaN. (A hash matches whatever was hashed: a cache built by
    another program, or hashed after it was changed, needs its values checked too.)"""
    from safetensors import safe_open

    with safe_open(file, framework="np") as f:
        t = {name: f.get_tensor(name) for name in m["tensors"]}
    for name, values in t.items():
        if values.dtype.kind == "f" and (np.isnan(values).any() or np.isposinf(values).any()):
            return f"{name} holds NaN or +inf"
    if "ids" in t and t["ids"].size and (int(t["ids"].min()) < 0 or int(t["ids"].max()) >= m["vocab_size"]):
        return f"token ids outside the vocabulary of {m['vocab_size']} tokens"
    if "counts" in t and (t["counts"].astype(np.int64).sum(-1) != m["samples"]).any():
        return f"sample counts that do not add up to {m['samples']} draws at every position"
    if "tail" in t and ((t["tail"] < 0) | (t["tail"] > 1)).any():
        return "tail masses outside [0, 1]"
    if "kind" in t and (t["kind"] > INSIDE).any():
        return f"position kinds other than {NONE}, {PAIR} and {INSIDE}"
    for name in ("logz", "entropy"):
        if name in t and not np.isfinite(t[name]).all():
            return f"{name} is not finite"
    return None


def _torch_safe(dtype: str) -> str:
    """torch has no uint16/uint32 arithmetic to speak of: widen ids on reading."""
    return {"uint16": "int32", "uint32": "int64"}.get(dtype, dtype)


# ---------------------------------------------------------------------------- building
def build_request(cfg, tokenizer, data, teacher_ref: dict, vocab_size: int, across: dict | None = None) -> dict:
    """What a build is asked to make: equal requests make byte-identical caches. ``across``: for a
    student with another tokenizer (``tokenizer``, ``vocab_size`` and ``data`` are then the
    student's), what names the teacher's tokenizer and the student."""

    c = cfg.cache
    temperature = c.temperature if c.temperature is not None else cfg.distill.temperature
    request = {
        "format_version": FORMAT_VERSION,
        "mode": c.mode,
        "samples": c.samples if c.mode == "sampled" else None,
        "sampling": "systematic" if c.mode == "sampled" else None,
        "k": c.k if c.mode == "topk" else None,
        "capture_temperature": float(temperature),
        "seed": c.seed,
        "shard_rows": c.shard_blocks,
        "tokenizer": tokenizer_hash(tokenizer),
        "teacher": teacher_ref,
        "vocab_size": vocab_size,
        "positions_per_block": data.train.block_size - 1,
        "data": {
            "layout": data.layout,
            "sources": [{"name": s.name, "fingerprint": s.store.fingerprint} for s in data.sources],
        },
        "rows": {"train": len(data.train), "eval": len(data.eval)},
    }
    if across is not None:  # (a key of its own: the requests of caches in the teacher's tokenizer stay as they were)
        request["cross_tokenizer"] = across
    return request


def prepare_out(out: Path, request: dict, overwrite: bool) -> bool:
    """Get ``out`` ready for a build of ``request``; True when the cache there is already complete.

    Takes the build lock (held until ``release``; under torchrun rank 0 alone calls this, and
    holds it for all ranks of its launch): two builds into one directory would otherwise mix
    their shards under one manifest. ``out`` is checked before anything is written into it,
    and again under the lock."""
    if out.exists() and not out.is_dir():
        raise LmdistillError(f"--out '{out}' is a file; give a directory for the cache")
    what = protected_place(out)
    if what is not None:
        raise LmdistillError(f"refusing to write a teacher cache into '{out}': it is {what}; give a new directory")
    _check_ours(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmdistillError(
            f"cannot create the cache directory '{out}' ({exc.strerror}); give a writable --out"
        ) from None
    _lock(out)
    is_cache = _check_ours(out)  # again: another process may have written here meanwhile
    if is_cache:
        earlier = _read_json(out / BUILD)
        if earlier == request:
            if is_plain_file(out / MANIFEST):
                return True
            _mark(out)  # resuming a build (one started before caches had a marker gets one)
            return False
        # (a marker alone is a build killed before it began: nothing to keep, nothing to ask)
        started = earlier is not None or any(n == MANIFEST or _CACHE_FILE.match(n) for n in os.listdir(out))
        if started and not overwrite:
            differs = _first_difference(earlier or {}, request)
            raise LmdistillError(
                f"'{out}' holds a different teacher cache ({differs}); pass --overwrite to replace it, "
                "or give another --out"
            )
        listed = _listed_shards(out, earlier)
        strays = sorted(
            name
            for name in os.listdir(out)
            if name not in listed
            and _CACHE_FILE.match(_TEMPORARY.match(name).group(1) if _TEMPORARY.match(name) else name)
        )
        if strays:  # named like a shard, but no record of this cache lists it: not ours to delete
            more = f" and {len(strays) - 1} more" if len(strays) > 1 else ""
            raise LmdistillError(
                f"--out '{out}' holds {strays[0]}{more}, named like a cache shard but not listed by "
                "the cache there; move it out, or give another --out (lmdistill never deletes what "
                "it did not write)"
            )
        for entry in os.scandir(out):  # only cache files are left (checked above); the lock we hold stays
            if entry.name != LOCK:
                os.unlink(entry.path)
    _mark(out)
    atomic_write_json(out / BUILD, request, fsync=True)
    return False


def _check_ours(out: Path) -> bool:
    """Whether ``out`` holds a teacher cache (True) or nothing (False); LmdistillError for a
    directory holding anything else. A cache is the marker, or (a cache written before the
    marker existed) a manifest or build.json of this format, with only cache files beside it."""
    if not out.is_dir():
        return False
    names = sorted(os.listdir(out))
    if not names or names == [LOCK] and is_plain_file(out / LOCK):
        return False
    legacy = any(_is_cache_record(_read_json(out / name)) for name in (MANIFEST, BUILD))
    if not is_plain_file(out / MARKER) and not legacy:
        raise LmdistillError(
            f"--out '{out}' is a directory that is not a teacher cache and not empty; give a new "
            "or empty directory (lmdistill never deletes what it did not write)"
        )
    foreign = [name for name in names if not _cache_file(out / name)]
    if foreign:
        raise LmdistillError(
            f"--out '{out}' holds a teacher cache and files lmdistill did not write ({foreign[0]}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); move them out, or give "
            "another --out (lmdistill never deletes what it did not write)"
        )
    return True


def _listed_shards(out: Path, earlier) -> set[str]:
    """The shard files (and their unfinished temporaries) the cache in ``out`` records: those of
    its manifest, or of its build.json's plan while it is unfinished."""
    names = set()
    manifest = _read_json(out / MANIFEST)
    if isinstance(manifest, dict) and isinstance(manifest.get("shards"), dict):
        names |= set(manifest["shards"])
    for record in (earlier, manifest):
        with contextlib.suppress(TypeError, KeyError, ValueError, ZeroDivisionError):  # a damaged record names none
            names |= {f"{split}-{i:05d}.safetensors" for split, i, _, _ in shard_plan(record)}
    temporaries = {n for n in os.listdir(out) if _TEMPORARY.match(n) and _TEMPORARY.match(n).group(1) in names}
    return names | temporaries


def _cache_file(path: Path) -> bool:
    """A regular file (never a link) with a name a cache build writes."""
    match = _TEMPORARY.match(path.name)
    name = match.group(1) if match else path.name
    return is_plain_file(path) and (name in (MARKER, LOCK, BUILD, MANIFEST) or bool(_CACHE_FILE.match(name)))


def _is_cache_record(record) -> bool:
    """A build.json or manifest.json of this format (what a cache without a marker is known by)."""
    return (
        isinstance(record, dict)
        and record.get("format_version") == FORMAT_VERSION
        and record.get("mode") in MODES
        and {"capture_temperature", "shard_rows", "rows", "tokenizer"} <= record.keys()
    )


def _read_json(path: Path):
    if not is_plain_file(path):
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mark(out: Path) -> None:
    if not is_plain_file(out / MARKER):  # (the rename replaces a link, never writes through it)
        atomic_write_json(out / MARKER, MARKER_CONTENT, fsync=True)


def _lock(out: Path) -> None:
    """Take ``out``'s build lock, or stop in one line naming the build that holds it."""
    key = out.resolve()
    if key in _HELD:
        return
    try:
        _HELD[key] = claim_lock(out / LOCK, "teacher cache lock")
    except LockHeld as held:
        raise LmdistillError(
            f"another cache-teacher is writing '{out}' ({held.holder}); wait for it to end, or give another --out"
        ) from None
    except OSError as exc:
        raise LmdistillError(
            f"cannot write in the cache directory '{out}' ({exc.strerror}); give a writable --out"
        ) from None


def release(out: Path) -> None:
    """Let go of ``out``'s build lock (the OS does it too when the process ends). The lock file is
    emptied, not removed (removing it would let a waiting process lock a file no one else sees),
    so a finished cache is the same bytes whoever built it."""
    import fcntl

    fd = _HELD.pop(out.resolve(), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{prefix}{key}.")
            return f"{prefix}{key}: {a.get(key)!r} there, {b.get(key)!r} asked"
    return "unknown difference"


def shard_plan(request: dict) -> list[tuple[str, int, int, int]]:
    """(split, shard index, first row, end row) for every shard of the cache."""
    per = request["shard_rows"]
    return [
        (split, i, start, min(start + per, request["rows"][split]))
        for split in ("train", "eval")
        for i, start in enumerate(range(0, request["rows"][split], per))
    ]


def write_shard(
    out: Path,
    signal,
    blocks,
    split: str,
    index: int,
    start: int,
    end: int,
    request: dict,
    batch_size: int,
    device,
    on_batch=None,
) -> None:
    """Run the teacher (``signal``: ``LiveLogits``, or ``LiveAligned`` for a student with another
    tokenizer) over rows [start, end) of ``blocks`` and write the shard, atomically."""
    from safetensors.numpy import save_file

    layout = layout_of(request)
    seed = int.from_bytes(hashlib.sha256(f"{request['seed']}/{split}/{index}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in layout}
    own = np.zeros(3)  # the teacher's CE on its own held-out targets, their count, the bytes they cover
    for lo in range(start, end, batch_size):
        batch = blocks.batch(range(lo, min(lo + batch_size, end)))
        flat, kind, seen = teacher_rows(signal, batch.to(device), request["vocab_size"], split == "eval")
        kept = capture(
            flat, request["mode"], request["capture_temperature"], request["samples"] or 0, request["k"] or 0, generator
        )
        if kind is not None:
            kept["kind"] = kind
        for name, (shape, dtype) in layout.items():
            columns[name].append(kept[name].reshape(len(batch.input_ids), *shape).numpy().astype(dtype))
        own += seen
        if on_batch is not None:
            on_batch(len(flat))
    tensors = {name: np.concatenate(parts) for name, parts in columns.items()}
    if split == "eval":
        tensors["teacher_ce_sum"] = np.asarray([own[0]], dtype=np.float64)
        tensors["teacher_ce_tokens"] = np.asarray([own[1]], dtype=np.int64)
        if request.get("cross_tokenizer") is not None:
            tensors["teacher_bytes"] = np.asarray([own[2]], dtype=np.int64)
    _cache_dir(out).save(f"{split}-{index:05d}.safetensors", lambda path: save_file(tensors, str(path)))


# What the teacher's target at a student position is, across tokenizers: none (the data's next token
# alone), at a pair (both models about to write the same text; the carried distribution) or inside
# a span the teacher writes in one token (its continuation target).
NONE, PAIR, INSIDE = 0, 1, 2
# The log-probability a cache across tokenizers gives a student token the teacher carries nothing
# to: exp() of it is 0 in fp32 at any temperature, and unlike -inf it keeps every captured value finite.
NOTHING = -1.0e4


def teacher_rows(
    signal, batch, vocab: int, measure: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
    """What the cache captures of one batch: (N, vocab) fp32 logits of the student's N predicting
    positions, on the host; the kind of target at each (across tokenizers; else None); and, when
    ``measure``, the teacher's CE sum on its own targets, their count and the bytes of text they
    cover (0 with one tokenizer)."""
    view = signal(batch, 1.0)
    if isinstance(view, TeacherAligned):
        logits, kind = carried_log_probs(view, batch.targets.numel(), vocab)
        own_logits, own_targets, own_bytes = view.all_logits, view.targets, batch.teacher_tokens.teacher_bytes
    else:
        logits, kind = view.logits.reshape(-1, vocab), None
        own_logits, own_targets, own_bytes = view.logits, batch.targets, 0
    seen = np.zeros(3)
    if measure:
        own_logits, own_targets = own_logits.reshape(-1, own_logits.shape[-1]).float(), own_targets.reshape(-1)
        valid = own_targets != IGNORE_INDEX
        ce = float(F.cross_entropy(own_logits[valid], own_targets[valid], reduction="sum"))
        seen = np.asarray([ce, int(valid.sum()), own_bytes], dtype=np.float64)
    return logits.float().cpu(), None if kind is None else kind.cpu(), seen


def carried_log_probs(view: TeacherAligned, positions: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's targets across tokenizers as the logits of a teacher in the student's own
    vocabulary: ((positions, vocab) log-probabilities, (positions,) uint8 the kind of each target).

    At a pair, the log of the distribution carried to the student's tokens at T = 1; inside a span
    the teacher writes in one token, the log of its sparse continuation target; ``NOTHING`` for a
    token given nothing. Softening these by T is softening the carried distribution by T, as the
    live loss does (``loss/crosstok.py``), so the cache's modes and temperatures work unchanged."""
    probs = torch.zeros((positions, vocab), dtype=torch.float32, device=view.logits.device)
    kind = torch.full((positions,), NONE, dtype=torch.uint8, device=view.logits.device)
    probs[view.student_positions] = carried_distribution(view.logits, view.mapping, vocab, 1.0, view.moves)
    kind[view.student_positions] = PAIR
    if view.continuation is not None:
        at, ids, weights = view.continuation
        probs[at] = probs.new_zeros((len(at), vocab)).scatter_add_(1, ids, weights.float())  # (padding adds 0)
        kind[at] = INSIDE
    return torch.log(probs).clamp_min_(NOTHING), kind


def _cache_dir(out: Path, shards: list[str] | None = None) -> ManifestDir:
    """The cache directory as ``ManifestDir`` writes it: in place (the finished shards of a killed
    build are kept for its rerun, and every process of a torchrun build writes into it), each shard
    written as ``.<name>.tmp-<pid>`` and renamed into place whole. The manifest records the files
    ``shards`` under "shards", their sizes as "bytes"; its keys stay in the order ``finish`` gives
    them."""
    return ManifestDir(
        out,
        in_place=True,
        manifest=MANIFEST,
        names=shards,
        record=functools.partial(file_record, size_key="bytes"),
        records_key="shards",
        sort_keys=False,
    )


def finish(out: Path, request: dict) -> dict:
    """Hash the shards and write the manifest (last): the cache is complete."""
    from safetensors import safe_open

    names = [f"{split}-{index:05d}.safetensors" for split, index, _, _ in shard_plan(request)]
    cache_dir = _cache_dir(out, names)
    shards, sums = cache_dir.records(), dict.fromkeys(("teacher_ce_sum", "teacher_ce_tokens", "teacher_bytes"), 0.0)
    for name in names:
        if name.startswith("eval-"):
            with safe_open(out / name, framework="np") as f:
                for key in sums.keys() & set(f.keys()):  # (teacher_bytes: across tokenizers only)
                    sums[key] += float(f.get_tensor(key)[0])
    teacher_ce = sums["teacher_ce_sum"] / max(sums["teacher_ce_tokens"], 1)
    evaluated = {
        "teacher_ce_loss": teacher_ce,
        "teacher_ppl": math.exp(min(teacher_ce, 700.0)),
        "eval_tokens": int(sums["teacher_ce_tokens"]),
    }
    if request.get("cross_tokenizer") is not None:  # the teacher's own tokens: only bits per byte compare
        evaluated["teacher_bytes"] = int(sums["teacher_bytes"])
        evaluated["teacher_bpb"] = sums["teacher_ce_sum"] / (math.log(2) * max(sums["teacher_bytes"], 1))
    manifest = {
        **request,
        "tensors": {name: dtype for name, (_, dtype) in layout_of(request).items()},
        "shards": shards,
        "bytes_per_token": request_bytes_per_token(request),
        "teacher_eval": evaluated,
    }
    return cache_dir.publish(manifest)


def request_bytes_per_token(request: dict) -> int:
    return sum(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize for shape, dtype in layout_of(request).values())


def estimated_bytes(request: dict) -> int:
    positions = (request["rows"]["train"] + request["rows"]["eval"]) * request["positions_per_block"]
    return positions * request_bytes_per_token(request)


def shards_to_do(out: Path, request: dict, rank: int = 0, world: int = 1) -> list[tuple]:
    """This rank's shards that are not on disk yet (shard i belongs to rank i mod world)."""
    plan = shard_plan(request)
    return [
        s for n, s in enumerate(plan) if n % world == rank and not (out / f"{s[0]}-{s[1]:05d}.safetensors").is_file()
    ]


def describe(manifest: dict) -> str:
    m = manifest
    what = {"sampled": f"S={m['samples']} draws", "topk": f"k={m['k']}", "dense": "full logits"}[m["mode"]]
    return f"{m['mode']} ({what}) at T={m['capture_temperature']:g}"


def elapsed_since(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"


def open_for_run(cfg, tokenizer, data, vocab_size: int, say=print) -> TeacherCache:
    """The run's cache (``model.teacher_cache``), checked against the run: its data, tokenizer
    and vocabulary, and the objective it can serve. One line for whatever does not fit."""
    cache = TeacherCache.open(cfg.model.teacher_cache)
    cache.check_run(tokenizer, data, vocab_size)
    d = cfg.distill
    if cache.mode != "dense" and d.divergence != "forward_kl" and d.kd_weight > 0:
        raise LmdistillError(
            f"a {cache.mode} teacher cache supports distill.divergence forward_kl only (the other "
            "divergences need the teacher's probability of every token); use forward_kl, or a "
            "dense cache"
        )
    if d.hidden.weight > 0:
        raise LmdistillError(
            "distill.hidden needs the teacher's hidden states, which a teacher cache does not keep; "
            "set distill.hidden.weight=0 or train with the live teacher"
        )
    schedule = {float(d.temperature), float(d.min_temperature)}
    if cache.mode == "topk" and schedule != {cache.temperature}:
        raise LmdistillError(
            f"a topk teacher cache trains at its capture temperature {cache.temperature:g} only; set "
            f"distill.temperature={cache.temperature:g} and distill.min_temperature="
            f"{cache.temperature:g}, or use a sampled or dense cache"
        )
    if cache.mode == "sampled" and schedule != {cache.temperature}:
        say(
            f"warning: training at T in [{min(schedule):g}, {max(schedule):g}] from a cache captured at "
            f"T={cache.temperature:g}: the draws are re-weighted by self-normalised importance weights, which is "
            "consistent but biased for few draws (docs/cache.md)"
        )
    return cache
