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
from pathlib import Path

from .config import Config
from .data import embedded_corpus_texts

# Changing anything here changes the cache key, so a stale teacher is never reused.
RECIPE = {
    "version": 1,
    "tokenizer": {"type": "byte-level BPE", "vocab_size": 4096, "min_frequency": 2},
    "teacher": {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                "intermediate_size": 512, "max_position_embeddings": 512, "tie_word_embeddings": False},
    # bf16 autocast on the CPU: about twice the fp32 speed on CPUs with bf16 units, same result quality here.
    "pretrain": {"block_size": 128, "batch_size": 16, "epochs": 5, "lr": 3e-3, "warmup_steps": 20, "seed": 1234,
                 "mixed_precision": "bf16"},
}
EOS = "<|endoftext|>"


def cache_home() -> Path:
    return Path(os.environ.get("LMDISTILL_HOME", Path.home() / ".cache" / "lmdistill")).expanduser()


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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=RECIPE["teacher"]["max_position_embeddings"])


def needs_default_teacher(cfg: Config) -> bool:
    """An empty ``model.teacher`` means the embedded default whenever a teacher is in play: for
    KD, or to shape a fresh student (the CE-only baseline of a KD run trains the same student)."""
    return (cfg.model.teacher is None and cfg.model.teacher_cache is None
            and (cfg.distill.kd_weight > 0 or cfg.model.student is None))


def resolve_default_teacher(cfg: Config, progress: bool = True) -> Config:
    """Fill in ``model.teacher`` with the embedded default teacher (built once) where it is needed."""
    if needs_default_teacher(cfg):
        cfg.model.teacher = str(ensure_default_teacher(progress=progress))
    return cfg


def default_teacher_dir() -> Path:
    return cache_home() / "teachers" / f"pydoc-llama-{recipe_key(embedded_corpus_texts())}"


def ensure_default_teacher(progress: bool = True) -> Path:
    """Path of the cached default teacher; pretrains it first when there is none."""
    dest = default_teacher_dir()
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .errors import LmdistillError

        raise LmdistillError("the default teacher is not cached yet and several processes would each build it; "
                             "build it once with one process first (python train.py --max-steps 1), then launch")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .trainer import train

    texts = embedded_corpus_texts()
    p = RECIPE["pretrain"]
    print(f"No cached default teacher: pretraining one on the embedded corpus (once; a few minutes on a CPU).\n"
          f"It will be cached at {dest}")
    tokenizer = train_tokenizer(texts, RECIPE["tokenizer"]["vocab_size"], RECIPE["tokenizer"]["min_frequency"])
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **RECIPE["teacher"])
    torch.manual_seed(p["seed"])
    model = LlamaForCausalLM(config)

    work = dest.parent / f".work-{dest.name}-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    cfg = Config()
    cfg.run.name, cfg.run.output_dir, cfg.run.seed, cfg.run.device = "default-teacher", str(work), p["seed"], "cpu"
    cfg.distill.kd_weight = 0.0
    cfg.data.block_size = p["block_size"]
    cfg.train.batch_size, cfg.train.epochs, cfg.train.lr = p["batch_size"], p["epochs"], p["lr"]
    cfg.train.warmup_steps = p["warmup_steps"]
    cfg.run.mixed_precision = p["mixed_precision"]
    # bf16 training amplifies a last-bit difference in a gradient into a different model within
    # a few hundred steps; the reference loss keeps this teacher the one the cache key names.
    cfg.loss.impl = "reference"
    train(cfg, student=model, tokenizer=tokenizer, progress=progress, print_summary=False)
    # Publish atomically: the model directory appears complete or not at all. Another
    # process that got there first wins; ours is then discarded.
    try:
        os.replace(work / "student", dest)
    except OSError:
        if not (dest / "model.safetensors").is_file():
            raise
    shutil.move(str(work), str(dest.parent / f"{dest.name}-pretraining-run-{os.getpid()}"))
    return dest
