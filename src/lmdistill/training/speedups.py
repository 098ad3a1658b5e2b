"""What ``model.compile`` and ``model.liger`` resolve to on the machine a run computes on.

Both default to ``auto``: on where they win, off where they cost. ``torch.compile`` of the
models' layers is on for a CUDA device and off on the CPU, where inductor's first compilation
takes tens of seconds and a distillation step gains little. Liger's kernels are Triton kernels:
``auto`` takes them on CUDA where liger-kernel imports and knows the architecture, and says
nothing where it does not; ``on`` refuses, in one line, what ``auto`` passes over silently.

The strategy (``strategy.py``) applies them where it prepares each model, before its wrapper or
shards see it; the run says what it resolved in one startup line and in run.json's plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmdistill.core.errors import LmdistillError
from lmdistill.models.speedups import apply_liger, compile_layers, liger_problem, liger_version

INSTALL_LIGER = "pip install liger-kernel"


@dataclass
class Speedups:
    """The run's resolved switches, and the models they were applied to (``apply``)."""

    compile: bool
    compile_why: str  # "auto: CUDA", "auto: CPU", or the setting ("model.compile: on")
    liger: str  # the setting: auto, on or off
    liger_version: str | None  # the importable liger-kernel (looked for only where Liger may run)
    models: list[str] = field(default_factory=list)  # the roles offered to ``apply``: student, teacher
    compiled: list[str] = field(default_factory=list)  # those whose layers were compiled
    patched: list[str] = field(default_factory=list)  # those Liger was applied to

    @classmethod
    def resolve(cls, cfg, device: torch.device) -> Speedups:
        """The switches for a run on ``device``; ``model.liger: on`` refused in one line where it
        cannot run (no CUDA device, or liger-kernel not importable)."""
        setting, cuda = cfg.model.compile, device.type == "cuda"
        compile_on = cuda if setting == "auto" else setting == "on"
        why = ("auto: CUDA" if cuda else "auto: CPU") if setting == "auto" else f"model.compile: {setting}"
        liger, version = cfg.model.liger, None
        if liger == "on" and not cuda:
            raise LmdistillError(
                f"model.liger = on needs a CUDA GPU (this run computes on {device.type}): Liger's kernels are "
                "Triton kernels; set model.liger: off (or auto)"
            )
        if liger != "off" and cuda:
            version = liger_version()
            if version is None and liger == "on":
                raise LmdistillError(
                    "model.liger = on needs the liger-kernel package, which is not installed or does not import "
                    f"here; {INSTALL_LIGER}, or set model.liger: off"
                )
        return cls(compile_on, why, liger, version)

    def apply(self, model: torch.nn.Module, role: str) -> torch.nn.Module:
        """Liger's kernels, then the compiled layers, on ``model`` (the teacher or the student), in
        place: its weights and their names do not change. Returns the model."""
        self.models.append(role)
        if self.liger_version is not None:
            problem = liger_problem(model)
            if problem is not None and self.liger == "on":
                raise LmdistillError(f"model.liger = on: {problem} (the {role}); set model.liger: off (or auto)")
            if problem is None:
                apply_liger(model)
                self.patched.append(role)
        if self.compile:
            if compile_layers(model):
                self.compiled.append(role)
            elif not self.compile_why.startswith("auto"):  # on: said so; auto passes such a model over
                raise LmdistillError(
                    f"model.compile = on compiles the decoder layers, and lmdistill finds none in the {role} "
                    f"({type(model).__name__}); set model.compile: off"
                )
        return model

    def line(self) -> str | None:
        """The startup line: what runs compiled or patched, and why; None when nothing does."""
        parts = []
        if self.compiled:
            parts.append(f"torch.compile on{self._only(self.compiled)} ({self.compile_why})")
        if self.patched:
            how = "auto: CUDA" if self.liger == "auto" else "model.liger: on"
            parts.append(f"Liger kernels on{self._only(self.patched)} ({how}, liger-kernel {self.liger_version})")
        return "models: " + "; ".join(parts) if parts else None

    def record(self) -> dict:
        """For run.json's plan: each switch as resolved: on, off, or the one model it is on for."""
        return {"compile": self._resolved(self.compiled), "liger": self._resolved(self.patched)}

    def _only(self, roles: list[str]) -> str:
        return f" for the {roles[0]} only" if len(roles) < len(self.models) else ""

    def _resolved(self, roles: list[str]) -> str:
        return "off" if not roles else "on" if len(roles) == len(self.models) else roles[0]


def check_liger_here(cfg, uses_cpu: bool) -> None:
    """``model.liger: on`` refused before anything loads, on the machine that runs: no CUDA device,
    or no importable liger-kernel."""
    if cfg.model.liger == "on":
        Speedups.resolve(cfg, torch.device("cpu" if uses_cpu else "cuda"))
