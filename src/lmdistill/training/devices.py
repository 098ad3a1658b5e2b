"""Devices, mixed precision, processes and trackers, through accelerate."""

from __future__ import annotations

import importlib.util
import os

import torch

from lmdistill.config import TRACKERS, Config, fp16_on_cpu_message
from lmdistill.core.errors import ConfigError, LmdistillError


def make_accelerator(cfg: Config):
    """The accelerate ``Accelerator`` for one run: device, autocast dtype, trackers, processes.

    accelerate keeps process-wide singletons, and one process may run several trainings one
    after another (the Python API, the default teacher's pretraining before a distillation,
    the tests), each with its own device and precision. Each run therefore starts from a
    fresh accelerate state; a multi-process launch keeps its process group.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    use_cpu = cfg.run.device == "cpu" or (cfg.run.device == "auto" and not torch.cuda.is_available())
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise LmdistillError("run.device = 'cuda' but no CUDA device is available; use run.device=auto or cpu")
    check_precision(cfg)  # validate() knows only run.device; here the machine is known
    precision = cfg.run.mixed_precision
    if precision == "auto":
        precision = "bf16" if (not use_cpu and torch.cuda.is_bf16_supported()) else "no"
    if AcceleratorState._shared_state:
        single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
        AcceleratorState._reset_state(reset_partial_state=single_process)
        GradientState._reset_state()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision, log_with=cfg.run.trackers or None)
    kind = str(accelerator.distributed_type)
    if "FSDP" in kind or "DEEPSPEED" in kind:
        raise LmdistillError(
            f"{accelerator.distributed_type} is not supported yet: launch with a DDP accelerate "
            "config (docs/distributed.md)"
        )
    return accelerator


def uses_cpu(cfg: Config) -> bool:
    """Whether the run computes on the CPU (run.device cpu, or auto without a CUDA device)."""
    return cfg.run.device == "cpu" or (cfg.run.device == "auto" and not torch.cuda.is_available())


def check_precision(cfg: Config) -> None:
    """fp16 autocast exists only on a GPU: on the CPU accelerate would silently compute in fp32.
    Checked on the machine that runs (a config may be written for another one)."""
    if cfg.run.mixed_precision == "fp16" and uses_cpu(cfg):
        why = "run.device = 'cpu'" if cfg.run.device == "cpu" else "no CUDA device is available"
        raise ConfigError(fp16_on_cpu_message(why))


def check_trackers_installed(cfg: Config) -> None:
    for tracker in cfg.run.trackers:
        if importlib.util.find_spec(TRACKERS[tracker]) is None:
            raise LmdistillError(
                f"run.trackers asks for {tracker!r} but the package '{TRACKERS[tracker]}' is not "
                f"installed; pip install {TRACKERS[tracker]}, or remove it from run.trackers"
            )


def flat_config(cfg: Config) -> dict:
    """section.key -> value with lists and mappings as text: what trackers accept as hyperparameters."""
    return {
        f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
        for section, values in cfg.to_dict().items()
        for key, value in values.items()
    }


def on_main(accelerator, work):
    """``work()`` on the main process; every process returns its result, or raises its error: a
    failure there must not leave the others waiting in the next collective. The main process
    raises the error itself; the others an ``LmdistillError`` with its message (what reaches
    them is text: not every exception can be rebuilt in another process)."""
    from accelerate.utils import broadcast_object_list

    outcome, failure = [None, None], None
    if accelerator.is_main_process:
        try:
            outcome = [work(), None]
        except BaseException as exc:  # (KeyboardInterrupt too: the others must not wait for ever)
            failure = exc
            outcome = [
                None,
                str(exc)
                if isinstance(exc, LmdistillError)
                else f"the main process failed: {type(exc).__name__}: {exc}",
            ]
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise LmdistillError(outcome[1])
    return outcome[0]


# How a collective fails when another process of the run is gone (gloo's TCP transport; torch
# raises them as RuntimeError or its subclass DistBackendError).
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of the run died."""
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _PEER_GONE)
