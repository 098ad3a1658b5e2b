"""Load the teacher and the student, freeze the teacher, check they share a tokenizer.

Both are ordinary transformers causal LMs given by local directory or hub id; a
student may also be built fresh from the teacher's config with overrides. The
embedding matrices of real checkpoints are often padded past the tokenizer (Qwen2.5:
151,936 rows for 0.5B, 152,064 for 7B, 151,665 real tokens), so the loss uses only
the first ``len(tokenizer)`` logits of both models: the padded rows are excluded,
never given probability.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lmdistill.config import cross_tokenizer_conflict
from lmdistill.core.errors import LmdistillError, last_line
from lmdistill.core.files import directory_hash, safetensors_os_error
from lmdistill.core.paths import is_hub_id, replace_dir
from lmdistill.models import prune
from lmdistill.models.gguf import converted_dir, gguf_file_of
from lmdistill.models.prune import SUPPORTED
from lmdistill.models.shapes import student_config_from_teacher
from lmdistill.teacher.cache import TeacherCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_source(source: str, role: str) -> str:
    """A local model directory as an absolute path, or a hub id left as it is. A GGUF file (or a
    directory holding one and no config.json) becomes the directory it was converted into.

    Something that looks like a path but is missing is an error here, before
    transformers turns it into a confusing hub lookup.
    """
    gguf = gguf_file_of(source, role)
    if gguf is not None:  # converted once into an ordinary directory, found again by its content
        return str(converted_dir(gguf, role))
    path = Path(source).expanduser()
    if path.is_file():
        raise LmdistillError(
            f"{role} '{source}' is a file; give the directory that holds it and the weights (the "
            "directory save_pretrained wrote), or a .gguf file"
        )
    if path.exists():
        if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
            raise LmdistillError(
                f"{role} '{source}' holds LoRA adapters alone (adapter_config.json), not a model; give the merged "
                "model (lmdistill export RUN OUT, without --adapter)"
            )
        if not (path / "config.json").is_file():
            raise LmdistillError(
                f"{role} '{source}' is a directory without config.json; give a directory written by save_pretrained"
            )
        _check_config_json(path / "config.json", role)
        return str(path.resolve())
    if not is_hub_id(source):
        raise LmdistillError(
            f"{role} '{source}' does not exist; give a model directory or a hub id like 'Qwen/Qwen2.5-0.5B'"
        )
    return source


def _check_config_json(path: Path, role: str) -> None:
    """config.json must be a JSON object; checked first, so that a broken one is not blamed on
    the tokenizer (which reads it too)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LmdistillError(f"{role}: {path} is not UTF-8 text; write it again with save_pretrained") from None
    except ValueError as exc:
        raise LmdistillError(
            f"{role}: {path} is not valid JSON (line {getattr(exc, 'lineno', '?')}: "
            f"{getattr(exc, 'msg', exc)}); write it again with save_pretrained"
        ) from None
    except OSError as exc:
        raise LmdistillError(f"{role}: cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise LmdistillError(
            f"{role}: {path} holds a JSON {type(data).__name__}, not an object of settings "
            '({"model_type": ...}); write it again with save_pretrained'
        )


def _hub_error(role: str, source: str, exc: Exception) -> LmdistillError:
    detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    if Path(source).exists():
        return LmdistillError(f"could not load {role} from '{source}': {detail}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        detail = "HF_HUB_OFFLINE=1 is set and it is not in the local cache"
    return LmdistillError(f"could not load {role} '{source}': {detail}; check the name, or use a local directory")


def load_tokenizer(source: str, role: str = "teacher"):
    from transformers import AutoTokenizer

    if not _has_tokenizer_files(source):
        raise LmdistillError(
            f"{role} '{source}' has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
            f"save the tokenizer beside the model: tokenizer.save_pretrained('{source}')"
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise _hub_error(f"{role} tokenizer", source, exc) from None


def load_causal_lm(source: str, role: str, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model only clutters the run's output

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _hub_error(role, source, exc) from None


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher mode: eval (no dropout), no gradients. It never enters an optimizer."""
    model.eval()
    model.requires_grad_(False)
    return model


def _tokenizer_identity(tokenizer) -> dict:
    """What decides how text becomes ids: vocabulary, merges, and the steps before them
    (normalizer, pre-tokenizer) -- one vocabulary can still split text differently."""
    identity = {
        "vocabulary": tokenizer.get_vocab(),
        "model type": None,
        "merges": [],
        "normalizer": None,
        "pre-tokenizer": None,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        identity.update(
            {
                "model type": model.get("type"),
                "merges": model.get("merges") or [],
                "normalizer": spec.get("normalizer"),
                "pre-tokenizer": spec.get("pre_tokenizer"),
            }
        )
    return identity


def tokenizer_difference(teacher_tok, student_tok) -> str | None:
    """How two tokenizers would map text to different ids, in words; None when they would not."""
    if teacher_tok is student_tok:
        return None
    t, s = _tokenizer_identity(teacher_tok), _tokenizer_identity(student_tok)
    differs = [part for part in t if t[part] != s[part]]
    if not differs:
        return None
    if differs[0] == "vocabulary":
        from lmdistill.data.alignment import shared_vocabulary

        teacher_ids, student_ids = shared_vocabulary(teacher_tok, student_tok)  # (by text: "Ġthe" is "▁the")
        problem = (
            f"vocabularies differ ({len(t['vocabulary']):,} vs {len(s['vocabulary']):,} tokens; "
            f"{len(teacher_ids):,} in both, {int((teacher_ids == student_ids).sum()):,} of them with the same id)"
        )
    elif differs[0] == "merges":
        problem = f"BPE merges differ ({len(t['merges'])} vs {len(s['merges'])} merges)"
    else:
        problem = f"the {differs[0]} differs (same vocabulary, different splitting of text)"
    return problem


def check_same_tokenizer(teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Stop before training when the two tokenizers would map text to different ids."""
    problem = tokenizer_difference(teacher_tok, student_tok)
    if problem is None:
        return
    raise LmdistillError(
        f"teacher '{teacher_name}' and student '{student_name}' use different tokenizers: {problem}; set "
        "distill.cross_tokenizer: auto to distil across them, or pick a student from the teacher's family"
    )


def crosses_tokenizers(cfg, teacher_tok, student_tok, teacher_name: str, student_name: str) -> bool:
    """Whether the run distils across two tokenizers (``distill.cross_tokenizer``): always, or
    (auto) when they differ, with a note; never refuses different ones. Different tokenizers with a
    setting the cross-tokenizer path cannot take are refused in one line."""
    mode = cfg.distill.cross_tokenizer
    if mode == "never":
        check_same_tokenizer(teacher_tok, student_tok, teacher_name, student_name)
        return False
    problem = tokenizer_difference(teacher_tok, student_tok)
    if mode == "auto" and problem is None:
        return False
    if problem is not None:
        if (conflict := cross_tokenizer_conflict(cfg)) is not None:
            raise LmdistillError(
                f"teacher '{teacher_name}' and student '{student_name}' use different tokenizers ({problem}), and "
                f"distilling across them: {conflict}"
            )
        if mode == "auto":
            print(
                f"note: teacher and student use different tokenizers ({problem}): distilling across tokenizers "
                "(distill.cross_tokenizer: auto); held-out figures compare in bits per byte"
            )
    return True


def output_vocab_size(model) -> int:
    emb = model.get_output_embeddings()
    return emb.weight.shape[0] if emb is not None else model.config.vocab_size


def check_vocab_covers(model, vocab_size: int, role: str, name: str) -> None:
    rows = output_vocab_size(model)
    if rows < vocab_size:
        raise LmdistillError(
            f"{role} '{name}' has {rows} output rows but the tokenizer has {vocab_size} tokens; the model does not "
            "belong to this tokenizer"
        )


def check_context_length(model, block_size: int, role: str, name: str) -> None:
    """A block longer than the model's positions would index past its position table (or extrapolate)."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and block_size > limit:
        raise LmdistillError(
            f"data.block_size = {block_size} is longer than {role} '{name}' supports "
            f"({limit} positions); set data.block_size to {limit} or less"
        )


def build_fresh_student(config, seed: int):
    from transformers import AutoModelForCausalLM

    check_config(config, "the student of model.student_config")
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:
        raise LmdistillError(f"could not build a student from model.student_config: {last_line(exc)}") from None


def check_config(config, what: str) -> None:
    """A config that save_pretrained will refuse at the end of training is refused now.

    transformers validates its configs (``validate``: e.g. the hidden size must be a multiple
    of the number of attention heads) when it saves them; check that before any step runs."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except Exception as exc:  # the library's own validation errors, of several types
        raise LmdistillError(
            f"{what} is not a valid {type(config).__name__}: {last_line(exc)}; fix model.student_config"
        ) from None


def check_causal(model, role: str, name: str, vocab_size: int) -> None:
    """Distillation here is next-token prediction: a prediction may not see later tokens.

    Probed on a 6-token input: change the last token, and no earlier position's logits may
    move. A bidirectional model (BERT) fails it; so does a model whose config makes it crash,
    which is better found now than after the training."""
    device = next(model.parameters()).device
    ids = (torch.arange(1, 7, device=device) % vocab_size).unsqueeze(0)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            after = model(input_ids=changed, use_cache=False).logits[0, :-1].float()
    except Exception as exc:  # whatever the model raises: report it on one line
        raise LmdistillError(
            f"the {role} '{name}' does not run on a 6-token input ({last_line(exc)}); check its config"
        ) from None
    finally:
        model.train(was_training)
    # A causal model computes the earlier positions without the changed token: the same numbers.
    if (before - after).abs().max() > 1e-5 * (1.0 + before.abs().max()):
        raise LmdistillError(
            f"the {role} '{name}' ({type(model).__name__}) is not a causal language model: its "
            "predictions at earlier positions change when a later token changes; distillation needs "
            "a causal LM (AutoModelForCausalLM: Llama, Qwen2, Mistral, GPT-2, ...)"
        )


def parameter_fingerprint(model) -> list[tuple[float, float]]:
    """Cheap on-device checksums of every parameter, to catch a teacher that was modified."""
    if hasattr(model, "reshard"):  # FSDP2: back to the shards (a root stays gathered after its forward)
        model.reshard()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # a shard: this process's part
    return [
        (p.detach().sum(dtype=torch.float64).item(), torch.linalg.vector_norm(p.detach(), dtype=torch.float64).item())
        for p in local
    ]


def save_model_dir(model, tokenizer, final: Path, also=None) -> Path:
    """save_pretrained (and the tokenizer, when given) into a temporary directory beside ``final``,
    then one rename: ``final`` is the old model or the new one, never half of one. ``also(dir)``
    writes more files there before the rename (a model card). Failures are OSErrors
    (safetensors' own report of a full disk included), the temporary directory gone."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for a few files is noise
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if also is not None:
            also(tmp)
        replace_dir(tmp, final, aside_name=f".{final.name}.old")
    except SafetensorError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise safetensors_os_error(exc, final) from exc
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def num_params(model) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class ModelInfo:
    name: str
    architecture: str
    params: int
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int

    @classmethod
    def of(cls, model, name: str) -> ModelInfo:
        cfg = model.config
        return cls(
            name=name,
            architecture=(cfg.architectures or [type(model).__name__])[0],
            params=num_params(model),
            num_layers=getattr(cfg, "num_hidden_layers", None),
            hidden_size=getattr(cfg, "hidden_size", None),
            vocab_size=output_vocab_size(model),
        )


@dataclass
class Models:
    """The two models of a run, with the checks between them done."""

    teacher: torch.nn.Module | None  # frozen; None for plain LM training without a teacher
    student: torch.nn.Module
    tokenizer: object
    teacher_name: str | None
    student_name: str
    # For a student cut out of the teacher: the teacher layer each of its layers came from, and
    # the block influence of every teacher layer (None when not measured).
    student_layers: list[int] | None = None
    layer_importance: list[float] | None = None
    student_channels: list[int] | None = None  # the teacher hidden channel of each student channel
    # Teacher and student tokenizers with different chat templates: an error for chat data only.
    chat_template_problem: str | None = None
    # The teacher's own tokenizer when the run distils across tokenizers (``tokenizer`` is the student's).
    teacher_tokenizer: object | None = None


def _has_tokenizer_files(source: str) -> bool:
    path = Path(source)
    if not path.is_dir():
        return True  # a hub id: assume it ships a tokenizer; loading tells otherwise
    return any(
        (path / f).exists()
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "tokenizer.model",
            "vocab.txt",
            "spiece.model",
            "merges.txt",
        )
    )


def _teacher_dtype(cfg) -> torch.dtype:
    """The frozen teacher's weights are only read: in a bf16 run, holding them in bf16 saves the
    cast of every weight in every forward, and half the memory."""
    dtype = cfg.model.teacher_dtype
    if dtype == "auto":
        on_gpu = torch.cuda.is_available() and cfg.run.device != "cpu"
        bf16 = cfg.run.mixed_precision == "bf16" or (cfg.run.mixed_precision == "auto" and on_gpu)
        dtype = "bfloat16" if bf16 else "float32"
    return DTYPES[dtype]


def load_models(cfg, teacher=None, student=None, tokenizer=None, train_blocks=None) -> Models:
    """Teacher (from ``model.teacher``), student (loaded, or built fresh from the teacher's
    config) and the shared tokenizer, checked against each other; objects passed in are used as
    they are. A teacher is loaded whenever one is named, also for plain LM training
    (kd_weight 0): it shapes a fresh student and gives the held-out figures to compare with.

    ``train_blocks(tokenizer) -> (N, L) token ids`` gives the calibration data of a student cut
    out of the teacher (``model.student_init: teacher``)."""
    if cfg.model.teacher_cache is not None and teacher is None:
        return _models_for_cache(cfg, student, tokenizer, train_blocks)
    teacher_name = None
    run_tokenizer_checked = False
    if teacher is None and cfg.model.teacher is not None:
        teacher_name = resolve_source(cfg.model.teacher, "model.teacher")
        tokenizer = tokenizer or load_tokenizer(teacher_name, "teacher")
        if cfg.distill.cross_tokenizer == "never" or cfg.model.student is None:  # else the student's may be the run's
            check_run_tokenizer(cfg, tokenizer, teacher_name)  # before the teacher's weights are loaded
            run_tokenizer_checked = True
        teacher = load_causal_lm(teacher_name, "teacher", _teacher_dtype(cfg), cfg.model.trust_remote_code)
        check_vocab_covers(teacher, len(tokenizer), "teacher", teacher_name)  # before a student is built from it
    elif teacher is not None:
        teacher_name = cfg.model.teacher or type(teacher).__name__
    if teacher is None and cfg.distill.kd_weight > 0:
        raise LmdistillError(
            "no teacher: set model.teacher (lmdistill.train and the command line use the embedded "
            "default teacher when it is empty)"
        )
    teacher_tokenizer = tokenizer
    student, student_name, tokenizer, pruned, template_problem = _student(
        cfg, student, teacher, teacher_name, tokenizer, train_blocks
    )
    if tokenizer is None:
        raise LmdistillError("no tokenizer found: the student directory has none and there is no teacher")
    if not run_tokenizer_checked:
        check_run_tokenizer(cfg, tokenizer, teacher_name or student_name)
    crossing = teacher is not None and (tokenizer is not teacher_tokenizer or cfg.distill.cross_tokenizer == "always")
    _check_pair(cfg, teacher, teacher_name, student, student_name, len(tokenizer), len(teacher_tokenizer or tokenizer))
    return Models(
        teacher,
        student,
        tokenizer,
        teacher_name,
        student_name,
        pruned.layers if pruned else None,
        pruned.layer_importance if pruned else None,
        pruned.channels if pruned else None,
        template_problem,
        teacher_tokenizer if crossing else None,
    )


def _student(cfg, student, teacher, teacher_name, tokenizer, train_blocks):
    """(student, its name, tokenizer, the cut or None, a chat-template problem or None): the student
    loaded (``model.student``), cut out of the teacher or built fresh from its config, or the one
    passed in."""
    pruned = template_problem = None
    if student is None and cfg.model.student is not None:
        student_name = resolve_source(cfg.model.student, "model.student")
        student = load_causal_lm(student_name, "student", torch.float32, cfg.model.trust_remote_code)
        if _has_tokenizer_files(student_name):
            student_tok = load_tokenizer(student_name, "student")
            if tokenizer is None or crosses_tokenizers(cfg, tokenizer, student_tok, teacher_name, student_name):
                tokenizer = student_tok  # the run's tokenizer: the student's (the teacher keeps its own)
            else:
                template_problem = chat_template_difference(tokenizer, student_tok, teacher_name, student_name)
    elif student is None:
        if teacher is None:
            raise LmdistillError("no student to train: set model.student, or a teacher to build one from")
        overrides = cfg.model.student_config
        shape = ", ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "half of the teacher"
        if student_init(cfg, teacher) == "teacher":
            pruned = cut_from_teacher(cfg, teacher, tokenizer, train_blocks)
            student = pruned.model
            student_name = f"from the teacher ({cfg.model.prune.layers} layers {pruned.layers}): {shape}"
        else:
            config = student_config_from_teacher(teacher.config, overrides)
            student = build_fresh_student(config, cfg.run.seed)
            student_name = f"fresh: {shape}"
    else:
        student_name = cfg.model.student or type(student).__name__
    return student, student_name, tokenizer, pruned, template_problem


def _check_pair(cfg, teacher, teacher_name, student, student_name, vocab_size: int, teacher_vocab: int) -> None:
    """Both models cover their tokenizers, fit a block and predict the next token; the teacher is frozen."""
    check_vocab_covers(student, vocab_size, "student", student_name)
    if teacher is not None:
        check_vocab_covers(teacher, teacher_vocab, "teacher", teacher_name)
        freeze(teacher)
    for model, role, name, vocab in (
        (student, "student", student_name, vocab_size),
        (teacher, "teacher", teacher_name, teacher_vocab),
    ):
        if model is not None:
            check_context_length(model, cfg.data.block_size, role, name)
            check_causal(model, role, name, vocab)


def _models_for_cache(cfg, student, tokenizer, train_blocks=None) -> Models:
    """A run from a teacher cache: the student and the tokenizer. No teacher takes part in the
    training. A fresh student starts as a live run's would (``model.student_init``): cut out of
    the cached teacher, whose weights are loaded for the cut only and dropped before training,
    or (``random``) built from the teacher's config file; a cached run and a live one with the
    same settings then start from the same student."""

    cache = TeacherCache.open(cfg.model.teacher_cache, verify=False)  # is it one? (its shards are checked later)
    cache_dir = cache.path
    if cfg.model.teacher is not None:  # named beside the cache: it must be the cache's own teacher
        _check_cached_teacher(cache, resolve_source(cfg.model.teacher, "model.teacher"))
    teacher_name = cfg.model.teacher or cache.manifest["teacher"]["source"]
    student_name = None
    pruned = None
    if student is None and cfg.model.student is not None:
        student_name = resolve_source(cfg.model.student, "model.student")
        student = load_causal_lm(student_name, "student", torch.float32, cfg.model.trust_remote_code)
        if tokenizer is None and _has_tokenizer_files(student_name):
            tokenizer = load_tokenizer(student_name, "student")
    elif student is None:
        if teacher_name is None:
            raise LmdistillError("no student: set model.student, or model.teacher (its config shapes a fresh student)")
        overrides = cfg.model.student_config
        shape = ", ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "half of the teacher"
        resumed = _student_to_resume(cfg)
        if resumed is not None:  # its weights come from the checkpoint: nothing to cut, no teacher needed
            student, student_name, tokenizer = resumed
            student_name += " (teacher cache run)"
        else:
            student, student_name, teacher_name, pruned, tokenizer = _fresh_student_for_cache(
                cfg, cache, teacher_name, tokenizer, train_blocks, shape
            )
    else:
        student_name = cfg.model.student or type(student).__name__
    if tokenizer is None and teacher_name is not None:
        tokenizer = load_tokenizer(resolve_source(teacher_name, "model.teacher"), "teacher")
    if tokenizer is None:
        raise LmdistillError("no tokenizer: the student directory has none; set model.teacher to the cached teacher")
    check_run_tokenizer(cfg, tokenizer, student_name)
    check_vocab_covers(student, len(tokenizer), "student", student_name)
    check_context_length(student, cfg.data.block_size, "student", student_name)
    check_causal(student, "student", student_name, len(tokenizer))
    return Models(
        None,
        student,
        tokenizer,
        f"cache: {cache_dir}",
        student_name,
        pruned.layers if pruned else None,
        pruned.layer_importance if pruned else None,
        pruned.channels if pruned else None,
    )


def _fresh_student_for_cache(cfg, cache, teacher_name: str, tokenizer, train_blocks, shape: str):
    """(student, its name, the teacher's path, the cut or None, tokenizer) for a cached run with no
    ``model.student``: cut out of the cached teacher, or built from its config file."""
    from transformers import AutoConfig

    if cache.across:
        raise LmdistillError(
            f"teacher cache '{cache.path}' holds the teacher's targets carried to the tokens of the student it was "
            "built for (cache-teacher --student), and a fresh student would have the teacher's tokenizer; name that "
            "student in model.student (--student)"
        )
    pruned = None
    if cfg.model.student_init != "random":
        teacher_name, pruned, tokenizer = _cut_from_cached_teacher(cfg, cache, teacher_name, tokenizer, train_blocks)
    if pruned is not None:
        name = f"from the teacher ({cfg.model.prune.layers} layers {pruned.layers}): {shape} (teacher cache run)"
        return pruned.model, name, teacher_name, pruned, tokenizer
    teacher_name = resolve_source(teacher_name, "model.teacher")
    config = student_config_from_teacher(AutoConfig.from_pretrained(teacher_name), cfg.model.student_config)
    student = build_fresh_student(config, cfg.run.seed)
    return student, f"fresh: {shape} (teacher cache run)", teacher_name, None, tokenizer


def _student_to_resume(cfg):
    """(student, name, tokenizer) for ``--resume`` of a cached run that has a checkpoint: the
    student's architecture from the newest checkpoint's ``student_config.json`` (the resume then
    loads its weights) and the run's saved tokenizer, so that a student once cut from the teacher
    resumes without the teacher's weights on disk. None when there is nothing to resume from."""
    from transformers import AutoConfig

    if not cfg.run.resume or cfg.run.output_dir is None:
        return None
    run = Path(cfg.run.output_dir).expanduser()
    steps = [
        p
        for p in (run / "checkpoints").glob("step-*")
        if p.name[5:].isdigit() and (p / "manifest.json").is_file() and (p / "student_config.json").is_file()
    ]
    if not steps or not (run / "tokenizer").is_dir():
        return None
    newest = max(steps, key=lambda p: int(p.name[5:]))
    try:
        recorded = json.loads((newest / "student_config.json").read_text())
        config = AutoConfig.for_model(recorded.pop("model_type"), **recorded)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LmdistillError(
            f"cannot read the student's config in checkpoint '{newest}' ({last_line(exc)}); it is "
            "damaged: move it away to resume from an older checkpoint"
        ) from None
    return (
        build_fresh_student(config, cfg.run.seed),
        f"resumed from {newest.name}",
        load_tokenizer(str(run / "tokenizer"), "the run's saved tokenizer"),
    )


def _cut_from_cached_teacher(cfg, cache, source: str, tokenizer, train_blocks):
    """(teacher name, the student cut out of the cached teacher, tokenizer) for a cached run, cut
    exactly as a live run cuts it (same dtype, same calibration blocks); the student is None where
    ``auto`` meets a family pruning does not support (a live run starts that one random too).

    The teacher's weights are loaded for the cut only: dropped before this returns, so the run
    holds no teacher. Where they are not on disk, one line with the two ways on: cut the
    student elsewhere and pass it, or ask for a random start explicitly."""
    import gc

    from transformers import AutoConfig

    if not Path(source).expanduser().exists() and not is_hub_id(source):
        raise _teacher_not_on_disk(cfg, source, "the directory no longer exists")
    name = resolve_source(source, "model.teacher")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # transformers' errors for a model it cannot find or read, of several types
        if Path(name).is_dir():
            raise LmdistillError(f"cannot read the config of the teacher '{name}': {last_line(exc)}") from None
        raise _teacher_not_on_disk(cfg, source, _offline_reason(exc)) from None
    if cfg.model.student_init == "auto" and config.model_type not in SUPPORTED:
        return name, None, tokenizer
    if cfg.model.teacher is None:  # (a named one was checked already)
        _check_cached_teacher(cache, name)
    try:
        tokenizer = tokenizer or load_tokenizer(name, "teacher")
        teacher = load_causal_lm(name, "teacher", _teacher_dtype(cfg), cfg.model.trust_remote_code)
    except LmdistillError as exc:
        if Path(name).is_dir():  # there, but unreadable: its own message says what is wrong
            raise
        raise _teacher_not_on_disk(cfg, source, str(exc).split("; ")[0]) from None
    try:
        pruned = cut_from_teacher(cfg, teacher, tokenizer, train_blocks)
    finally:
        del teacher
        gc.collect()  # the weights go now, not whenever a reference cycle in the model is collected
    return name, pruned, tokenizer


def _check_cached_teacher(cache, name: str) -> None:
    """The teacher a cached run names, or cuts its student from, must be the one the cache was
    built from (the manifest's content hash of its directory where it recorded one, else its
    name): the cache's targets are that teacher's, and a student cut from or shaped by another
    would not start where they lead."""

    recorded = cache.manifest["teacher"]
    if recorded.get("hash") and Path(name).is_dir():
        if directory_hash(Path(name)) == recorded["hash"]:
            return
        why = f"its content hash differs from the manifest's {recorded['hash'][:19]}..."
    elif name == recorded.get("source"):
        return
    else:
        why = f"the cache records the teacher {recorded.get('source')!r}"
    raise LmdistillError(
        f"the teacher '{name}' is not the one teacher cache '{cache.path}' was built from ({why}); the cache's "
        "targets are that teacher's: leave model.teacher (--teacher) out, set it to that teacher, or rebuild the "
        "cache with lmdistill cache-teacher --teacher for this one"
    )


def _offline_reason(exc: Exception) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 is set and it is not in the local cache"
    return last_line(exc)


def _teacher_not_on_disk(cfg, source: str, why: str) -> LmdistillError:
    mode = cfg.model.student_init
    how = (
        "cuts the student out of the teacher"
        if mode == "teacher"
        else "cuts the student out of the teacher (as a run with the live teacher does)"
    )
    return LmdistillError(
        f"model.student_init: {mode} {how}, but the cached teacher '{source}' is not on disk ({why}); cut the "
        "student where the teacher is (lmdistill prune --teacher T --out DIR, with this run's data settings) and "
        "train with --student DIR (or give --teacher PATH where it is now), or set model.student_init=random for a "
        "random start (not comparable with a live run's student)"
    )


def chat_template_difference(teacher_tok, student_tok, teacher_name, student_name) -> str | None:
    """Why chat data would be rendered differently for the two models; None when it would not
    (same template, or the student's tokenizer has none and the teacher's renders for both)."""
    t, s = teacher_tok.chat_template, student_tok.chat_template
    if not s or t == s:
        return None
    if not t:
        return (
            f"the student '{student_name}' has a chat template but the teacher '{teacher_name}' has none; chat "
            "data must be rendered the same for both: give the teacher's tokenizer the student's template "
            "(chat_template.jinja), or use plain-text data"
        )
    return (
        f"teacher '{teacher_name}' and student '{student_name}' have different chat templates, so one "
        "conversation would be rendered two ways; give both the same chat_template.jinja, or use plain-text "
        "data"
    )


def student_init(cfg, teacher) -> str:
    """``model.student_init`` with ``auto`` decided: cut from the teacher where pruning supports
    the teacher's family."""

    if cfg.model.student_init != "auto":
        return cfg.model.student_init
    return "teacher" if teacher.config.model_type in SUPPORTED else "random"


def check_run_tokenizer(cfg, tokenizer, name: str | None) -> None:
    """A resumed run continues a student trained on the ids of the run's saved tokenizer
    (RUN/tokenizer); a teacher (or student) with another tokenizer would mix two in one run.
    Without a checkpoint the run starts over and saves the new tokenizer: nothing to check."""
    if not cfg.run.resume or not cfg.run.output_dir or tokenizer is None:
        return
    run = Path(cfg.run.output_dir).expanduser()
    saved = run / "tokenizer"
    checkpoints = run / "checkpoints"
    has_checkpoint = checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())
    if not (saved.is_dir() and has_checkpoint):
        return
    problem = tokenizer_difference(load_tokenizer(str(saved), "the run's saved"), tokenizer)
    if problem is not None:
        raise LmdistillError(
            f"cannot resume '{run}': its student was trained with the tokenizer in {saved}, and "
            f"'{name}' uses another ({problem}); resume with the run's own teacher, or start a new "
            "run (another --output-dir)"
        )


def calibration_ids(blocks, count: int) -> torch.Tensor:
    """The ids of ``count`` blocks spread evenly over ``blocks`` (a store's blocks or an (N, L)
    tensor; all of them when there are fewer)."""
    rows = (
        torch.arange(len(blocks)) if len(blocks) <= count else torch.linspace(0, len(blocks) - 1, count).round().long()
    )
    return blocks[rows] if isinstance(blocks, torch.Tensor) else blocks.ids(rows)


def cut_from_teacher(cfg, teacher, tokenizer, train_blocks):
    """The student of ``model.student_config`` pruned out of ``teacher`` (``model.prune``)."""

    config = prune.student_config(teacher.config, cfg.model.student_config)
    check_config(config, "the student of model.student_config")
    p = cfg.model.prune
    calibration = None
    if "importance" in (p.layers, p.width):
        if train_blocks is None:
            raise LmdistillError(
                "model.prune: importance needs calibration data; use model.prune.layers: uniform "
                "and model.prune.width: first, or give the training data"
            )
        device = next(teacher.parameters()).device
        calibration = calibration_ids(train_blocks(tokenizer), p.calibration_blocks).to(device)
    try:
        return prune.prune_teacher(teacher, config, p.layers, p.width, calibration)
    except (LmdistillError, MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)):
        raise
    except Exception as exc:  # building the student from model.student_config failed inside the library
        raise LmdistillError(
            f"could not build a student from model.student_config: {last_line(exc)}; fix model.student_config"
        ) from None
