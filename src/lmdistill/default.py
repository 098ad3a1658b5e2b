"""The embedded default: a teacher that needs no download.

``python train.py --batch-size 2 --epochs 1`` must work offline on any machine, so
the default teacher is made here, once: a byte-level BPE tokenizer trained with
`tokenizers` on CPython's reference documentation (``pydoc_data``, shipped with
every Python), and a small Llama-architecture transformers model pretrained on the
same text with this package's own trainer (kd_weight 0 = plain LM training). It
is cached under ``$LMDISTILL_HOME`` (default ``~/.cache/lmdistill``), keyed by a
hash of the corpus and of the recipe below, and reused by every later run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

from lmdistill.config import Config
from lmdistill.core.errors import LmdistillError
from lmdistill.core.paths import cache_home, exclusive_lock
from lmdistill.data.sources import embedded_corpus_texts
from lmdistill.training.checkpoint import find_latest_valid
from lmdistill.training.interrupts import Interrupted
from lmdistill.training.trainer import train

# Changing anything here changes the cache key, so a stale teacher is never reused.
RECIPE = {
    "version": 1,
    "tokenizer": {"type": "byte-level BPE", "vocab_size": 4096, "min_frequency": 2},
    "teacher": {
        "hidden_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    # bf16 autocast on the CPU: about twice the fp32 speed on CPUs with bf16 units, same result quality here.
    "pretrain": {
        "block_size": 128,
        "batch_size": 16,
        "epochs": 5,
        "lr": 3e-3,
        "warmup_steps": 20,
        "seed": 1234,
        "mixed_precision": "bf16",
    },
}
EOS = "<|endoftext|>"


def recipe_key(texts: list[str]) -> str:
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for text in texts:
        h.update(text.encode())
    return h.hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=RECIPE["teacher"]["max_position_embeddings"],
    )


def needs_default_teacher(cfg: Config) -> bool:
    """An empty ``model.teacher`` means the embedded default whenever a teacher is in play: for
    KD, or to shape a fresh student (the CE-only baseline of a KD run trains the same student)."""
    return (
        cfg.model.teacher is None
        and cfg.model.teacher_cache is None
        and (cfg.distill.kd_weight > 0 or cfg.model.student is None)
    )


def resolve_default_teacher(cfg: Config, progress: bool = True) -> Config:
    """Fill in ``model.teacher`` with the embedded default teacher (built once) where it is needed."""
    if needs_default_teacher(cfg):
        cfg.model.teacher = str(ensure_default_teacher(progress=progress))
    return cfg


def default_teacher_dir() -> Path:
    return cache_home() / "teachers" / f"pydoc-llama-{recipe_key(embedded_corpus_texts())}"


def ensure_default_teacher(progress: bool = True) -> Path:
    """Path of the cached default teacher; pretrains it first when there is none.

    The pretraining runs in ``teachers/.work-NAME`` (NAME keyed by the recipe and the corpus),
    under a lock that a second process waits for: a pretraining stopped by a signal, or killed
    after a checkpoint, continues from its newest checkpoint the next time, instead of starting
    over in a directory of its own."""
    dest = default_teacher_dir()
    if _is_built(dest):
        return dest
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmdistillError(
            "the default teacher is not cached yet and several processes would each build it; "
            "build it once with one process first (python train.py --max-steps 1), then launch"
        )
    lock = dest.parent / f".{dest.name}.lock"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmdistillError(
            f"cannot create {dest.parent} for the default teacher: {exc.strerror}; make "
            "$LMDISTILL_HOME writable or point it elsewhere"
        ) from None
    with exclusive_lock(
        lock,
        "default teacher lock",
        lambda holder: print(
            f"Another process ({holder}) is pretraining the default teacher into {dest}; waiting for it", flush=True
        ),
    ):
        if not _is_built(dest):  # (another process may have built it while this one waited)
            _pretrain(dest, progress)
    return dest


def _is_built(dest: Path) -> bool:
    return (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()


def _pretrain(dest: Path, progress: bool) -> None:
    """Pretrain the default teacher into ``dest`` (the caller holds its lock), continuing the
    pretraining of an earlier attempt where it left a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _remove_abandoned_work_dirs(dest)
    work = dest.parent / f".work-{dest.name}"
    resume = find_latest_valid(work / "checkpoints")[0] is not None and (work / "tokenizer").is_dir()
    if not resume and work.exists():
        shutil.rmtree(work)  # an attempt stopped before its first checkpoint: nothing to keep

    texts = embedded_corpus_texts()
    p = RECIPE["pretrain"]
    if resume:
        print(
            f"No cached default teacher: continuing the pretraining stopped earlier in {work}.\n"
            f"It will be cached at {dest}"
        )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")  # the one its checkpoints fit
    else:
        print(
            f"No cached default teacher: pretraining one on the embedded corpus (once; a few minutes on a CPU).\n"
            f"It will be cached at {dest}"
        )
        tokenizer = train_tokenizer(texts, RECIPE["tokenizer"]["vocab_size"], RECIPE["tokenizer"]["min_frequency"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **RECIPE["teacher"],
    )
    torch.manual_seed(p["seed"])
    model = LlamaForCausalLM(config)

    cfg = Config()
    cfg.run.name, cfg.run.output_dir, cfg.run.seed, cfg.run.device = "default-teacher", str(work), p["seed"], "cpu"
    cfg.run.resume = resume
    cfg.distill.kd_weight = 0.0
    cfg.data.block_size = p["block_size"]
    cfg.train.batch_size, cfg.train.epochs, cfg.train.lr = p["batch_size"], p["epochs"], p["lr"]
    cfg.train.warmup_steps = p["warmup_steps"]
    cfg.run.mixed_precision = p["mixed_precision"]
    # bf16 training amplifies a last-bit difference in a gradient into a different model within
    # a few hundred steps; the reference loss keeps this teacher the one the cache key names.
    cfg.loss.impl = "reference"
    try:
        train(cfg, student=model, tokenizer=tokenizer, progress=progress, print_summary=False)
    except Interrupted as exc:  # its "--resume" is not for the user's run: any rerun continues this one
        signum = exc.exit_code - 128
        raise Interrupted(
            f"{signal.Signals(signum).name} during the default teacher's pretraining: its checkpoint "
            f"is kept in {work}; rerun the same command to continue the pretraining",
            signum,
        ) from None
    # Publish atomically: the model directory appears complete or not at all.
    os.replace(work / "student", dest)
    record = dest.parent / f"{dest.name}-pretraining-run"
    if record.exists():
        shutil.rmtree(record)
    shutil.move(str(work), str(record))


def _remove_abandoned_work_dirs(dest: Path) -> None:
    """Remove ``.work-NAME-PID`` directories, where earlier versions pretrained, of processes that
    are gone (they could not be resumed)."""
    for old in dest.parent.glob(f".work-{dest.name}-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
