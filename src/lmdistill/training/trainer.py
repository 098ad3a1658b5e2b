"""The distillation loop, readable top to bottom.

One optimizer step (``Trainer.train_step``)::

    T, lr      = schedules(step)                      pure functions of the step
    batches    = the step's micro-batches             the data cursor is one integer
    num_tokens = valid targets, all micro-batches and ranks: the one normaliser
    for batch in batches:
        view   = signal(batch, T)                     the teacher's side (live model, cache, ...)
        parts  = objective(student, batch, view, T, num_tokens)
        backward(parts.total)
    grad_norm  = clip(gradients)
    stats      = reduce(loss terms, grad_norm)        one collective: every rank decides alike
    decision   = guard.decide(stats)                  step, skip or roll back
    apply(decision)                                   only now can the weights change

``Trainer.train`` runs that step and, around it, what a run needs: logging, health checks,
evaluation and checkpoints (``end_step``). Where the teacher's view comes from is the
``signal`` (signals.py); what the loss computes is the ``objective`` (objective.py); the
divergences are in divergences.py. Devices, mixed precision and data parallelism go through
accelerate.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from lmdistill.config import Config
from lmdistill.core.batch import Batch
from lmdistill.core.errors import CheckpointError, LmdistillError, PeerLost, TrainingStopped
from lmdistill.core.files import model_reference
from lmdistill.core.parallel import check_fsdp, full_tensor, shard, whole_model
from lmdistill.core.paths import atomic_write
from lmdistill.core.progress import interactive, progress_bar
from lmdistill.data.sources import build_block_data, make_sampler
from lmdistill.loss import divergences
from lmdistill.loss.hidden import build_projection
from lmdistill.loss.objective import HiddenTerm, Objective
from lmdistill.loss.views import ScoreSpec
from lmdistill.models.loading import ModelInfo, load_models, parameter_fingerprint
from lmdistill.report import write_report
from lmdistill.report.metrics import MetricsLog
from lmdistill.teacher.cache import open_for_run
from lmdistill.teacher.onpolicy import OnPolicy, on_policy_signal
from lmdistill.teacher.signals import CachedTeacher, LiveLogits, TeacherSignal, choose_loss_impl, make_signal
from lmdistill.training.checkpoint import (
    capture_rng_state,
    damaged_state_message,
    make_staging_dir,
    projection_file,
    remove_leftovers,
    restore_training_state,
    resume_point,
    save_checkpoint,
)
from lmdistill.training.devices import check_trackers_installed, flat_config, lost_peer, make_accelerator, on_main
from lmdistill.training.evaluate import evaluate, summary_table
from lmdistill.training.faults import FaultInjector
from lmdistill.training.guards import SUMMED_TERMS, Action, Cause, Decision, Guard, StepStats
from lmdistill.training.interrupts import GracefulStop, Interrupted
from lmdistill.training.monitor import HealthMonitor
from lmdistill.training.results import RunResult, StepResult
from lmdistill.training.rundir import RunDirectory
from lmdistill.training.schedules import Plan, lr_at, make_optimizer, temperature_at
from lmdistill.training.sharded import save_shards

SPIKE_ACTIONS = {"warn": "kept", "skip": "step skipped", "rollback": "rolled back"}


def train(
    cfg: Config, *, teacher=None, student=None, tokenizer=None, progress: bool = True, print_summary: bool = True
) -> RunResult:
    """Run one distillation (or, with kd_weight 0, plain LM training) as ``cfg`` says.

    ``model.teacher`` must name the teacher (``lmdistill.train`` and the CLI fill in the
    embedded default first). ``teacher``, ``student`` and ``tokenizer`` objects, when given,
    are used instead of loading them.
    """
    trainer = Trainer(cfg, teacher=teacher, student=student, tokenizer=tokenizer, progress=progress)
    result = trainer.train()
    if trainer.is_main and print_summary:
        print(summary_table(result))
    return result


def preflight(cfg: Config) -> RunDirectory:
    """Every check that needs no model or data: the config, the trackers, the output directory.
    Done first, so that a typo costs seconds, not a model load (or the default teacher's build)."""
    cfg.validate()
    check_trackers_installed(cfg)
    return RunDirectory.for_config(cfg)


class Trainer:
    def __init__(self, cfg: Config, *, teacher=None, student=None, tokenizer=None, progress: bool = True):
        self.run = preflight(cfg)
        self.cfg, self.progress = cfg, progress
        self.started = time.perf_counter()
        self.accelerator = make_accelerator(cfg)
        from accelerate.utils import set_seed

        set_seed(cfg.run.seed)
        self.is_main, self.world = self.accelerator.is_main_process, self.accelerator.num_processes
        self.device = self.accelerator.device
        self.fsdp = cfg.parallel.strategy == "fsdp"
        if self.fsdp:
            check_fsdp(cfg, self.world)
        self.data = None
        self._setup_models(load_models(cfg, teacher, student, tokenizer, train_blocks=self._train_blocks))
        self._setup_resume()
        self._setup_logging()
        faults = FaultInjector(cfg.debug, self.accelerator.process_index)
        faults.install(self)
        if faults.active and self.is_main:
            self.say(f"WARNING: fault injection is ON (debug section): {faults.describe()}")

    # ------------------------------------------------------------------ set-up
    def _train_blocks(self, tokenizer) -> torch.Tensor:
        if self.data is None:
            self.data = build_block_data(self.cfg.data, tokenizer, progress=self.progress)
        return self.data.train

    def _setup_models(self, models) -> None:
        cfg = self.cfg
        self.models, self.tokenizer, self.vocab_size = models, models.tokenizer, len(models.tokenizer)
        self._train_blocks(self.tokenizer)
        if models.chat_template_problem and any(s.store.chat for s in self.data.sources):
            raise LmdistillError(models.chat_template_problem)
        self.sampler = make_sampler(
            self.data, cfg.train.batch_size, cfg.run.seed, self.accelerator.process_index, self.world
        )
        self.plan = Plan.for_run(
            cfg, self.sampler.micro_batches_per_epoch, self.world, len(self.data.train), self.vocab_size
        )
        self.teacher = models.teacher
        self.cache = (
            open_for_run(cfg, self.tokenizer, self.data, self.vocab_size, say=self._note)
            if cfg.model.teacher_cache
            else None
        )  # a teacher cache: no teacher model at all
        self.projection = build_projection(cfg.distill.hidden, models)  # None: no hidden-state term
        pairs = self.projection.pairs if self.projection is not None else ()
        self.live_teacher = self.teacher if cfg.distill.kd_weight > 0 or pairs else None
        if self.cache is not None:
            # A dense cache holds whole logits (the full path); sparse targets meet the student's
            # whole logits when they are small, else its hidden states chunk by chunk.
            self.loss_impl = "full" if self.cache.mode == "dense" else self._choose_loss_impl(models, teacher=None)
            self.signal = CachedTeacher(
                self.cache, student_output="hidden" if self.loss_impl == "chunked" else "logits"
            )
        else:
            self.loss_impl = self._choose_loss_impl(models, self.live_teacher)
            self.signal = make_signal(self.loss_impl, self.live_teacher, self.vocab_size, tuple(t for _, t in pairs))
        project = self._prepare(models.student)
        if self.teacher is not None:
            self.teacher.to(self.device)
            if self.fsdp:
                shard(self.teacher, self.accelerator.mixed_precision, self.device)
        if cfg.distill.on_policy.fraction > 0:  # the student writes, the live teacher scores (onpolicy.py)
            self.signal = on_policy_signal(
                cfg, self.signal, self.raw_student, self.teacher, self.tokenizer, self.data, self.accelerator
            )
        hidden = (
            HiddenTerm(
                cfg.distill.hidden.weight, cfg.distill.hidden.loss, tuple(s for s, _ in pairs), self.projection, project
            )
            if pairs
            else None
        )
        self.objective = Objective.for_run(
            cfg,
            self.vocab_size,
            self.signal.student_output,
            self.raw_student,
            reference=self.loss_impl == "reference",
            hidden=hidden,
        )
        self.teacher_before = parameter_fingerprint(self.teacher) if self.teacher is not None else None
        self._teacher_ref: dict | None = None

    def _note(self, message: str) -> None:
        if self.is_main:
            print(message)

    def _prepare(self, student):
        """The optimizer, and accelerate's wrapping of the student and of a trained projection;
        returns the projection as the step calls it."""
        trained = self.projection if self.projection is not None and self.projection.trainable else None
        if self.fsdp:  # torch's FSDP2 in place of accelerate's DDP wrapper (sharding.py)
            self.student = self.raw_student = self.trained = shard(
                student.to(self.device), self.accelerator.mixed_precision, self.device
            )
            self.optimizer = make_optimizer(student, self.cfg)
            student.train()
            return None
        optimizer = make_optimizer(student, self.cfg, extra=trained)
        self.student, self.optimizer, *wrapped = self.accelerator.prepare(student, optimizer, *filter(None, [trained]))
        self.student.train()
        # Without accelerate's fp32-output wrapper: the step runs inside accelerator.autocast()
        # itself, and the losses upcast the logits chunk by chunk; the wrapper would upcast the
        # whole (tokens x vocab) output once more.
        raw = self.raw_student = self.accelerator.unwrap_model(self.student, keep_fp32_wrapper=False)
        # What a rollback snapshot covers: the student and the projection trained with it.
        self.trained = raw if trained is None else torch.nn.ModuleDict({"student": raw, "projection": trained})
        return wrapped[0] if wrapped else self.projection

    def _choose_loss_impl(self, models, teacher: torch.nn.Module | None) -> str:
        cfg = self.cfg
        try:
            return choose_loss_impl(
                cfg.loss.impl,
                divergences.get(cfg.distill.divergence),
                cfg.train.batch_size * (cfg.data.block_size - 1),
                self.vocab_size,
                models.student,
                teacher,
                cfg.loss.auto_threshold_mib,
            )
        except ValueError as exc:
            raise LmdistillError(str(exc)) from None

    def _setup_resume(self) -> None:
        """Continue from the newest valid checkpoint (``--resume``), or start the run directory."""
        cfg, run = self.cfg, self.run
        self.start_step, self.micro, self.initial = 0, 0, None
        self.resume_changes: list[str] = []
        # The lock first (the main process takes it): nothing is written or removed without it.
        on_main(self.accelerator, lambda: run.open_for_writing(cfg))
        # The main process picks the checkpoint (hashing every file once); every process loads that one.
        resume_from = on_main(self.accelerator, lambda: resume_point(run.checkpoints)) if cfg.run.resume else None
        self.guard = Guard(cfg.guard)
        self.monitor = HealthMonitor(cfg.health, self.plan.total_steps, self.vocab_size)
        if resume_from is None:
            if self.is_main:
                if cfg.run.resume:  # nothing to resume, or the attempt died before its first checkpoint
                    print(f"note: no checkpoint in '{run.path}' yet: starting the run from step 0")
                    run.trim_metrics(0)
                run.create(cfg)
                self.tokenizer.save_pretrained(run.path / "tokenizer")  # once per run; checkpoints + this = a model
        else:
            # Everything that can refuse the resume comes before the run directory is touched.
            state = restore_training_state(
                resume_from,
                self.raw_student,
                self.optimizer,
                self.world,
                cfg.train.batch_size,
                projection=self.projection,
                strategy=cfg.parallel.strategy,
                verified=True,
                total_steps=self.plan.total_steps,
            )
            self.start_step, self.micro, self.initial = state["step"], state["micro_batches"], state.get("initial_eval")
            try:
                self.guard.load_state_dict(state)
                self.monitor.load_state_dict(state["health"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise CheckpointError(damaged_state_message(resume_from, f"guard or health state: {exc!r}")) from None
            if self.is_main:
                self.resume_changes = run.warn_if_resume_differs(
                    resume_from, cfg, self.teacher_reference(), self.data.layout, processes=self.world
                )
                run.mark()
                atomic_write(run.path / "config.yaml", cfg.to_run_yaml())  # the config this start runs with
                remove_leftovers(run.checkpoints)
                run.trim_metrics(self.start_step, self.plan.total_steps)
                print(
                    f"Resuming {run.path} from {resume_from.name} (step {self.start_step} of {self.plan.total_steps})"
                )
        self.accelerator.wait_for_everyone()
        self.resumed_from = resume_from
        self.last_checkpoint = self.start_step if resume_from is not None else None

    def _setup_logging(self) -> None:
        cfg, models = self.cfg, self.models
        if cfg.run.trackers:
            self.accelerator.init_trackers(cfg.run.name, config=flat_config(cfg))
        self.log = MetricsLog(
            self.run.path, enabled=self.is_main, accelerator=self.accelerator if cfg.run.trackers else None
        )
        self.say = tqdm.write if self.progress and interactive() else print
        # tokens/s of every applied step this process ran, apart for on-policy steps (generation
        # makes them another population: one median over both would describe neither)
        self.rates: dict[bool, list[float]] = {False: [], True: []}
        # The teacher's held-out CE: measured once (a frozen teacher on fixed blocks), or the cache's.
        self.teacher_ce: float | None = (
            self.cache.manifest["teacher_eval"]["teacher_ce_loss"] if self.cache is not None else None
        )
        self.run_info = {
            "status": "running",
            "started_at": _utcnow(),
            "command": "train",
            "teacher": asdict(ModelInfo.of(self.teacher, models.teacher_name)) if self.teacher is not None else None,
            "teacher_cache": (
                {
                    "path": str(self.cache.path),
                    "mode": self.cache.mode,
                    "capture_temperature": self.cache.temperature,
                    "teacher": self.cache.manifest["teacher"].get("source"),
                }
                if self.cache is not None
                else None
            ),
            "student": asdict(ModelInfo.of(self.raw_student, models.student_name)),
            "data": self.data.describe(),
            "plan": {
                **asdict(self.plan),
                "loss_impl": self.loss_impl,
                "processes": self.world,
                "strategy": self.cfg.parallel.strategy,
                "device": str(self.device),
                "mixed_precision": self.accelerator.mixed_precision,
                "vocab_size": self.vocab_size,
            },
        }
        if self.resumed_from is not None:
            self.run_info["resumed_from_step"] = self.start_step
            earlier = self.run.read_json("run.json").get("resumes", []) if self.is_main else []
            self.run_info["resumes"] = [
                *earlier,
                {"from_step": self.start_step, "at": _utcnow(), "changed_config": self.resume_changes},
            ]
        if self.is_main:
            self.run.write_json("run.json", self.run_info)

    # ------------------------------------------------------------------ the run
    def train(self) -> RunResult:
        try:
            with GracefulStop(self._record_abort) as self.stop:
                result = self._run()
        finally:
            if self.is_main:
                self.run.release()
        if self.world > 1:
            # Every process leaves together: one that exits while the main one still saves the
            # student can abort in gloo's teardown ("terminate called without an active exception").
            self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()
        return result

    def _run(self) -> RunResult:
        total, status, step = self.plan.total_steps, "running", self.start_step
        self.bar = None
        try:
            with self._peers_watched(lambda: step):
                if self.initial is None:
                    self.initial = self.evaluate(0, self.temperature_at(0), "eval (before)")
                self.bar = progress_bar(total, self.start_step, self._phase(), self.progress and self.is_main)
                for step in range(self.start_step, total):
                    result = self.train_step(step)
                    self.end_step(result)
                    if result.stats.stop_requested:
                        self._stop_on_signal(step + 1)
                self.bar.close()
                status = "finished"
                return self._finish_run()
        except PeerLost as exc:
            status, self.run_info["exit_reason"] = "failed", str(exc)
            if not self.is_main:  # the main process may be the one that died: then no one else records it
                self.run.record_abandoned(str(exc))
            raise
        except Interrupted as exc:
            status, self.run_info["exit_reason"] = "interrupted", str(exc)
            raise
        except TrainingStopped as exc:
            status, self.run_info["exit_reason"] = "stopped", str(exc)
            raise
        except KeyboardInterrupt:
            status, self.run_info["exit_reason"] = "interrupted", "interrupted by the user (Ctrl-C)"
            raise
        except BaseException as exc:
            status, self.run_info["exit_reason"] = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
            if status != "finished":  # stopped early: leave a readable record of it
                self.run_info["status"] = status
                with contextlib.suppress(OSError):  # e.g. the disk is full: the error in flight says so
                    self._finish(step)

    @contextlib.contextmanager
    def _peers_watched(self, step):
        """A collective that fails because another process of the run died (the launcher may also
        send this one SIGTERM) ends this one with a ``PeerLost`` line, not the backend's traceback.
        ``step()``: the step running now."""
        try:
            yield
        except Exception as exc:
            if self.world == 1 or not lost_peer(exc):
                raise
            rank = self.accelerator.process_index
            who = f"the process of rank {1 - rank}" if self.world == 2 else "another process"
            raise PeerLost(
                f"{who} of this run died (rank {rank} lost its connection to it in step {step() + 1} of "
                f"{self.plan.total_steps}): the run stopped; rerun with --resume to continue from the "
                "newest checkpoint (checkpoints are kept)"
            ) from None

    def _stop_on_signal(self, done: int) -> None:
        """Every rank saw the request in the step's reduction: checkpoint (unless this step wrote
        one), then stop."""
        if self.last_checkpoint != done:
            self.save_checkpoint(done)
        signum = self.stop.signum or signal.SIGTERM  # another rank got it: stop alike
        name = signal.Signals(signum).name
        raise Interrupted(
            f"{name} at step {done} of {self.plan.total_steps}: checkpoint step-{done} written; continue with --resume",
            signum,
        )

    def _record_abort(self, signum: int) -> None:
        """A second signal: the process ends now; only the status is recorded."""
        if self.is_main:
            self.run_info.update(
                status="interrupted",
                exit_reason=f"{signal.Signals(signum).name} twice: stopped at once; resume from the newest checkpoint",
            )
            self.run.write_json("run.json", self.run_info)

    def train_step(self, step: int) -> StepResult:
        t0 = time.perf_counter()
        temperature = self.temperature_at(step)
        lr = self._set_lr(step)
        batches = self.signal.prepare_step(self._next_batches(), step)
        num_tokens = self._count_targets(batches)
        sums = dict.fromkeys(SUMMED_TERMS, torch.zeros((), device=self.device, dtype=torch.float64))
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.student):
                with self.accelerator.autocast():
                    view = self.signal(batch, temperature)
                    parts = self.objective(self.student, batch, view, temperature, num_tokens)
                # DDP averages gradients over ranks; our loss is already a global mean.
                self.accelerator.backward(parts.total * self.world)
            for name, value in _terms(parts, view).items():
                sums[name] = sums[name] + value.double()
        stats = self._reduce(sums, self.clip_gradients(), any(b.generated for b in batches))
        decision = self.guard.decide(stats)
        self._apply(step, decision, stats)
        epoch = self.sampler.epoch_of(self.micro - 1)
        tokens = sum(b.input_ids.numel() for b in batches) * self.world
        seconds = time.perf_counter() - t0
        return StepResult(step, epoch, temperature, lr, stats, decision, tokens / seconds, seconds)

    def temperature_at(self, step: int) -> float:
        d = self.cfg.distill
        return temperature_at(step, self.plan.total_steps, d.temperature, d.min_temperature, d.temperature_schedule)

    def _set_lr(self, step: int) -> float:
        t = self.cfg.train
        lr = lr_at(step, self.plan.total_steps, t.lr, self.plan.warmup_steps, t.lr_schedule, t.min_lr_ratio)
        lr *= self.guard.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _next_batches(self) -> list[Batch]:
        """The step's micro-batches; advances the data cursor (micro-batches consumed)."""
        accum = self.cfg.train.grad_accum
        batches = [self.data.train.batch(self.sampler.indices(self.micro + i)) for i in range(accum)]
        self.micro += accum
        return batches

    def _count_targets(self, batches: list[Batch]) -> float:
        """Valid targets across the step's micro-batches and all ranks: the normaliser of every term."""
        local = float(sum(b.num_targets for b in batches))
        if self.world == 1:
            return local  # counted on the host: no device round trip
        return self.accelerator.reduce(torch.tensor(local, device=self.device), "sum").item()

    def clip_gradients(self) -> torch.Tensor:
        max_norm = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm is not None else math.inf
        norm = self.accelerator.clip_grad_norm_(self.trained.parameters(), max_norm)
        return full_tensor(norm) if self.fsdp else norm  # FSDP2: a DTensor over the shards

    def _reduce(self, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor, on_policy: bool) -> StepStats:
        # One reduction, one sync: every rank sees the same numbers and so decides the same,
        # a stop requested by a signal on any rank included.
        named = {**sums, "grad_norm": grad_norm.detach().double(), "stop_requested": self._stop_flag()}
        reduced = self.accelerator.reduce(torch.stack(list(named.values())), "sum").tolist()
        return StepStats.from_reduced(
            dict(zip(named, reduced)), self.world, with_hidden=self.projection is not None, on_policy=on_policy
        )

    def _stop_flag(self) -> torch.Tensor:
        return torch.tensor(float(self.stop.signum is not None), device=self.device, dtype=torch.float64)

    def _apply(self, step: int, decision: Decision, stats: StepStats) -> None:
        """Carry out the guard's decision; only an applied update changes weights and optimizer state."""
        if decision.cause is Cause.NONFINITE:
            self.announce(step, self.monitor.on_nonfinite(step, decision.term))
        if decision.spike_median is not None:
            action = SPIKE_ACTIONS[self.cfg.guard.spike]
            self.announce(step, self.monitor.on_spike(step, stats.loss, decision.spike_median, action))
        if decision.action is Action.ROLLBACK:
            to_step = self.guard.rollback(self.trained, self.optimizer)
            if to_step is not None:
                scale = self.guard.state.lr_scale
                self.log.write(
                    {
                        "step": step,
                        "event": "rollback",
                        "to_step": to_step,
                        "lr_scale": scale,
                        "message": f"restored the state of step {to_step}; LR x{scale:g}",
                    }
                )
                if self.is_main:
                    self.say(f"[guard] rolled back to the state of step {to_step} (LR scale {scale:g})")
        if decision.applies_update:
            self.optimizer.step()
        elif self.accelerator.scaler is not None:
            # fp16: clip_grad_norm_ already unscaled the gradients; the scaler must close this
            # step (and lower its scale after an overflow) or the next unscale_ fails.
            self.accelerator.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if decision.applies_update:
            self.guard.after_update(step + 1, self.trained, self.optimizer)

    def end_step(self, result: StepResult) -> None:
        """Log the step, then evaluate and checkpoint when due."""
        step, stats = result.step, result.stats
        if not result.decision.applies_update:
            self.log.write({**result.record(), **self.signal.metrics(result.seconds)})
            stop = self.guard.stop_reason(result.decision, kept=self.last_checkpoint is not None)
            if stop is not None:
                raise TrainingStopped(stop)
        else:
            self.rates[stats.on_policy].append(result.tokens_per_s)
            # The loss checks follow one kind of step: on-policy losses are of another scale.
            if stats.on_policy == (self.cfg.distill.on_policy.fraction >= 1.0):
                self.announce(step, self.monitor.on_train_loss(step, stats.loss))
            if step % self.cfg.train.log_every == 0 or step == self.plan.total_steps - 1:
                self.log.write({**result.record(), **self._source_share(), **self.signal.metrics(result.seconds)})
        self.bar.set_description(f"{self._phase()} ep {result.epoch}", refresh=False)
        postfix = {"loss": f"{stats.loss:.3f}", "T": f"{result.temperature:.2f}", "tok/s": f"{result.tokens_per_s:.0f}"}
        if self.cfg.distill.kd_weight == 0:
            del postfix["T"]  # plain LM training: no temperature in play
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        done = step + 1
        if done % self.plan.eval_every == 0 and done < self.plan.total_steps:
            self.evaluate(done, result.temperature, f"eval (step {done})")
        every = self.cfg.checkpoint.every
        if (every and done % every == 0) or done == self.plan.total_steps:
            self.save_checkpoint(done)

    def _phase(self) -> str:
        return "train" if self.cfg.distill.kd_weight == 0 else "distill"

    def _source_share(self) -> dict:
        """A mixture's share of the blocks seen so far, per source (by name); {} for one source."""
        if self.data.weights is None:
            return {}
        seen = self.sampler.seen(self.micro * self.cfg.train.batch_size * self.world)
        total = max(int(seen.sum()), 1)
        return {"source_share": {s.name: int(n) / total for s, n in zip(self.data.sources, seen)}}

    def announce(self, step: int, fired: list[tuple[str, str]]) -> None:
        for check, message in fired:
            if self.is_main:
                self.say(f"[health:{check}] {message}")
            self.log.write({"step": step, "health": check, "message": message})

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self, step: int, temperature: float, desc: str) -> dict:
        d = self.cfg.distill
        shard = self.data.eval.subset(slice(self.accelerator.process_index, None, self.world))
        result = evaluate(
            self.raw_student,
            self._eval_signal(),
            shard,
            vocab_size=self.vocab_size,
            spec=ScoreSpec(temperature, d.divergence, d.divergence_params, d.scale_by_t2),
            batch_size=self.plan.eval_batch_size,
            device=self.device,
            autocast=self.accelerator.autocast,
            reduce=lambda t: self.accelerator.reduce(t.to(self.device), "sum").cpu(),
            teacher_ce=self.teacher_ce,
            desc=desc,
            progress=self.progress and self.is_main,
            forward_calls=math.ceil(math.ceil(len(self.data.eval) / self.world) / self.plan.eval_batch_size)
            if self.fsdp
            else None,
        )
        if "teacher_ce_loss" in result and self.teacher_ce is None:
            self.teacher_ce = result["teacher_ce_loss"]
        if isinstance(self.signal, OnPolicy):  # the student's own text, judged by the teacher: on one process,
            if self.is_main or self.fsdp:  # or on all alike when the models are sharded (their forwards gather)
                result.update(
                    self.signal.judge(self.raw_student, self.teacher, self.data.eval, self.tokenizer, self.vocab_size)
                )
            self.accelerator.wait_for_everyone()  # the others wait here, not inside a collective or at exit
        self.log.write({"step": step, **result})
        self.announce(step, self.monitor.on_eval(step, result["eval_ppl"], result.get("teacher_ppl")))
        return result

    def _eval_signal(self) -> TeacherSignal | None:
        """The teacher as an evaluation meets it: the live model's logits (whatever loss path the
        training takes; a present teacher is scored even at kd_weight 0), or the cache's eval split."""
        if self.teacher is not None:
            return LiveLogits(self.teacher, self.vocab_size)
        return CachedTeacher(self.cache, "eval") if self.cache is not None else None

    def teacher_reference(self) -> dict | None:
        """The teacher by path and content hash (computed once: hashing reads every file)."""
        if self._teacher_ref is None and self.teacher is not None and self.cfg.model.teacher is not None:
            self._teacher_ref = model_reference(self.cfg.model.teacher)
        return self._teacher_ref

    def save_checkpoint(self, done: int) -> None:
        self.last_checkpoint = done
        staged, shard_records = None, None
        if self.fsdp:  # every process writes (and hashes) its shards in the staging directory the main one made
            staged = on_main(self.accelerator, lambda: make_staging_dir(self.run.checkpoints, done))
            try:
                shard_records = save_shards(staged, self.raw_student, self.optimizer, done)
            except BaseException:  # e.g. another process died mid-save: no half-written shards are left
                shutil.rmtree(staged, ignore_errors=True)
                raise

        def complete() -> None:  # the main process: the rest, the manifest, the rename
            trainer_state = {
                "step": done,
                "micro_batches": self.micro,
                "epoch": self.sampler.epoch_of(max(self.micro - 1, 0)),
                "total_steps": self.plan.total_steps,
                "processes": self.world,
                "global_batch": self.cfg.train.batch_size * self.world,
                "initial_eval": self.initial,
                **self.guard.state_dict(),
                "health": self.monitor.state_dict(),
                "teacher": self.teacher_reference(),
                "data": self.data.layout,
                "strategy": self.cfg.parallel.strategy,
            }
            save_checkpoint(
                self.run.checkpoints,
                done,
                model_state=None if self.fsdp else self.raw_student.state_dict(),
                optimizer_state=None if self.fsdp else self.optimizer.state_dict(),
                trainer_state=trainer_state,
                rng_state=capture_rng_state(),
                keep=self.cfg.checkpoint.keep,
                sharded_in=staged,
                shard_records=shard_records,
                extra_files={
                    "config.yaml": self.cfg.to_run_yaml().encode(),
                    "student_config.json": self.raw_student.config.to_json_string().encode(),
                    **projection_file(self.projection),
                },
            )

        on_main(self.accelerator, complete)

    # ------------------------------------------------------------------ the end
    def _finish_run(self) -> RunResult:
        total = self.plan.total_steps
        final = self.evaluate(total, self.temperature_at(total), "eval (final)")
        student = whole_model(self.raw_student, self.is_main) if self.fsdp else self.raw_student
        student_dir = self.run.save_student(student, self.tokenizer) if self.is_main else None
        if self.teacher is not None and parameter_fingerprint(self.teacher) != self.teacher_before:
            raise AssertionError("the teacher's weights changed during training")  # our invariant, not user error
        rate, on_policy_rate = (statistics.median_high(r) if r else None for r in (self.rates[False], self.rates[True]))
        self.run_info.update(
            status="finished",
            initial=_eval_summary(self.initial),
            final={
                **_eval_summary(final),
                "steps": total,
                "skipped_steps": self.guard.state.total_skips,
                "rollbacks": self.guard.state.rollbacks,
                "tokens_per_s": rate,
                **({"on_policy_tokens_per_s": on_policy_rate} if on_policy_rate is not None else {}),
            },
        )
        health = self._finish(total)
        return RunResult(
            run_dir=self.run.path,
            status="finished",
            steps=total,
            initial=self.initial,
            final=final,
            health=health,
            student_dir=student_dir,
        )

    def _finish(self, steps_done: int) -> dict:
        """health.json, run.json and the report: written for finished and stopped runs alike.

        Returns the final health summary (every process computes it; only the main one writes)."""
        self.log.close()
        health = self.monitor.finalize()
        if not self.is_main:
            return health
        self.run.write_json("health.json", health)
        self.run_info.update(
            finished_at=_utcnow(),
            wall_time_s=round(time.perf_counter() - self.started, 2),
            steps_done=steps_done,
            health_verdict=health["verdict"],
        )
        self.run.write_json("run.json", self.run_info)

        try:
            write_report(self.run.path)
        except Exception as exc:  # a report must never turn a good run into a failed one
            print(f"warning: could not write report.md: {type(exc).__name__}: {exc}")
        return health


# ---------------------------------------------------------------------- helpers
def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _eval_summary(result: dict) -> dict:
    keys = ("eval_ce_loss", "eval_ppl", "eval_kd_loss", "eval_kl", "top1_agreement", "teacher_ce_loss", "teacher_ppl")
    return {k: result[k] for k in keys if k in result}


def _terms(parts, view) -> dict[str, torch.Tensor]:
    """What one micro-batch adds to its step's statistics (``SUMMED_TERMS``), by name."""
    zero = parts.total.new_zeros(())
    return {
        "loss": parts.total.detach(),
        "kd": parts.kd,
        "kd_unscaled": parts.kd_unscaled,
        "ce": parts.ce,
        "teacher_nonfinite": view.nonfinite if view is not None else zero,
        "hidden": parts.hidden if parts.hidden is not None else zero,
    }
