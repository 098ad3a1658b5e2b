"""The distillation loop, readable top to bottom.

``train(cfg)`` loads the teacher and the student, packs the data, then runs: for each
optimizer step, forward both models on every micro-batch, backward the student's
loss (summed over tokens and divided once by the global number of target tokens),
check loss terms and gradient norm, and only then step the optimizer. Device
placement, mixed precision and multi-process runs go through accelerate.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import (capture_rng_state, directory_hash, find_latest_valid, load_checkpoint, restore_rng_state,
                         save_checkpoint)
from .config import Config
from .data import BlockSampler, build_block_data
from .errors import LmdistillError, TrainingStopped
from .evaluate import evaluate, format_ppl
from .guards import FaultInjector, GuardState, RollbackStore, SpikeDetector, first_nonfinite, stop_message
from .losses import distillation_loss
from .models import (ModelInfo, build_fresh_student, check_context_length, check_same_tokenizer, check_vocab_covers,
                     freeze,
                     load_causal_lm, load_tokenizer, resolve_source, student_config_from_teacher)
from .monitor import HealthMonitor, verdict_line
from .schedules import lr_at, temperature_at
from .tracking import MetricsLog

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    run_dir: Path
    status: str
    steps: int
    initial: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)
    student_dir: Path | None = None


# --------------------------------------------------------------------------- run directory
def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_run_json(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def choose_run_dir(cfg: Config) -> Path:
    """The run directory for ``cfg``, refusing to clobber an existing run unless asked."""
    if cfg.run.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("runs") / f"{cfg.run.name}-{stamp}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path
    path = Path(cfg.run.output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise LmdistillError(f"output directory '{path}' is a file; choose another --output-dir")
    if path.exists() and any(path.iterdir()) and not is_run_dir(path):
        # --overwrite deletes the directory: only ever one that lmdistill wrote.
        raise LmdistillError(
            f"output directory '{path}' is not empty and is not an lmdistill run; choose another --output-dir"
        )
    if cfg.run.resume:
        if read_run_json(path).get("status") == "finished":
            raise LmdistillError(f"the run in '{path}' already finished; there is nothing to resume (its student is "
                                 f"in {path / 'student'})")
        return path  # a missing or empty directory simply starts from step 0
    if path.exists() and any(path.iterdir()) and not cfg.run.overwrite:
        status = read_run_json(path).get("status")
        if status == "finished" or (path / "student").exists():
            raise LmdistillError(
                f"output directory '{path}' already holds a finished run; choose another --output-dir or pass "
                "--overwrite to replace it"
            )
        raise LmdistillError(
            f"output directory '{path}' holds an unfinished run (status: {status or 'unknown'}); pass --resume "
            "to continue it from its newest checkpoint, --overwrite to start it over, or another --output-dir"
        )
    return path


def is_run_dir(path: Path) -> bool:
    """A directory lmdistill wrote (possibly killed before its first file was complete)."""
    return any((path / name).exists() for name in ("run.json", "config.yaml", "metrics.jsonl", "checkpoints"))


def create_run_dir(path: Path, cfg: Config) -> None:
    if path.exists() and cfg.run.overwrite:
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / ".config.yaml.tmp"
        tmp.write_text(cfg.to_run_yaml())
        os.replace(tmp, path / "config.yaml")
    except OSError as exc:
        raise LmdistillError(f"cannot write the run directory '{path}': {exc.strerror}; choose a writable "
                             "--output-dir") from None


def save_student(model, tokenizer, run_dir: Path) -> Path:
    """save_pretrained + tokenizer into RUN_DIR/student, atomically, refusing non-finite weights."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LmdistillError(f"refusing to save the student: tensor '{name}' holds NaN or Inf; the previous "
                                 "files are kept")
    final = run_dir / "student"
    tmp = run_dir / ".student.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one tiny file does not need a "Writing model shards" bar
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        old = run_dir / ".student.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


# --------------------------------------------------------------------------- set-up helpers
def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    use_cpu = cfg.run.device == "cpu" or (cfg.run.device == "auto" and not torch.cuda.is_available())
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise LmdistillError("run.device = 'cuda' but no CUDA device is available; use run.device=auto or cpu")
    precision = cfg.run.mixed_precision
    if precision == "auto":
        precision = "bf16" if (not use_cpu and torch.cuda.is_bf16_supported()) else "no"
    # accelerate keeps one process-wide state; a second run in the same process (the default
    # teacher's pretraining, then the distillation; tests) may want another precision.
    # Reset it but keep the process group (PartialState) of a multi-process launch.
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state:
        # A single process may also switch devices (the CPU-only default teacher, then a GPU run).
        single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
        AcceleratorState._reset_state(reset_partial_state=single_process)
        GradientState._reset_state()
    return Accelerator(cpu=use_cpu, mixed_precision=precision, log_with=cfg.run.trackers or None)


def _has_tokenizer_files(source: str) -> bool:
    path = Path(source)
    if not path.is_dir():
        return True  # a hub id: assume it ships a tokenizer; loading tells otherwise
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                             "tokenizer.model"))


def load_models(cfg: Config, teacher=None, student=None, tokenizer=None):
    """(teacher or None, student, tokenizer, teacher_name, student_name) with all checks done."""
    needs_teacher = cfg.distill.kd_weight > 0
    teacher_name = student_name = None
    if needs_teacher and teacher is None:
        if cfg.model.teacher is None:
            raise LmdistillError("no teacher: set model.teacher (or leave it empty to use the embedded default)")
        teacher_name = resolve_source(cfg.model.teacher, "model.teacher")
        tokenizer = tokenizer or load_tokenizer(teacher_name, "teacher")
        dtype = cfg.model.teacher_dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() and cfg.run.device != "cpu" else "float32"
        teacher = load_causal_lm(teacher_name, "teacher", DTYPES[dtype], cfg.model.trust_remote_code)
    elif teacher is not None:
        teacher_name = cfg.model.teacher or type(teacher).__name__
    teacher_config = teacher.config if teacher is not None else None
    if teacher is None and cfg.model.teacher is not None and cfg.model.student is None and student is None:
        # Plain LM training (kd_weight 0) of a fresh student shaped after the teacher: its
        # config and tokenizer are enough, its weights are not needed.
        from transformers import AutoConfig

        teacher_name = resolve_source(cfg.model.teacher, "model.teacher")
        tokenizer = tokenizer or load_tokenizer(teacher_name, "teacher")
        teacher_config = AutoConfig.from_pretrained(teacher_name, trust_remote_code=cfg.model.trust_remote_code)
    if student is None:
        if cfg.model.student is not None:
            student_name = resolve_source(cfg.model.student, "model.student")
            student = load_causal_lm(student_name, "student", torch.float32, cfg.model.trust_remote_code)
            if _has_tokenizer_files(student_name):
                student_tok = load_tokenizer(student_name, "student")
                if tokenizer is None:
                    tokenizer = student_tok
                else:
                    check_same_tokenizer(tokenizer, student_tok, teacher_name, student_name)
        else:
            if teacher_config is None:
                raise LmdistillError("no student to train: set model.student, or a teacher to build one from")
            config = student_config_from_teacher(teacher_config, cfg.model.student_config)
            student = build_fresh_student(config, cfg.run.seed)
            student_name = "fresh: " + ", ".join(f"{k}={v}" for k, v in (cfg.model.student_config or {}).items()) \
                if cfg.model.student_config else "fresh: half of the teacher"
    else:
        student_name = cfg.model.student or type(student).__name__
    if tokenizer is None:
        raise LmdistillError("no tokenizer found: the student directory has none and there is no teacher")
    vocab_size = len(tokenizer)
    check_vocab_covers(student, vocab_size, "student", student_name)
    if teacher is not None:
        check_vocab_covers(teacher, vocab_size, "teacher", teacher_name)
        freeze(teacher)
    for model, role, name in ((student, "student", student_name), (teacher, "teacher", teacher_name)):
        if model is not None:
            check_context_length(model, cfg.data.block_size, role, name)
    return teacher, student, tokenizer, teacher_name, student_name


def make_optimizer(model, cfg: Config):
    """AdamW; no weight decay on norms, biases and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))


# --------------------------------------------------------------------------- the loop
def train(cfg: Config, *, teacher=None, student=None, tokenizer=None, progress: bool = True,
          print_summary: bool = True) -> RunResult:
    """Run one distillation (or, with kd_weight 0, plain LM training) as ``cfg`` says."""
    cfg.validate()
    _check_trackers_installed(cfg)
    run_dir = choose_run_dir(cfg)  # refuse early, before minutes of loading
    if cfg.distill.kd_weight > 0 and teacher is None and cfg.model.teacher is None:
        # Before this run's accelerator exists: pretraining the default teacher is a run of its own.
        from .default import ensure_default_teacher

        cfg.model.teacher = str(ensure_default_teacher(progress=progress))
    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    from accelerate.utils import set_seed

    set_seed(cfg.run.seed)
    is_main = accelerator.is_main_process
    if "FSDP" in str(accelerator.distributed_type) or "DEEPSPEED" in str(accelerator.distributed_type):
        raise LmdistillError(f"{accelerator.distributed_type} is not supported yet: launch with a DDP accelerate "
                             "config (docs/distributed.md)")

    teacher, student, tokenizer, teacher_name, student_name = load_models(cfg, teacher, student, tokenizer)
    vocab_size = len(tokenizer)
    data = build_block_data(cfg.data, tokenizer)

    world = accelerator.num_processes
    sampler = BlockSampler(len(data.train), cfg.train.batch_size, cfg.run.seed, accelerator.process_index, world)
    steps_per_epoch = sampler.micro_batches_per_epoch // cfg.train.grad_accum
    if steps_per_epoch == 0:
        need = cfg.train.batch_size * cfg.train.grad_accum * world
        raise LmdistillError(
            f"one optimizer step needs {need} blocks (batch_size x grad_accum x processes) but there are only "
            f"{len(data.train)} training blocks; lower train.batch_size or add data"
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else int(0.05 * total_steps)
    eval_every = cfg.train.eval_every or max(1, total_steps // 10)
    # Eval builds full logits (no gradients): keep a batch's logits under the same size budget.
    eval_batch_size = max(1, min(max(cfg.train.batch_size, 8), int(cfg.loss.auto_threshold_mib * 2**20 // (
        cfg.data.block_size * len(tokenizer) * 4 * 2))))
    loss_impl = choose_loss_impl(cfg, cfg.train.batch_size * (cfg.data.block_size - 1), len(tokenizer), student,
                                 teacher)

    optimizer = make_optimizer(student, cfg)
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()
    device = accelerator.device
    if teacher is not None:
        teacher.to(device)
    raw_student = accelerator.unwrap_model(student)
    teacher_before = _fingerprint(teacher) if teacher is not None else None

    teacher_ref: dict | None = None  # path + content hash, computed on first use (hashing reads every file)

    def teacher_reference() -> dict | None:
        nonlocal teacher_ref
        if teacher_ref is None and teacher is not None:
            teacher_ref = _teacher_reference(cfg.model.teacher)
        return teacher_ref

    resume_from = None
    if cfg.run.resume:
        resume_from, warnings = find_latest_valid(run_dir / "checkpoints")
        for warning in warnings if is_main else []:
            print(f"warning: {warning}")
    if is_main:
        if resume_from is None:
            if cfg.run.resume:  # the attempt died before its first checkpoint: redo it from step 0
                _trim_metrics(run_dir / "metrics.jsonl", 0)
            create_run_dir(run_dir, cfg)
            tokenizer.save_pretrained(run_dir / "tokenizer")  # once per run; checkpoints + this = a model
        else:
            _check_resume_compatible(run_dir, resume_from, cfg, teacher_reference())
    accelerator.wait_for_everyone()
    start_step, micro, initial = 0, 0, None
    state: dict = {}
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        try:
            raw_student.load_state_dict(ckpt.model_state)
        except RuntimeError as exc:
            raise LmdistillError(f"{resume_from} does not fit this student ({str(exc).splitlines()[0][:160]}); resume "
                                 "with the run's own model settings") from None
        optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.rng_state is not None:
            restore_rng_state(ckpt.rng_state)
        state = ckpt.trainer_state
        if state.get("processes", 1) != world:
            raise LmdistillError(
                f"{resume_from} was written by a run with {state.get('processes', 1)} processes, this one has {world}; "
                "the data order depends on the process count: resume with the same number of processes"
            )
        start_step, micro, initial = state["step"], state["micro_batches"], state["initial_eval"]
        if is_main:
            _trim_metrics(run_dir / "metrics.jsonl", start_step)
            print(f"Resuming {run_dir} from {resume_from.name} (step {start_step} of {total_steps})")
    if cfg.run.trackers:
        accelerator.init_trackers(cfg.run.name, config=_flat_config(cfg))
    log = MetricsLog(run_dir, enabled=is_main, accelerator=accelerator if cfg.run.trackers else None)
    run_info = {
        "status": "running", "started_at": _utcnow(), "command": "train",
        "teacher": asdict(ModelInfo.of(teacher, teacher_name)) if teacher is not None else None,
        "student": asdict(ModelInfo.of(raw_student, student_name)),
        "data": data.describe(),
        "plan": {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup,
                 "eval_every": eval_every, "loss_impl": loss_impl,
                 "processes": world, "device": str(device), "mixed_precision": accelerator.mixed_precision,
                 "vocab_size": vocab_size},
    }
    if resume_from is not None:
        run_info["resumed_from_step"] = start_step
    if is_main:
        write_json_atomic(run_dir / "run.json", run_info)

    monitor = HealthMonitor(cfg.health, total_steps)
    detector = SpikeDetector(cfg.guard.spike_window, cfg.guard.spike_warmup, cfg.guard.spike_factor, cfg.guard.spike_mad)
    guard = GuardState()
    if state:
        guard = GuardState(**state["guard"])
        detector.load_state_dict(state["spike_detector"])
        monitor.load_state_dict(state["health"])
    rollback = RollbackStore(cfg.guard.rollback_keep, cfg.guard.rollback_interval) if cfg.guard.spike == "rollback" else None
    injector = FaultInjector(cfg.debug, accelerator.process_index)
    say = tqdm.write if progress else print

    def announce(step: int, fired: list[tuple[str, str]]) -> None:
        for check, message in fired:
            if is_main:
                say(f"[health:{check}] {message}")
            log.write({"step": step, "health": check, "message": message})

    if injector.active and is_main:
        say(f"WARNING: fault injection is ON (debug section): {injector.describe()}")

    def run_eval(step: int, temperature: float, desc: str) -> dict:
        shard = data.eval[accelerator.process_index :: world]
        result = evaluate(
            raw_student, teacher, shard, vocab_size=vocab_size, temperature=temperature,
            scale_by_t2=cfg.distill.scale_by_t2, divergence=cfg.distill.divergence,
            batch_size=eval_batch_size, device=device, autocast=accelerator.autocast,
            reduce=lambda t: accelerator.reduce(t.to(device), "sum").cpu(), teacher_cache=teacher_cache,
            desc=desc, progress=progress and is_main,
        )
        log.write({"step": step, **result})
        announce(step, monitor.on_eval(step, result["eval_ppl"]))
        return result

    teacher_cache: dict = {}
    t_start = temperature_at(0, total_steps, cfg.distill.temperature, cfg.distill.min_temperature,
                             cfg.distill.temperature_schedule)
    if initial is None:
        initial = run_eval(0, t_start, "eval (before)")

    def checkpoint(done: int) -> None:
        if is_main:
            trainer_state = {
                "step": done, "micro_batches": micro, "epoch": sampler.epoch_of(max(micro - 1, 0)),
                "total_steps": total_steps, "processes": world, "initial_eval": initial, "guard": asdict(guard),
                "spike_detector": detector.state_dict(), "health": monitor.state_dict(),
                "teacher": teacher_reference(),
            }
            save_checkpoint(run_dir / "checkpoints", done, model_state=raw_student.state_dict(),
                            optimizer_state=optimizer.state_dict(), trainer_state=trainer_state,
                            rng_state=capture_rng_state(), keep=cfg.checkpoint.keep,
                            extra_files={"config.yaml": cfg.to_run_yaml().encode(),
                                         "student_config.json": raw_student.config.to_json_string().encode()})
        accelerator.wait_for_everyone()

    status, step = "running", start_step
    bar = tqdm(total=total_steps, initial=start_step, desc="distill" if teacher is not None else "train", unit="step",
               disable=not (progress and is_main), dynamic_ncols=True)
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            temperature = temperature_at(step, total_steps, cfg.distill.temperature, cfg.distill.min_temperature,
                                         cfg.distill.temperature_schedule)
            lr = lr_at(step, total_steps, cfg.train.lr, warmup, cfg.train.lr_schedule, cfg.train.min_lr_ratio)
            lr *= guard.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [data.train[sampler.indices(micro + i)] for i in range(cfg.train.grad_accum)]
            micro += cfg.train.grad_accum
            epoch = sampler.epoch_of(micro - 1)

            # The one normaliser for every term: valid targets across micro-batches and ranks.
            local_tokens = sum(b[:, 1:].numel() for b in batches)
            num_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=device), "sum").item()
            # stats: loss, kd, kd_unscaled, ce, teacher_bad -- summed over micro-batches, already / num_tokens
            stats = torch.zeros(5, device=device, dtype=torch.float64)
            for i, ids in enumerate(batches):
                ids = ids.to(device)
                last = i == len(batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(student):
                    with accelerator.autocast():
                        parts, teacher_bad = _micro_batch_loss(
                            ids, student, teacher, vocab_size, temperature, cfg, num_tokens, injector, step,
                            loss_impl, raw_student)
                    # DDP averages gradients over ranks; our loss is already a global mean.
                    loss = parts.total * world
                    if step in injector.loss_multiplier:
                        loss = loss * injector.loss_multiplier[step]
                    if i == 0:
                        loss = injector.poison(loss, step, "loss")
                    accelerator.backward(loss)
                stats += torch.stack([loss.detach().double() / world, parts.kd.double(), parts.kd_unscaled.double(),
                                      parts.ce.double(), teacher_bad.double()])
            if injector.value(step, "grad") is not None:
                first = next(p for p in raw_student.parameters() if p.grad is not None)
                first.grad.view(-1)[0] = injector.value(step, "grad")
            max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else math.inf
            grad_norm = accelerator.clip_grad_norm_(student.parameters(), max_norm)
            # One reduction, one sync: every rank sees the same numbers and so decides the same.
            stats = accelerator.reduce(torch.cat([stats, grad_norm.detach().double().view(1)]), "sum")
            loss_v, kd_v, kd_u_v, ce_v, teacher_bad_v, grad_sum = stats.tolist()
            values = {"loss": loss_v, "kd": kd_v, "ce": ce_v, "grad": grad_sum / world,
                      "teacher_logits": math.nan if teacher_bad_v > 0 else 0.0}
            record = {"step": step, "epoch": epoch, "temperature": temperature, "lr": lr, "loss": loss_v,
                      "kd_loss": kd_v, "kd_loss_unscaled": kd_u_v, "ce_loss": ce_v, "grad_norm": grad_sum / world}

            skip_reason = None
            bad = first_nonfinite(values) if cfg.guard.enabled else None
            if bad is not None:
                skip_reason = f"nonfinite:{bad}"
                guard.consecutive_skips += 1
                guard.total_skips += 1
                announce(step, monitor.on_nonfinite(step, bad))
            else:
                is_spike, median = detector.judge(loss_v) if cfg.guard.enabled else (False, math.nan)
                if is_spike:
                    action = {"warn": "kept", "skip": "step skipped", "rollback": "rolled back"}[cfg.guard.spike]
                    announce(step, monitor.on_spike(step, loss_v, median, action))
                    if cfg.guard.spike == "skip":
                        skip_reason = "spike"
                    elif cfg.guard.spike == "rollback":
                        skip_reason = "spike"
                        to_step = rollback.restore_latest(raw_student, optimizer) if rollback else None
                        if to_step is not None:
                            guard.rollbacks += 1
                            guard.lr_scale *= cfg.guard.rollback_lr_factor
                            log.write({"step": step, "event": "rollback", "to_step": to_step,
                                       "lr_scale": guard.lr_scale,
                                       "message": f"restored the state of step {to_step}; LR x{guard.lr_scale:g}"})
                            if is_main:
                                say(f"[guard] rolled back to the state of step {to_step} (LR scale {guard.lr_scale:g})")
                            if guard.rollbacks >= cfg.guard.max_rollbacks:
                                raise TrainingStopped(
                                    f"stopped after {guard.rollbacks} rollbacks (guard.max_rollbacks = "
                                    f"{cfg.guard.max_rollbacks}): the loss keeps spiking; lower train.lr or check "
                                    "the data")
                else:
                    detector.observe(loss_v)
            if skip_reason == "spike":
                bad = "spike"
                guard.consecutive_skips += 1
                guard.total_skips += 1
            if skip_reason is None:
                guard.consecutive_skips = 0
                optimizer.step()
            elif accelerator.scaler is not None:
                # fp16: clip_grad_norm_ already unscaled the gradients; the scaler must close this
                # step (and lower its scale after an overflow) or the next unscale_ fails.
                accelerator.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if skip_reason is None and rollback is not None:
                rollback.maybe_save(step + 1, raw_student, optimizer)

            elapsed = time.perf_counter() - t0
            record["tokens_per_s"] = sum(b.numel() for b in batches) * world / elapsed
            if skip_reason is not None:
                log.write({"step": step, "skipped": True, "reason": skip_reason, **{k: v for k, v in record.items()
                                                                                     if k != "step"}})
                if guard.consecutive_skips >= cfg.guard.max_consecutive_skips:
                    raise TrainingStopped(stop_message(bad, guard.consecutive_skips))
            else:
                announce(step, monitor.on_train_loss(step, loss_v))
                if step % cfg.train.log_every == 0 or step == total_steps - 1:
                    log.write(record)
            bar.set_description(f"{'distill' if teacher is not None else 'train'} ep {epoch}", refresh=False)
            postfix = {"loss": f"{loss_v:.3f}", "T": f"{temperature:.2f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
            if teacher is None:
                del postfix["T"]  # plain LM training: no temperature in play
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            done = step + 1
            if done % eval_every == 0 and done < total_steps:
                run_eval(done, temperature, f"eval (step {done})")
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == total_steps:
                checkpoint(done)
            if cfg.debug.exit_after_step == done:
                os._exit(137)  # the drill: no finally blocks, no flushes beyond what is already on disk
        status = "finished"
    except TrainingStopped as exc:
        status = "stopped"
        run_info["exit_reason"] = str(exc)
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        run_info["exit_reason"] = "interrupted by the user (Ctrl-C)"
        raise
    except BaseException as exc:
        status = "failed"
        run_info["exit_reason"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        bar.close()
        if status not in ("running", "finished"):  # stopped early: leave a readable record of it
            run_info["status"] = status
            _finish(run_info, run_dir, monitor, log, is_main, started, step)

    # ---------------------------------------------------------------- the end of a finished run
    final_t = temperature_at(total_steps, total_steps, cfg.distill.temperature, cfg.distill.min_temperature,
                             cfg.distill.temperature_schedule)
    final = run_eval(total_steps, final_t, "eval (final)")
    student_dir = None
    if is_main:
        student_dir = save_student(accelerator.unwrap_model(student), tokenizer, run_dir)
    if teacher is not None and _fingerprint(teacher) != teacher_before:
        raise AssertionError("the teacher's weights changed during training")  # our invariant, not user error
    run_info.update(status="finished", initial=_eval_summary(initial), final={**_eval_summary(final),
                    "steps": total_steps, "skipped_steps": guard.total_skips, "rollbacks": guard.rollbacks,
                    "tokens_per_s": _median_tokens_per_s(run_dir) if is_main else None})
    health = _finish(run_info, run_dir, monitor, log, is_main, started, total_steps)
    result = RunResult(run_dir=run_dir, status="finished", steps=total_steps, initial=initial, final=final,
                       health=health, student_dir=student_dir)
    if is_main and print_summary:
        print(summary_table(result))
    return result


def _check_trackers_installed(cfg: Config) -> None:
    import importlib.util

    from .config import TRACKERS

    for tracker in cfg.run.trackers:
        if importlib.util.find_spec(TRACKERS[tracker]) is None:
            raise LmdistillError(f"run.trackers asks for {tracker!r} but the package '{TRACKERS[tracker]}' is not "
                                 f"installed; pip install {TRACKERS[tracker]}, or remove it from run.trackers")


def _flat_config(cfg: Config) -> dict:
    """section.key -> value with lists and mappings as text: what trackers accept as hyperparameters."""
    return {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


def _teacher_reference(source: str | None) -> dict | None:
    """The teacher by path and content hash: checkpoints refer to it, never copy it."""
    if source is None:
        return None
    path = Path(source)
    return {"source": source, "hash": directory_hash(path) if path.is_dir() else None}


def _check_resume_compatible(run_dir: Path, checkpoint: Path, cfg: Config, teacher_ref: dict | None) -> None:
    """Warn when a resume would not continue the same run."""
    from .config import load_yaml

    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved, now = Config.from_dict(load_yaml(saved_path)).to_dict(), cfg.to_dict()
        for key in ("resume", "overwrite"):
            saved["run"][key] = now["run"][key]
        changed = [f"{section}.{key}" for section in now for key in now[section]
                   if saved.get(section, {}).get(key) != now[section][key]]
        if changed:
            print(f"warning: resuming with a changed config ({', '.join(changed)}); the resumed run will not match "
                  "an uninterrupted one")
    if teacher_ref:
        saved_teacher = json.loads((checkpoint / "trainer_state.json").read_text()).get("teacher") or {}
        if saved_teacher.get("hash") and saved_teacher.get("hash") != teacher_ref.get("hash"):
            print(f"warning: the teacher at {teacher_ref['source']} changed since the checkpoint was written "
                  f"(content hash differs); resuming with the changed teacher")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines the resumed run will write again (training lines from ``step`` on)."""
    from .tracking import read_metrics

    if not path.exists():
        return
    # The eval at ``step`` was written just before the checkpoint it resumes from; keep it.
    kept = [r for r in read_metrics(path) if r.get("step", 0) < step
            or (0 < step == r.get("step") and ("eval_ce_loss" in r or r.get("health") == "eval_ppl"))]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


# Config fields that change logits after the lm_head; the fused loss does not model them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fused_loss_unsupported(model) -> str | None:
    """Why the chunked loss cannot reproduce ``model``'s logits, or None if it can."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"{type(model).__name__} has no plain linear output layer"
    for name in _LOGIT_TRANSFORMS:
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            return f"{type(model).__name__} transforms its logits ({name})"
    return None


def choose_loss_impl(cfg: Config, tokens_per_micro_batch: int, vocab_size: int, student, teacher) -> str:
    """``full`` or ``chunked`` for ``loss.impl`` (auto: chunked when the logits would be large)."""
    if cfg.loss.impl == "full":
        return "full"
    problems = [p for p in (fused_loss_unsupported(m) for m in (student, teacher) if m is not None) if p]
    if cfg.loss.impl == "chunked":
        if problems:
            raise LmdistillError(f"loss.impl = chunked is not possible: {problems[0]}; use loss.impl=full")
        return "chunked"
    models = 2 if teacher is not None else 1
    logits_mib = tokens_per_micro_batch * vocab_size * 4 * models / 2**20
    return "chunked" if not problems and logits_mib > cfg.loss.auto_threshold_mib else "full"


def _micro_batch_loss(ids, student, teacher, vocab_size, temperature, cfg: Config, num_tokens, injector, step,
                      impl: str = "full", raw_student=None):
    """LossParts for one micro-batch, and a 0-d flag: the teacher produced NaN or +Inf."""
    targets = ids[:, 1:]
    if impl == "chunked":
        return _chunked_micro_batch_loss(ids, targets, student, raw_student, teacher, vocab_size, temperature, cfg,
                                         num_tokens, injector, step)
    # use_cache=False: a training forward has no use for a KV cache (it would cost memory and time).
    s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1, :vocab_size]
    s_logits = injector.poison(s_logits, step, "student_logits")
    t_logits = None
    teacher_bad = torch.zeros((), device=ids.device)
    if teacher is not None and cfg.distill.kd_weight > 0:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1, :vocab_size]
            t_logits = injector.poison(t_logits, step, "teacher_logits")
            # -inf is a legitimate masked entry; NaN or +inf is a broken teacher. max() finds both.
            teacher_bad = (~torch.isfinite(t_logits.amax())).float()
    parts = distillation_loss(s_logits, t_logits, targets, temperature=temperature, kd_weight=cfg.distill.kd_weight,
                              scale_by_t2=cfg.distill.scale_by_t2, divergence=cfg.distill.divergence,
                              num_tokens=num_tokens)
    return parts, teacher_bad


def _chunked_micro_batch_loss(ids, targets, student, raw_student, teacher, vocab_size, temperature, cfg: Config,
                              num_tokens, injector, step):
    """The same loss from final hidden states: no (tokens x vocab) tensor for the whole batch.

    The forward still goes through the (possibly DDP-wrapped) model so gradient sync
    works; ``logits_to_keep=1`` makes it compute the logits of one position only.
    """
    from .fused import fused_linear_distillation_loss

    hidden = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1,
                     use_cache=False).hidden_states[-1][:, :-1]
    hidden = injector.poison(hidden, step, "student_logits")
    head = raw_student.get_output_embeddings()
    t_hidden = t_head = None
    teacher_bad = torch.zeros((), device=ids.device)
    if teacher is not None and cfg.distill.kd_weight > 0:
        with torch.no_grad():
            t_hidden = teacher(input_ids=ids, output_hidden_states=True, logits_to_keep=1,
                               use_cache=False).hidden_states[-1][:, :-1]
            t_hidden = injector.poison(t_hidden, step, "teacher_logits")
            teacher_bad = (~torch.isfinite(t_hidden).all()).float()
        t_head = teacher.get_output_embeddings()
    parts = fused_linear_distillation_loss(
        hidden.reshape(-1, hidden.shape[-1]), head.weight,
        t_hidden.reshape(-1, t_hidden.shape[-1]) if t_hidden is not None else None,
        t_head.weight if t_head is not None else None, targets.reshape(-1),
        temperature=temperature, kd_weight=cfg.distill.kd_weight, scale_by_t2=cfg.distill.scale_by_t2,
        divergence=cfg.distill.divergence, num_tokens=num_tokens, vocab_size=vocab_size, student_bias=head.bias,
        teacher_bias=t_head.bias if t_head is not None else None, chunk_size=cfg.loss.chunk_size)
    return parts, teacher_bad


def _fingerprint(model) -> list[tuple[float, float]]:
    """Cheap on-device checksums of every parameter, to catch a teacher that was modified."""
    return [(p.detach().sum(dtype=torch.float64).item(),
             torch.linalg.vector_norm(p.detach(), dtype=torch.float64).item()) for p in model.parameters()]


def _eval_summary(result: dict) -> dict:
    keys = ("eval_ce_loss", "eval_ppl", "eval_kd_loss", "eval_kl", "top1_agreement", "teacher_ce_loss", "teacher_ppl")
    return {k: result[k] for k in keys if k in result}


def _median_tokens_per_s(run_dir: Path) -> float | None:
    """The run's throughput figure, defined once in the report module (median of training lines)."""
    from .report import load_run, median_tokens_per_s

    return median_tokens_per_s(load_run(run_dir))


def _finish(run_info: dict, run_dir: Path, monitor: HealthMonitor, log: MetricsLog, is_main: bool,
            started: float, steps_done: int) -> dict:
    """health.json, run.json and the report: written for finished and stopped runs alike.

    Returns the final health summary (every process computes it; only the main one writes)."""
    log.close()
    health = monitor.finalize()
    if not is_main:
        return health
    write_json_atomic(run_dir / "health.json", health)
    run_info.update(finished_at=_utcnow(), wall_time_s=round(time.perf_counter() - started, 2),
                    steps_done=steps_done, health_verdict=health["verdict"])
    write_json_atomic(run_dir / "run.json", run_info)
    from .report import write_report

    try:
        write_report(run_dir)
    except Exception as exc:  # a report must never turn a good run into a failed one
        print(f"warning: could not write report.md: {type(exc).__name__}: {exc}")
    return health


def summary_table(result: RunResult) -> str:
    i, f = result.initial, result.final
    rows = []
    if "teacher_ppl" in f:
        rows.append(("teacher", f["teacher_ppl"], f["teacher_ce_loss"]))
    rows.append(("student before", i["eval_ppl"], i["eval_ce_loss"]))
    rows.append(("student after", f["eval_ppl"], f["eval_ce_loss"]))
    width = max(len(r[0]) for r in rows) + 2
    lines = ["", f"{'held-out':<{width}}{'perplexity':>14}{'CE nats/token':>16}"]
    lines += [f"{name:<{width}}{format_ppl(ppl):>14}{ce:>16.4f}" for name, ppl, ce in rows]
    if "top1_agreement" in f:
        lines.append(f"top-1 agreement with the teacher: {f['top1_agreement']:.1%}; "
                     f"KL(teacher || student) at T=1: {f['eval_kl']:.4f} nats/token")
    lines.append(f"health: {verdict_line(result.health)}")
    lines.append(f"run directory: {result.run_dir}")
    return "\n".join(lines)
