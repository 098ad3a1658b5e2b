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
evaluation and checkpoints (``end_step``). The trainer is handed its parts, built once by
``setup.build_run``: where the teacher's view comes from is the ``signal`` (teacher/signals.py),
what the loss computes is the ``objective`` (loss/objective.py), and how the models are spread
over processes is the ``strategy`` (strategy.py), which the loop asks and never branches on.
"""

from __future__ import annotations

import contextlib
import signal
import time

import torch
from tqdm.auto import tqdm

from lmdistill.config import Config
from lmdistill.core.batch import Batch
from lmdistill.core.errors import PeerLost, TrainingStopped
from lmdistill.core.progress import interactive, progress_bar
from lmdistill.models.loading import parameter_fingerprint
from lmdistill.models.lora import merged
from lmdistill.report import write_report
from lmdistill.report.card import write_model_card
from lmdistill.report.metrics import MetricsLog
from lmdistill.training.devices import flat_config, lost_peer
from lmdistill.training.evaluate import RunEvaluator, summary_table
from lmdistill.training.faults import FaultInjector
from lmdistill.training.guards import SUMMED_TERMS, Action, Cause, Decision, StepStats
from lmdistill.training.interrupts import GracefulStop, Interrupted
from lmdistill.training.prefetch import Prefetcher
from lmdistill.training.record import RunRecord
from lmdistill.training.results import RunResult, StepResult
from lmdistill.training.saving import save_run_checkpoint
from lmdistill.training.schedules import lr_at, temperature_at
from lmdistill.training.setup import RunParts, build_run

SPIKE_ACTIONS = {"warn": "kept", "skip": "step skipped", "rollback": "rolled back"}


def train(
    cfg: Config, *, teacher=None, student=None, tokenizer=None, progress: bool = True, print_summary: bool = True
) -> RunResult:
    """Run one distillation (or, with kd_weight 0, plain LM training) as ``cfg`` says.

    ``model.teacher`` must name the teacher (``lmdistill.train`` and the CLI fill in the
    embedded default first). ``teacher``, ``student`` and ``tokenizer`` objects, when given,
    are used instead of loading them.
    """
    parts = build_run(cfg, teacher=teacher, student=student, tokenizer=tokenizer, progress=progress)
    trainer = Trainer(parts, progress=progress)
    result = trainer.train()
    if trainer.is_main and print_summary:
        print(summary_table(result))
    return result


class Trainer:
    """Runs the steps of a run whose parts are built (``setup.build_run``)."""

    def __init__(self, parts: RunParts, progress: bool = True):
        self.parts, self.cfg, self.progress = parts, parts.cfg, progress
        p = parts
        self.is_main, self.world = p.accelerator.is_main_process, p.accelerator.num_processes
        self.objective = p.objective  # (as an attribute: fault injection wraps it from outside)
        self.micro, self.initial = p.resumed.micro_batches, p.resumed.initial_eval
        self.last_checkpoint = p.resumed.step if p.resumed.checkpoint is not None else None
        if p.cfg.run.trackers:
            p.accelerator.init_trackers(p.cfg.run.name, config=flat_config(p.cfg))
        tracker = p.accelerator if p.cfg.run.trackers else None
        self.log = MetricsLog(p.run.path, enabled=self.is_main, accelerator=tracker)
        self.say = tqdm.write if progress and interactive() else print
        # tokens/s of every applied step this process ran, apart for on-policy steps (generation
        # makes them another population: one median over both would describe neither)
        self.rates: dict[bool, list[float]] = {False: [], True: []}
        self.evaluator = RunEvaluator(p, progress=progress and self.is_main)
        self.teacher_before = parameter_fingerprint(p.models.teacher) if p.models.teacher is not None else None
        self.record = RunRecord(p, self.is_main)
        self.bar = self.stop = None
        pin = p.accelerator.device.type == "cuda"  # (the step's copies are then asynchronous)
        self.prefetch = Prefetcher(self._batches_at, p.cfg.train.grad_accum, pin)
        faults = FaultInjector(p.cfg.debug, p.accelerator.process_index)
        faults.install(self)
        if faults.active and self.is_main:
            self.say(f"WARNING: fault injection is ON (debug section): {faults.describe()}")

    @property
    def raw_student(self) -> torch.nn.Module:
        return self.parts.prepared.raw

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self.parts.models.teacher

    # ------------------------------------------------------------------ the run
    def train(self) -> RunResult:
        try:
            with GracefulStop(self._record_abort) as self.stop:
                result = self._run()
        finally:
            if self.is_main:
                self.parts.run.release()
        if self.world > 1:
            # Every process leaves together: one that exits while the main one still saves the
            # student can abort in gloo's teardown ("terminate called without an active exception").
            self.parts.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()
        return result

    def _run(self) -> RunResult:
        total, status, step = self.parts.plan.total_steps, "running", self.parts.resumed.step
        try:
            with self._peers_watched(lambda: step):
                if self.initial is None:
                    self.initial = self.evaluate(0, self.temperature_at(0), "eval (before)", ends=True)
                self.bar = progress_bar(total, step, self._phase(), self.progress and self.is_main)
                for step in range(self.parts.resumed.step, total):
                    result = self.train_step(step)
                    self.end_step(result)
                    if result.stats.stop_requested:
                        self._stop_on_signal(step + 1)
                self.bar.close()
                status = "finished"
                return self._finish_run()
        except BaseException as exc:
            status = self.record.ended_by(exc)
            if isinstance(exc, PeerLost) and not self.is_main:  # the main process may be the one that died
                self.parts.run.record_abandoned(str(exc))
            raise
        finally:
            self.prefetch.close()
            if self.bar is not None:
                self.bar.close()
            if status != "finished":  # stopped early: leave a readable record of it
                self.record.info["status"] = status
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
            rank = self.parts.accelerator.process_index
            who = f"the process of rank {1 - rank}" if self.world == 2 else "another process"
            raise PeerLost(
                f"{who} of this run died (rank {rank} lost its connection to it in step {step() + 1} of "
                f"{self.parts.plan.total_steps}): the run stopped; rerun with --resume to continue from the "
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
            f"{name} at step {done} of {self.parts.plan.total_steps}: checkpoint step-{done} written; continue "
            "with --resume",
            signum,
        )

    def _record_abort(self, signum: int) -> None:
        """A second signal: the process ends now; only the status is recorded."""
        name = signal.Signals(signum).name
        self.record.ended("interrupted", f"{name} twice: stopped at once; resume from the newest checkpoint")
        self.record.write()

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> StepResult:
        p, t0 = self.parts, time.perf_counter()
        accelerator, student = p.accelerator, p.prepared.student
        temperature = self.temperature_at(step)
        lr = self._set_lr(step)
        batches = p.signal.prepare_step(self._next_batches(), step)
        num_tokens = self._count_targets(batches)
        sums = dict.fromkeys(SUMMED_TERMS, torch.zeros((), device=accelerator.device, dtype=torch.float64))
        for i, batch in enumerate(batches):
            batch = batch.to(accelerator.device, non_blocking=self.prefetch.pin)
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(student):
                with accelerator.autocast():
                    view = p.signal(batch, temperature)
                    parts = self.objective(student, batch, view, temperature, num_tokens)
                # DDP averages gradients over ranks; our loss is already a global mean.
                accelerator.backward(parts.total * self.world)
            for name, value in _terms(parts, view).items():
                sums[name] = sums[name] + value.double()
        stats = self._reduce(sums, self.clip_gradients(), any(b.generated for b in batches))
        decision = p.guard.decide(stats)
        self._apply(step, decision, stats)
        epoch = p.sampler.epoch_of(self.micro - 1)
        tokens = sum(b.input_ids.numel() for b in batches) * self.world
        seconds = time.perf_counter() - t0
        return StepResult(step, epoch, temperature, lr, stats, decision, tokens / seconds, seconds)

    def temperature_at(self, step: int) -> float:
        d = self.cfg.distill
        total = self.parts.plan.total_steps
        return temperature_at(step, total, d.temperature, d.min_temperature, d.temperature_schedule)

    def _set_lr(self, step: int) -> float:
        t, plan = self.cfg.train, self.parts.plan
        lr = lr_at(step, plan.total_steps, t.lr, plan.warmup_steps, t.lr_schedule, t.min_lr_ratio)
        lr *= self.parts.guard.state.lr_scale
        for group in self.parts.prepared.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _next_batches(self) -> list[Batch]:
        """The step's micro-batches (built while the last step ran); advances the data cursor
        (micro-batches consumed)."""
        batches = self.prefetch.take(self.micro)
        self.micro += self.cfg.train.grad_accum
        return batches

    def _batches_at(self, cursor: int) -> list[Batch]:
        """The micro-batches of the step that starts at data cursor ``cursor``."""
        train, sampler = self.parts.data.train, self.parts.sampler
        return [train.batch(sampler.indices(cursor + i)) for i in range(self.cfg.train.grad_accum)]

    def _count_targets(self, batches: list[Batch]) -> float:
        """Valid targets across the step's micro-batches and all ranks: the normaliser of every term."""
        local = float(sum(b.num_targets for b in batches))
        if self.world == 1:
            return local  # counted on the host: no device round trip
        accelerator = self.parts.accelerator
        return accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").item()

    def clip_gradients(self) -> torch.Tensor:
        return self.parts.strategy.clip(self.parts.prepared.trained.parameters(), self.cfg.train.max_grad_norm)

    def _reduce(self, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor, on_policy: bool) -> StepStats:
        # One reduction, one sync: every rank sees the same numbers and so decides the same,
        # a stop requested by a signal on any rank included.
        accelerator = self.parts.accelerator
        stop = torch.tensor(float(self.stop.signum is not None), device=accelerator.device, dtype=torch.float64)
        named = {**sums, "grad_norm": grad_norm.detach().double(), "stop_requested": stop}
        reduced = accelerator.reduce(torch.stack(list(named.values())), "sum").tolist()
        with_hidden = self.parts.projection is not None
        return StepStats.from_reduced(dict(zip(named, reduced)), self.world, with_hidden, on_policy)

    def _apply(self, step: int, decision: Decision, stats: StepStats) -> None:
        """Carry out the guard's decision; only an applied update changes weights and optimizer state."""
        p = self.parts
        optimizer, trained = p.prepared.optimizer, p.prepared.trained
        if decision.cause is Cause.NONFINITE:
            self.announce(step, p.monitor.on_nonfinite(step, decision.term))
        if decision.spike_median is not None:
            action = SPIKE_ACTIONS[self.cfg.guard.spike]
            self.announce(step, p.monitor.on_spike(step, stats.loss, decision.spike_median, action))
        if decision.action is Action.ROLLBACK:
            self._roll_back(step)
        if decision.applies_update:
            optimizer.step()
        elif p.accelerator.scaler is not None:
            # fp16: clip_grad_norm_ already unscaled the gradients; the scaler must close this
            # step (and lower its scale after an overflow) or the next unscale_ fails.
            p.accelerator.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if decision.applies_update:
            p.guard.after_update(step + 1, trained, optimizer)

    def _roll_back(self, step: int) -> None:
        guard = self.parts.guard
        to_step = guard.rollback(self.parts.prepared.trained, self.parts.prepared.optimizer)
        if to_step is None:
            return
        scale = guard.state.lr_scale
        message = f"restored the state of step {to_step}; LR x{scale:g}"
        self.log.write({"step": step, "event": "rollback", "to_step": to_step, "lr_scale": scale, "message": message})
        if self.is_main:
            self.say(f"[guard] rolled back to the state of step {to_step} (LR scale {scale:g})")

    def end_step(self, result: StepResult) -> None:
        """Log the step, then evaluate and checkpoint when due."""
        p, step, stats = self.parts, result.step, result.stats
        if not result.decision.applies_update:
            self.log.write({**result.record(), **p.signal.metrics(result.seconds)})
            stop = p.guard.stop_reason(result.decision, kept=self.last_checkpoint is not None)
            if stop is not None:
                raise TrainingStopped(stop)
        else:
            self.rates[stats.on_policy].append(result.tokens_per_s)
            # The loss checks follow one kind of step: on-policy losses are of another scale.
            if stats.on_policy == (self.cfg.distill.on_policy.fraction >= 1.0):
                self.announce(step, p.monitor.on_train_loss(step, stats.loss))
            if step % self.cfg.train.log_every == 0 or step == p.plan.total_steps - 1:
                self.log.write({**result.record(), **self._source_share(), **p.signal.metrics(result.seconds)})
        self._show(result)
        done = step + 1
        if done % p.plan.eval_every == 0 and done < p.plan.total_steps:
            self.evaluate(done, result.temperature, f"eval (step {done})")
        every = self.cfg.checkpoint.every
        if (every and done % every == 0) or done == p.plan.total_steps:
            self.save_checkpoint(done)

    def _show(self, result: StepResult) -> None:
        """The progress bar's line for a step."""
        self.bar.set_description(f"{self._phase()} ep {result.epoch}", refresh=False)
        postfix = {"loss": f"{result.stats.loss:.3f}", "T": f"{result.temperature:.2f}"}
        postfix["tok/s"] = f"{result.tokens_per_s:.0f}"
        if self.cfg.distill.kd_weight == 0:
            del postfix["T"]  # plain LM training: no temperature in play
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def _phase(self) -> str:
        return "train" if self.cfg.distill.kd_weight == 0 else "distill"

    def _source_share(self) -> dict:
        """A mixture's share of the blocks seen so far, per source (by name); {} for one source."""
        data = self.parts.data
        if data.weights is None:
            return {}
        seen = self.parts.sampler.seen(self.micro * self.cfg.train.batch_size * self.world)
        total = max(int(seen.sum()), 1)
        return {"source_share": {s.name: int(n) / total for s, n in zip(data.sources, seen)}}

    def announce(self, step: int, fired: list[tuple[str, str]]) -> None:
        for check, message in fired:
            if self.is_main:
                self.say(f"[health:{check}] {message}")
            self.log.write({"step": step, "health": check, "message": message})

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self, step: int, temperature: float, desc: str, ends: bool = False) -> dict:
        result = self.evaluator(temperature, desc, ends=ends)
        self.log.write({"step": step, **result})
        self.announce(step, self.parts.monitor.on_eval(step, result["eval_ppl"], result.get("teacher_ppl")))
        return result

    def save_checkpoint(self, done: int) -> None:
        self.last_checkpoint = done
        save_run_checkpoint(self.parts, done, self.micro, self.initial)

    # ------------------------------------------------------------------ the end
    def _finish_run(self) -> RunResult:
        p, total = self.parts, self.parts.plan.total_steps
        final = self.evaluate(total, self.temperature_at(total), "eval (final)", ends=True)
        student = p.strategy.whole_student(p.prepared.raw, self.is_main)
        # (LoRA: the adapters folded into the weights, in place, on the process that saves)
        student_dir = p.run.save_student(merged(student), p.models.tokenizer) if self.is_main else None
        if self.teacher is not None and parameter_fingerprint(self.teacher) != self.teacher_before:
            raise AssertionError("the teacher's weights changed during training")  # our invariant, not user error
        guard = p.guard.state
        totals = {"steps": total, "skipped_steps": guard.total_skips, "rollbacks": guard.rollbacks}
        self.record.finished(self.initial, final, totals, self.rates)
        health = self._finish(total)
        if student_dir is not None:
            self._card(student_dir)
        return RunResult(p.run.path, "finished", total, self.initial, final, health, student_dir)

    def _card(self, student_dir) -> None:
        """The model card of the final student (after report.md: it shows the loss plot)."""
        try:
            write_model_card(self.parts.run.path, student_dir)
        except Exception as exc:  # like the report, a card must never turn a good run into a failed one
            print(f"warning: could not write the student's model card: {type(exc).__name__}: {exc}")

    def _finish(self, steps_done: int) -> dict:
        """health.json, run.json and the report: written for finished and stopped runs alike.

        Returns the final health summary (every process computes it; only the main one writes)."""
        self.log.close()
        health = self.parts.monitor.finalize()
        if not self.is_main:
            return health
        self.parts.run.write_json("health.json", health)
        self.record.close(steps_done, health["verdict"])
        try:
            write_report(self.parts.run.path)
        except Exception as exc:  # a report must never turn a good run into a failed one
            print(f"warning: could not write report.md: {type(exc).__name__}: {exc}")
        return health


# ---------------------------------------------------------------------- helpers
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
