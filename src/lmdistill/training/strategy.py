"""How a run spreads its models over its processes, decided once (``parallelize``).

The loop never asks which strategy it runs under: it asks the strategy. ``Replicated`` is one
process or data parallelism through accelerate (DDP: every process holds the whole student
and its gradients are averaged); ``Sharded`` is torch's FSDP2 (``parallel.strategy: fsdp``:
every process holds 1/N of every weight, gradient and AdamW state, and writes its own shards
of a checkpoint). A third (tensor parallelism, say) is one more class with these methods.

Each strategy also applies the models' own speed-ups (``model.compile``, ``model.liger``:
``speedups.py``) where it prepares a model: on the plain model, before accelerate's DDP wrapper
or FSDP's shards are put around it. The layers are compiled in place, so what is saved and
evaluated is the same module, under the same names, compiled or not.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lmdistill.core.parallel import check_fsdp, full_tensor, shard, whole_model
from lmdistill.training.checkpoint import make_staging_dir
from lmdistill.training.devices import on_main
from lmdistill.training.schedules import make_optimizer
from lmdistill.training.sharded import save_shards
from lmdistill.training.speedups import Speedups


@dataclass
class Prepared:
    """The student as a strategy set it up for training.

    ``student``: what the step runs forward and backward through (a DDP wrapper, or the sharded
    model itself); ``raw``: the model underneath, saved and evaluated; ``trained``: what the
    gradients are clipped over and a rollback restores (the student, with a trained hidden-state
    projection beside it); ``project``: the projection as the step calls it."""

    student: torch.nn.Module
    raw: torch.nn.Module
    trained: torch.nn.Module
    optimizer: torch.optim.Optimizer
    project: torch.nn.Module | None


class Replicated:
    """One process, or data parallelism through accelerate: the whole student everywhere."""

    sharded = False

    def __init__(self, accelerator, speedups: Speedups):
        self.accelerator = accelerator
        self.speedups = speedups  # what model.compile and model.liger resolved to here

    def prepare(self, student, cfg, projection) -> Prepared:
        # compiled inside the DDP wrapper, not around it (torch's guidance for DDP)
        self.speedups.apply(student, "student")
        trained = projection if projection is not None and projection.trainable else None
        optimizer = make_optimizer(student, cfg, extra=trained)
        wrapped, optimizer, *rest = self.accelerator.prepare(student, optimizer, *filter(None, [trained]))
        wrapped.train()
        # Without accelerate's fp32-output wrapper: the step runs inside accelerator.autocast()
        # itself, and the losses upcast the logits chunk by chunk; the wrapper would upcast the
        # whole (tokens x vocab) output once more.
        raw = self.accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
        both = raw if trained is None else torch.nn.ModuleDict({"student": raw, "projection": trained})
        return Prepared(wrapped, raw, both, optimizer, rest[0] if rest else projection)

    def place_teacher(self, teacher: torch.nn.Module) -> None:
        teacher.to(self.accelerator.device)
        self.speedups.apply(teacher, "teacher")  # frozen as it was: compiling changes no parameter

    def clip(self, parameters, max_norm: float | None) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(parameters, max_norm if max_norm is not None else math.inf)

    def whole_student(self, raw: torch.nn.Module, is_main: bool) -> torch.nn.Module | None:
        return raw

    def stage_checkpoint(self, checkpoints: Path, raw, optimizer, step: int):
        """(staging directory, shard records) a sharded save writes before the main process
        completes the checkpoint; nothing here: the main process writes the whole state."""
        return None, None

    def whole_state(self, raw, optimizer) -> tuple[dict | None, dict | None]:
        """The model's and the optimizer's state for a checkpoint in one file each."""
        return raw.state_dict(), optimizer.state_dict()

    def eval_forward_calls(self, eval_blocks: int, processes: int, batch_size: int) -> int | None:
        return None  # a process may run fewer evaluation forwards than another

    judges_everywhere = False  # generations are judged on the main process alone


class Sharded(Replicated):
    """torch's FSDP2 in place of accelerate's DDP wrapper (``core/parallel.py``)."""

    sharded = True
    judges_everywhere = True  # the sharded models' forwards gather: every process runs them alike

    def prepare(self, student, cfg, projection) -> Prepared:
        device = self.accelerator.device
        # each layer's forward compiled: FSDP's hooks around the layer run outside the compiled code
        self.speedups.apply(student, "student")
        sharded = shard(student.to(device), self.accelerator.mixed_precision, device)
        optimizer = make_optimizer(student, cfg)
        student.train()
        return Prepared(sharded, sharded, sharded, optimizer, None)

    def place_teacher(self, teacher: torch.nn.Module) -> None:
        super().place_teacher(teacher)
        shard(teacher, self.accelerator.mixed_precision, self.accelerator.device)

    def clip(self, parameters, max_norm: float | None) -> torch.Tensor:
        return full_tensor(super().clip(parameters, max_norm))  # a DTensor over the shards

    def whole_student(self, raw: torch.nn.Module, is_main: bool) -> torch.nn.Module | None:
        return whole_model(raw, is_main)

    def stage_checkpoint(self, checkpoints: Path, raw, optimizer, step: int):
        # every process writes (and hashes) its shards in the staging directory the main one made
        staged = on_main(self.accelerator, lambda: make_staging_dir(checkpoints, step))
        try:
            return staged, save_shards(staged, raw, optimizer, step)
        except BaseException:  # e.g. another process died mid-save: no half-written shards are left
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def whole_state(self, raw, optimizer) -> tuple[dict | None, dict | None]:
        return None, None  # the shards hold them

    def eval_forward_calls(self, eval_blocks: int, processes: int, batch_size: int) -> int | None:
        return math.ceil(math.ceil(eval_blocks / processes) / batch_size)


def parallelize(cfg, accelerator) -> Replicated:
    """The run's strategy (``parallel.strategy``), refused in one line where it cannot run."""
    speedups = Speedups.resolve(cfg, accelerator.device)
    if cfg.parallel.strategy == "fsdp":
        check_fsdp(cfg, accelerator.num_processes)
        return Sharded(accelerator, speedups)
    return Replicated(accelerator, speedups)
