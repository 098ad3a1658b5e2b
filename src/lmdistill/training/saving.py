"""A run's checkpoint: the weights through its strategy, and the state of the run's parts.

The strategy decides who writes the weights (the main process the whole state, or every process
its shards first); the main process then writes the rest and publishes the checkpoint with
``checkpoint.save_checkpoint``. ``trainer_state`` is what a resume needs of the run's parts, one
entry per part (``{name: part.state_dict()}``): ``run`` (where it is and what it is), the
``data_cursor``, the ``guard`` and the ``health`` monitor.
"""

from __future__ import annotations

from lmdistill.models.lora import adapter_settings
from lmdistill.training.checkpoint import capture_rng_state, projection_file, save_checkpoint
from lmdistill.training.devices import on_main
from lmdistill.training.setup import RunParts


def save_run_checkpoint(parts: RunParts, done: int, micro_batches: int, initial_eval: dict | None) -> None:
    """The checkpoint after ``done`` steps; every process calls it (a collective when sharded)."""
    p = parts
    raw, optimizer = p.prepared.raw, p.prepared.optimizer
    staged, shard_records = p.strategy.stage_checkpoint(p.run.checkpoints, raw, optimizer, done)

    def complete() -> None:  # the main process: the rest, the manifest, the rename
        model_state, optimizer_state = p.strategy.whole_state(raw, optimizer)
        save_checkpoint(
            p.run.checkpoints,
            done,
            model_state=model_state,
            optimizer_state=optimizer_state,
            trainer_state=trainer_state(p, done, micro_batches, initial_eval),
            rng_state=capture_rng_state(),
            keep=p.cfg.checkpoint.keep,
            sharded_in=staged,
            shard_records=shard_records,
            extra_files={
                "config.yaml": p.cfg.to_run_yaml().encode(),
                "student_config.json": raw.config.to_json_string().encode(),
                **projection_file(p.projection),
                **adapter_settings(raw),
            },
        )

    on_main(p.accelerator, complete)


def trainer_state(parts: RunParts, done: int, micro_batches: int, initial_eval: dict | None) -> dict:
    """What a resume needs besides the weights, one entry per part of the run."""
    p, processes = parts, parts.accelerator.num_processes
    run = {
        "step": done,
        "total_steps": p.plan.total_steps,
        "processes": processes,
        "global_batch": p.cfg.train.batch_size * processes,
        "initial_eval": initial_eval,
        "teacher": p.teacher_reference(),
        "data": p.data.layout,
        "strategy": p.cfg.parallel.strategy,
    }
    cursor = {"micro_batches": micro_batches, "epoch": p.sampler.epoch_of(max(micro_batches - 1, 0))}
    return {"run": run, "data_cursor": cursor, "guard": p.guard.state_dict(), "health": p.monitor.state_dict()}
