"""A run's parts, built once and in order: ``build_run(cfg) -> RunParts``.

Everything a training run is made of -- the run directory, the accelerator and the strategy,
the models, the data and its sampler, the plan, the teacher signal, the objective, the
optimizer, the guard and the health monitor, and where a resume starts -- is built here by
functions that take what they need and return what they make. The ``Trainer`` receives the
finished parts; no method of it has to run before another.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmdistill.config import Config
from lmdistill.core.errors import CheckpointError, LmdistillError
from lmdistill.core.files import model_reference
from lmdistill.core.paths import atomic_write
from lmdistill.data.sources import BlockData, build_block_data, make_sampler
from lmdistill.loss import divergences
from lmdistill.loss.hidden import HiddenProjection, build_projection
from lmdistill.loss.objective import HiddenTerm, Objective
from lmdistill.models.loading import Models, load_models
from lmdistill.models.lora import ADAPTER_FILE, add_adapters, parameter_counts, resume_problem
from lmdistill.teacher.cache import TeacherCache, open_for_run
from lmdistill.teacher.onpolicy import on_policy_signal
from lmdistill.teacher.signals import (
    CachedTeacher,
    LiveAligned,
    LiveAlignedHidden,
    TeacherSignal,
    choose_loss_impl,
    make_signal,
)
from lmdistill.teacher.speculative import check_draft_pair
from lmdistill.training.checkpoint import damaged_state_message, remove_leftovers, restore_training_state, resume_point
from lmdistill.training.devices import check_trackers_installed, make_accelerator, on_main, uses_cpu
from lmdistill.training.guards import Guard
from lmdistill.training.monitor import HealthMonitor
from lmdistill.training.rundir import RunDirectory
from lmdistill.training.schedules import Plan
from lmdistill.training.speedups import check_liger_here
from lmdistill.training.strategy import Prepared, Replicated, parallelize


@dataclass(frozen=True)
class Resumed:
    """Where the run starts: step 0, or the checkpoint ``--resume`` continues from."""

    checkpoint: Path | None = None
    step: int = 0
    micro_batches: int = 0
    initial_eval: dict | None = None
    changed_config: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunParts:
    """Everything a training run is made of (see the module docstring)."""

    cfg: Config
    run: RunDirectory
    accelerator: object
    strategy: Replicated
    models: Models
    data: BlockData
    sampler: object
    plan: Plan
    cache: object | None  # a teacher cache: no teacher model at all
    projection: HiddenProjection | None  # the hidden-state term's, or None
    loss_impl: str
    signal: TeacherSignal
    prepared: Prepared  # the student, as the strategy set it up, and its optimizer
    objective: Objective
    guard: Guard
    monitor: HealthMonitor
    resumed: Resumed
    teacher_reference: Callable[[], dict | None]  # the teacher by path and content hash, hashed once

    @property
    def vocab_size(self) -> int:
        return len(self.models.tokenizer)


def preflight(cfg: Config) -> RunDirectory:
    """Every check that needs no model or data: the config, the trackers, the output directory.
    Done first, so that a typo costs seconds, not a model load (or the default teacher's build)."""
    cfg.validate()
    check_trackers_installed(cfg)
    check_liger_here(cfg, uses_cpu(cfg))
    return RunDirectory.for_config(cfg)


def build_run(cfg: Config, *, teacher=None, student=None, tokenizer=None, progress: bool = True) -> RunParts:
    """The parts of the run ``cfg`` describes (``teacher``, ``student``, ``tokenizer``: objects to
    use instead of loading them). Nothing is written before every check has passed."""
    from accelerate.utils import set_seed

    run = preflight(cfg)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.run.seed)
    strategy = parallelize(cfg, accelerator)
    models, data = _models_and_data(cfg, teacher, student, tokenizer, progress)
    say = print if accelerator.is_main_process else (lambda message: None)
    if cfg.model.lora.r:  # adapters on the student as it was loaded or cut; its own weights frozen
        models = dataclasses.replace(
            models,
            student=add_adapters(models.student, cfg.model.lora, models.student_name if cfg.model.student else None),
        )
        trained, total = parameter_counts(models.student)
        say(f"LoRA: {trained:,} of {total:,} parameters trained ({100 * trained / total:.2f}%)")
    _check_eval_generation(cfg, models)
    vocab = len(models.tokenizer)
    sampler = make_sampler(
        data, cfg.train.batch_size, cfg.run.seed, accelerator.process_index, accelerator.num_processes
    )
    widest = max(vocab, len(models.teacher_tokenizer or models.tokenizer))  # (evaluation forms both models' logits)
    plan = Plan.for_run(cfg, sampler.micro_batches_per_epoch, accelerator.num_processes, len(data.train), widest)
    cache = open_for_run(cfg, models.tokenizer, data, vocab, say=say) if cfg.model.teacher_cache else None
    projection = build_projection(cfg.distill.hidden, models)
    loss_impl, signal = _signal(cfg, models, cache, projection)
    prepared = _prepare_models(strategy, models, cfg, projection, say)
    if cfg.distill.on_policy.fraction > 0:  # the student writes, the live teacher scores (teacher/onpolicy.py)
        signal = on_policy_signal(cfg, signal, prepared.raw, models.teacher, models.tokenizer, data, accelerator)
    objective = _objective(cfg, vocab, signal, prepared, projection, loss_impl)
    teacher_vocab = len(models.teacher_tokenizer or models.tokenizer)  # (the teacher's own, across tokenizers)
    if cache is not None and cache.across:
        teacher_vocab = cache.across["teacher_vocab_size"]
    guard, monitor = Guard(cfg.guard), HealthMonitor(cfg.health, plan.total_steps, teacher_vocab)
    teacher_reference = functools.cache(
        lambda: model_reference(cfg.model.teacher) if models.teacher is not None and cfg.model.teacher else None
    )
    resumed = _resume_or_start(
        cfg, run, accelerator, prepared, projection, plan, guard, monitor, data, models.tokenizer, teacher_reference
    )
    return RunParts(
        cfg,
        run,
        accelerator,
        strategy,
        models,
        data,
        sampler,
        plan,
        cache,
        projection,
        loss_impl,
        signal,
        prepared,
        objective,
        guard,
        monitor,
        resumed,
        teacher_reference,
    )


def _prepare_models(strategy: Replicated, models: Models, cfg: Config, projection, say) -> Prepared:
    """The student and the teacher as the strategy sets them up, with their speed-ups (``model.compile``,
    ``model.liger``), which one line says when any is on."""
    prepared = strategy.prepare(models.student, cfg, projection)
    if models.teacher is not None:
        strategy.place_teacher(models.teacher)
    if (line := strategy.speedups.line()) is not None:
        say(line)
    return prepared


def _models_and_data(cfg: Config, teacher, student, tokenizer, progress: bool) -> tuple[Models, BlockData]:
    """The models, and the data cut with their tokenizer (built while loading them when cutting the
    student from the teacher needs calibration blocks)."""
    built: list[BlockData] = []
    # (a cache built across tokenizers was built on stores that know each token's text: the same ones)
    text_bytes = cfg.model.teacher_cache is not None and TeacherCache.open(cfg.model.teacher_cache, verify=False).across

    def train_blocks(tok):
        if not built:
            built.append(build_block_data(cfg.data, tok, progress=progress, text_bytes=bool(text_bytes)))
        return built[0].train

    models = load_models(cfg, teacher, student, tokenizer, train_blocks=train_blocks)
    if models.teacher_tokenizer is not None:  # every block with the teacher's tokens of its text
        built[:] = [build_block_data(cfg.data, models.tokenizer, progress, teacher_tokenizer=models.teacher_tokenizer)]
        check_teacher_windows(built[0], models.teacher)
        note_unknown_text(built[0], models)
        note_lossy_tokenizers(models)
    note_dropped_bos(models)
    train_blocks(models.tokenizer)
    data = built[0]
    if models.chat_template_problem and any(s.store.chat for s in data.sources):
        raise LmdistillError(models.chat_template_problem)
    return models, data


def note_dropped_bos(models: Models) -> None:
    """Say so where a live teacher's tokenizer starts every text with a BOS token: lmdistill's
    blocks are packed text, cut anywhere in a document, and carry none, so the teacher reads every
    block without the token it was trained to see first."""
    tokenizer = models.teacher_tokenizer or models.tokenizer
    if models.teacher is None or tokenizer.bos_token_id is None:
        return
    if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        print(
            f"note: the teacher's tokenizer starts every text with {tokenizer.bos_token!r}, and lmdistill's blocks "
            "(packed text, cut anywhere in a document) carry none: the teacher reads each block without it, and "
            "a model that relies on it (Gemma, for one) predicts worse"
        )


# Capitals, accents, a full-width letter, a dash and a newline: what a lossy normalizer changes.
_PROBE = "The Café — naïve Ｑ 42\n"


def note_lossy_tokenizers(models: Models) -> None:
    """Across tokenizers, say so where either side does not write text back as it was (a
    normalizer that lowercases or folds characters, or text it cannot write): that side's bits
    per byte are of the text as its tokenizer sees it, and its tokens are carried by that text."""
    for role, tokenizer in (("student", models.tokenizer), ("teacher", models.teacher_tokenizer)):
        ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        if back != _PROBE:
            print(
                f"note: the {role}'s tokenizer does not write text back as it was ({_PROBE!r} comes back as {back!r}): "
                f"its bits per byte are of the text as it sees it"
            )


def note_unknown_text(data: BlockData, models: Models, threshold: float = 0.01) -> None:
    """Across tokenizers, say so where either side writes over ``threshold`` of the text's bytes
    as its unknown token: one cheap prediction credited with every byte it stands for, so that
    side's bits per byte look better than its model is."""
    sides = (("student", models.tokenizer, data.sources[0].store), ("teacher", models.teacher_tokenizer, None))
    for role, tokenizer, store in sides:
        store = store or data.train.teacher.store
        share = store.unknown_byte_share(tokenizer.unk_token_id)
        if share > threshold:
            print(
                f"note: the {role}'s tokenizer writes {share:.1%} of the text's bytes as its unknown token "
                f"{tokenizer.unk_token!r}: each counts as one prediction for all the bytes it covers, so the {role}'s "
                "bits per byte look better than they are; a tokenizer with byte fallback, or a byte-level one, has "
                "no unknown text"
            )


def check_teacher_windows(data: BlockData, teacher) -> None:
    """The teacher's tokens of the longest block fit in the teacher's positions."""
    longest = max(blocks.teacher.longest for blocks in (data.train, data.eval))
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise LmdistillError(
            f"the teacher's tokenizer writes the text of one student block in up to {longest} tokens, more than the "
            f"teacher's {limit} positions; lower data.block_size"
        )


def _check_eval_generation(cfg: Config, models: Models) -> None:
    """``eval.generate`` and ``eval.draft`` write text: an EOS token to stop at, and room for it."""
    e = cfg.eval
    wanted = [f"eval.{k}" for k in ("generate", "draft") if getattr(e, k)]
    if not wanted:
        return
    if models.tokenizer.eos_token_id is None:
        raise LmdistillError(
            f"{wanted[0]} needs the tokenizer's EOS token to end the student's continuations, and this tokenizer "
            "has none; set eos_token in its tokenizer_config.json"
        )
    if e.draft:
        check_draft_pair(models.student, models.teacher, "eval.draft")
    longest = e.prompt_tokens + e.max_new_tokens
    for role, model in (("student", models.student), ("teacher", models.teacher)):
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and longest > limit:
            raise LmdistillError(
                f"{wanted[0]}: prompts of {e.prompt_tokens} tokens + eval.max_new_tokens {e.max_new_tokens} reach "
                f"{longest} tokens, more than the {role}'s {limit} positions; lower eval.max_new_tokens"
            )


def _signal(cfg: Config, models: Models, cache, projection) -> tuple[str, TeacherSignal]:
    """The loss path (``loss.impl`` resolved) and the teacher signal that feeds it."""
    vocab = len(models.tokenizer)
    pairs = projection.pairs if projection is not None else ()
    if cache is not None:
        # A dense cache holds whole logits (the full path); sparse targets meet the student's
        # whole logits when they are small, else its hidden states chunk by chunk.
        impl = "full" if cache.mode == "dense" else _loss_impl(cfg, models, None)
        return impl, CachedTeacher(cache, student_output="hidden" if impl == "chunked" else "logits")
    live_teacher = models.teacher if cfg.distill.kd_weight > 0 or pairs else None
    if live_teacher is not None and models.teacher_tokenizer is not None:  # another tokenizer
        vocab = max(vocab, len(models.teacher_tokenizer))  # (the larger logits decide the loss path)
        impl = "full" if cfg.loss.impl == "reference" else _loss_impl(cfg, models, live_teacher, vocab)
        aligned = LiveAlignedHidden if impl == "chunked" else LiveAligned
        signal = aligned(live_teacher, models.teacher_tokenizer, models.tokenizer)
        print(
            f"cross-tokenizer: {signal.num_shared:,} tokens shared by the teacher's {len(models.teacher_tokenizer):,} "
            f"and the student's {len(models.tokenizer):,}; the others carried to the student token their text "
            "begins with"
        )
        return impl, signal
    impl = _loss_impl(cfg, models, live_teacher, dense_kd=live_teacher is not None)
    return impl, make_signal(impl, live_teacher, vocab, tuple(t for _, t in pairs))


def _loss_impl(cfg: Config, models: Models, teacher, vocab: int | None = None, *, dense_kd: bool = False) -> str:
    """The loss path; ``dense_kd``: a live teacher of the student's tokenizer, the one loss whose
    chunked path was measured faster than full on the CPU (the sparse losses were not)."""
    threshold = cfg.loss.auto_threshold_mib  # (memory, on any device)
    if dense_kd and uses_cpu(cfg):
        threshold = min(threshold, cfg.loss.auto_cpu_threshold_mib)
    try:
        return choose_loss_impl(
            cfg.loss.impl,
            divergences.get(cfg.distill.divergence),
            cfg.train.batch_size * (cfg.data.block_size - 1),
            vocab or len(models.tokenizer),
            models.student,
            teacher,
            threshold,
        )
    except ValueError as exc:
        raise LmdistillError(str(exc)) from None


def _objective(cfg: Config, vocab: int, signal, prepared: Prepared, projection, loss_impl: str) -> Objective:
    pairs = projection.pairs if projection is not None else ()
    h = cfg.distill.hidden
    hidden = HiddenTerm(h.weight, h.loss, tuple(s for s, _ in pairs), projection, prepared.project) if pairs else None
    return Objective.for_run(
        cfg, vocab, signal.student_output, prepared.raw, reference=loss_impl == "reference", hidden=hidden
    )


def _resume_or_start(
    cfg, run, accelerator, prepared, projection, plan, guard, monitor, data, tokenizer, teacher_reference
) -> Resumed:
    """Continue from the newest valid checkpoint (``--resume``), or start the run directory."""
    # The lock first (the main process takes it): nothing is written or removed without it.
    on_main(accelerator, lambda: run.open_for_writing(cfg))
    # The main process picks the checkpoint (hashing every file once); every process loads that one.
    checkpoint = on_main(accelerator, lambda: resume_point(run.checkpoints)) if cfg.run.resume else None
    if checkpoint is None:
        if accelerator.is_main_process:
            if cfg.run.resume:  # nothing to resume, or the attempt died before its first checkpoint
                print(f"note: no checkpoint in '{run.path}' yet: starting the run from step 0")
                run.trim_metrics(0)
            run.create(cfg)
            tokenizer.save_pretrained(run.path / "tokenizer")  # once per run; checkpoints + this = a model
        accelerator.wait_for_everyone()
        return Resumed()
    # Everything that can refuse the resume comes before the run directory is touched.
    adapters = checkpoint / ADAPTER_FILE
    problem = resume_problem(adapters.read_bytes() if adapters.is_file() else None, cfg.model.lora)
    if problem is not None:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: {problem}, and this config's model.lora differs; resume with the "
            "model.lora the run was started with (its config.yaml), or start a new run"
        )
    state = restore_training_state(
        checkpoint,
        prepared.raw,
        prepared.optimizer,
        accelerator.num_processes,
        cfg.train.batch_size,
        projection=projection,
        strategy=cfg.parallel.strategy,
        verified=True,
        total_steps=plan.total_steps,
    )
    try:
        guard.load_state_dict(state["guard"])
        monitor.load_state_dict(state["health"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(damaged_state_message(checkpoint, f"guard or health state: {exc!r}")) from None
    run_state, cursor = state["run"], state["data_cursor"]
    resumed = Resumed(checkpoint, run_state["step"], cursor["micro_batches"], run_state.get("initial_eval"))
    if accelerator.is_main_process:
        changed = run.warn_if_resume_differs(
            checkpoint, cfg, teacher_reference(), data.layout, processes=accelerator.num_processes
        )
        resumed = Resumed(checkpoint, resumed.step, resumed.micro_batches, resumed.initial_eval, tuple(changed))
        run.mark()
        atomic_write(run.path / "config.yaml", cfg.to_run_yaml())  # the config this start runs with
        remove_leftovers(run.checkpoints)
        run.trim_metrics(resumed.step, plan.total_steps)
        print(f"Resuming {run.path} from {checkpoint.name} (step {resumed.step} of {plan.total_steps})")
    accelerator.wait_for_everyone()
    return resumed
