"""Typed configuration: one dataclass per section, one line of documentation per field.

A config is built from defaults, then a YAML file, then ``--set section.key=value``
overrides and named CLI flags. Each value is type-checked as it is set, by pydantic against
the field's annotation (the value types below: what YAML and ``--set`` give converts where
that is harmless); ranges and consistency are checked once at the end (``_check_*``). Every
problem is a ``ConfigError`` whose message names the key, the value and what is allowed, and
suggests the nearest key for a typo. ``lmdistill config-reference`` prints the table
of all fields from these docstrings (docs/config.md is generated from it).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BeforeValidator, ConfigDict, InstanceOf, StrictBool, TypeAdapter, ValidationError

from lmdistill.core.errors import ConfigError
from lmdistill.loss.divergences import DIVERGENCES, DivergenceParams

# Where a fault can be injected (``debug.inject[].where``, training/faults.py) and what it writes there.
FAULT_SITES = ("teacher_logits", "student_logits", "loss", "grad")
FAULT_VALUES = ("nan", "inf", "-inf")


def _refuse(*kinds: type) -> BeforeValidator:
    """A pydantic validator that lets a value through unless it is one of ``kinds``: what lax mode
    would convert from them hides a mistake (``batch_size: true`` is not 1)."""

    def check(value: Any) -> Any:
        if isinstance(value, kinds):
            raise ValueError(f"a {type(value).__name__} is not taken here")
        return value

    return BeforeValidator(check)


def _yaml_no(value: Any) -> Any:
    return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false


def _yaml_on_off(value: Any) -> Any:
    # YAML 1.1 reads an unquoted `on` as true and `off` as false
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# The types of the config's keys: pydantic's validation in lax mode, so that what YAML and --set
# give converts where that is harmless, narrowed where a conversion would hide a mistake. Their
# error messages are the config's own (_wrong_type); their ranges are the _check_* functions'.
Bool = StrictBool  # true or false; not yes, 1 or 'true'
Int = Annotated[int, _refuse(bool, str, bytes)]  # a whole number, 4.0 too; not true or '8'
Float = Annotated[float, _refuse(bool, bytes)]  # a number, '1e-3' too (YAML 1.1 reads 1e-3 as a string)
Str = Annotated[str, _refuse(bytes)]  # a number as a string too (run.name: 1e5; _ADAPTER_CONFIG)
List = InstanceOf[list]  # a list (not a tuple or a set), kept as given; its entries are _check_*'s to judge
Dict = InstanceOf[dict]  # a mapping, likewise
Precision = Annotated[Literal["auto", "no", "bf16", "fp16"], BeforeValidator(_yaml_no)]
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_on_off)]  # true / false read as on / off


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field carrying its one-line documentation."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass
class RunConfig:
    """Where the run goes and how it is reproduced."""

    output_dir: Str | None = doc("Run directory. Default: runs/<name>-<date>-<time>.", None)
    name: Str = doc("Short run name (a plain name, no '/') used in the default output_dir and the report.", "distill")
    overwrite: Bool = doc("Replace an output_dir that already holds a run.", False)
    resume: Bool = doc("Continue the unfinished run in output_dir from its newest valid checkpoint.", False)
    seed: Int = doc("Seed for Python, NumPy and torch, in [0, 2**32 - 1]; the same seed gives the same run on CPU.", 0)
    device: Literal["auto", "cpu", "cuda"] = doc("auto = CUDA when available, else CPU.", "auto")
    trackers: List = doc(
        "Extra experiment trackers through accelerate, e.g. [wandb] or [mlflow] (installed "
        "separately); TensorBoard and metrics.jsonl are always written.",
        [],
    )
    mixed_precision: Precision = doc(
        "Autocast dtype. auto = bf16 on a GPU that supports it, fp32 ('no') on CPU.", "auto"
    )


@dataclass
class PruneConfig:
    """How a student started from the teacher (model.student_init: teacher) is cut out of it."""

    layers: Literal["importance", "uniform"] = doc(
        "Which teacher layers the student keeps. importance = the layers that change the hidden state most "
        "(block influence, 1 - cosine(layer input, layer output), on calibration blocks); uniform = evenly "
        "spaced, first and last included.",
        "importance",
    )
    width: Literal["importance", "first"] = doc(
        "Which hidden channels, MLP neurons and attention heads the student keeps when it is narrower. "
        "importance = the largest mean activation magnitude on calibration blocks; first = the first ones.",
        "importance",
    )
    calibration_blocks: Int = doc("Training blocks the importances are measured on.", 32)


@dataclass
class LoraConfig:
    """A LoRA student (through peft): the student's weights stay frozen and low-rank adapters on
    its linear layers are trained instead."""

    r: Int = doc("Rank of the adapters; 0 = off (the whole student is trained).", 0)
    alpha: Float | None = doc("Scale of the adapters' update (alpha / r multiplies it); null = 2 x r.", None)
    dropout: Float = doc("Dropout on the adapters' input, in [0, 1).", 0.0)
    target_modules: Str | List = doc(
        "Which linear layers get adapters: all-linear = every one but the output layer, or a list of module "
        "names, e.g. [q_proj, v_proj].",
        "all-linear",
    )
    quantize: Literal["none", "4bit"] = doc(
        "4bit = QLoRA (the frozen weights held in 4 bits); needs a CUDA GPU and bitsandbytes. none = full precision.",
        "none",
    )


@dataclass
class ModelConfig:
    """Teacher and student models."""

    teacher: Str | None = doc(
        "Teacher: local directory or hub id. null = the embedded default teacher, "
        "pretrained once on the embedded corpus and cached.",
        None,
    )
    student: Str | None = doc("Student to start from: local directory or hub id. null = build a fresh one.", None)
    teacher_cache: Str | None = doc(
        "A teacher cache (lmdistill cache-teacher) to distill from instead of running the teacher: no teacher model "
        "runs. A fresh student starts as model.student_init says: cut out of the cached teacher (its weights are "
        "loaded for the cut only, and must be on disk), or random with model.student_init: random.",
        None,
    )
    student_config: Dict = doc(
        "Overrides applied to the teacher's config to build a fresh student "
        "(used when student is null), e.g. {num_hidden_layers: 2, hidden_size: 128}.",
        {},
    )
    student_init: Literal["auto", "teacher", "random"] = doc(
        "Weights of a student built fresh (model.student null): teacher = cut out of the teacher's "
        "(model.prune says how; Llama, Mistral and Qwen2/3 teachers); random = a fresh initialisation; "
        "auto = teacher where the teacher's family allows it, else random.",
        "auto",
    )
    prune: PruneConfig = field(default_factory=PruneConfig, metadata={"doc": "Pruning of a teacher-started student."})
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "dtype the teacher's weights are held in. auto = bfloat16 when the run computes in bf16 (the default on "
        "a GPU), else float32.",
        "auto",
    )
    trust_remote_code: Bool = doc("Allow model code from the hub (only for models you trust).", False)
    compile: Switch = doc(
        "torch.compile of the teacher's and the student's decoder layers in a training run, each layer in place "
        "(checkpoints, exports and adapters keep the plain model's names; generation, with its growing KV cache, runs "
        "them eagerly). "
        "auto = on when the run computes on CUDA, off on the CPU; the first steps pay the compilation.",
        "auto",
    )
    liger: Switch = doc(
        "Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) patched into the teacher and the student of a training "
        "run, not its fused loss (pip install liger-kernel). auto = on with a CUDA GPU where liger-kernel imports "
        "and supports the architecture, else off; on = required (refused without CUDA or the package).",
        "auto",
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "LoRA adapters instead of full training."})


@dataclass
class DataConfig:
    """Text sources, tokenization and packing."""

    path: Str | None = doc(
        "Training text: a .txt/.jsonl/.json/.parquet file, a directory of them, or a datasets name. "
        "null = the embedded corpus (CPython's reference documentation, pydoc_data).",
        None,
    )
    dataset_config: Str | None = doc("Config name for a datasets hub dataset.", None)
    split: Str = doc("Split of a datasets hub dataset.", "train")
    text_field: Str = doc("Field that holds the text in .jsonl/.parquet/datasets records.", "text")
    eval_path: Str | None = doc("Separate held-out file; null = hold out eval_fraction of the blocks.", None)
    eval_fraction: Float = doc("Fraction of packed blocks held out for evaluation when eval_path is null.", 0.05)
    split_seed: Int = doc(
        "Seed of the train/eval split, kept apart from run.seed so that runs with other seeds "
        "(and the default teacher) share one held-out set.",
        0,
    )
    block_size: Int = doc("Tokens per packed training block (documents are joined with EOS).", 128)
    max_eval_blocks: Int | None = doc("Cap on evaluation blocks (null = all).", 64)
    num_proc: Int | None = doc("Processes that tokenize a new data store (null = one per CPU core, up to 8).", None)
    sources: List | None = doc(
        "A weighted mixture instead of data.path: a list of {path: ..., weight: ...} (path null = the embedded "
        "corpus; optional name). Each source's share of the blocks seen follows its weight.",
        None,
    )
    loss_on: Literal["auto", "assistant", "all"] = doc(
        "Which tokens chat and prompt/completion data train on: assistant = the assistant turns (completions) "
        "only, all = every token; auto = assistant for such data, all for plain text.",
        "auto",
    )
    max_tokens: Int | None = doc("Take at most this many tokens of each source (null = all of it).", None)
    streaming: Bool = doc(
        "Read .jsonl/.parquet files and datasets names as a stream (datasets' streaming=True): "
        "nothing is converted or downloaded up front, and with max_tokens only that much is read.",
        False,
    )
    store_dir: Str | None = doc("Where tokenized data stores are kept (null = $LMDISTILL_HOME/stores).", None)


@dataclass
class CacheConfig:
    """The offline teacher cache (lmdistill cache-teacher): what it keeps per position."""

    mode: Literal["sampled", "topk", "dense"] = doc(
        "sampled = S draws from the teacher's distribution (unbiased random-sampled KD); topk = the k largest "
        "and a tail bucket (biased); dense = every logit (small vocabularies).",
        "sampled",
    )
    samples: Int = doc("Draws per position in sampled mode.", 12)
    k: Int = doc("Logits kept per position in topk mode.", 12)
    temperature: Float | None = doc("Capture temperature (null = distill.temperature).", None)
    seed: Int = doc("Seed of the draws (each shard's draws follow from it, so a rerun is byte-identical).", 0)
    shard_blocks: Int = doc("Blocks per shard file.", 64)
    batch_size: Int = doc("Blocks per teacher forward while building.", 8)


@dataclass
class OnPolicyConfig:
    """On-policy distillation: on some steps the student writes continuations of prompts and
    learns on them, scored by the teacher (GKD, on-policy reverse KL)."""

    fraction: Float = doc(
        "Chance that a step is on-policy, drawn per step from run.seed (the same on every "
        "process); 0 = off, 1 = every step.",
        0.0,
    )
    prompt_tokens: Int = doc("Prompt length: the first prompt_tokens tokens of each block.", 32)
    max_new_tokens: Int = doc("Tokens the student writes per prompt (fewer when it ends with EOS).", 64)
    sample_temperature: Float = doc(
        "Sampling temperature of the student's generations (apart from the KD temperature).", 1.0
    )
    top_p: Float = doc("Nucleus sampling: keep the smallest set of tokens with this much probability; 1 = all.", 1.0)
    loss: Literal["full", "sampled_token"] = doc(
        "full = the divergence over the whole vocabulary at every generated position; sampled_token = "
        "log q(x) - log p(x) of the written token as a REINFORCE advantage (needs only the teacher's "
        "log-probability of that token).",
        "full",
    )
    divergence: Literal[DIVERGENCES] = doc("The divergence of on-policy steps with loss full.", "reverse_kl")


@dataclass
class HiddenConfig:
    """Intermediate-layer distillation: student hidden states pulled towards the teacher's."""

    weight: Float = doc("Weight of the hidden-state term added to the loss (0 = off).", 0.0)
    loss: Literal["cosine", "mse", "nmse"] = doc(
        "Per position: cosine = 1 - cosine similarity; mse = mean squared difference over the hidden size; "
        "nmse = mse divided by the teacher's mean square at that position (scale-free: a real model's few huge "
        "activations do not swamp it).",
        "cosine",
    )
    layers: Str | List = doc(
        "Pairs [[student_layer, teacher_layer], ...] of 0-based layers whose outputs are "
        "compared, or auto: a pruned student's layers to their sources, otherwise the "
        "student's layers spread evenly over the teacher's (last to last).",
        "auto",
    )


@dataclass
class DistillConfig:
    """The distillation objective."""

    temperature: Float = doc("KD temperature at step 0.", 2.0)
    min_temperature: Float = doc("KD temperature at the last step (equal to temperature: constant).", 1.5)
    temperature_schedule: Literal["linear", "cosine", "constant"] = doc(
        "How the temperature goes from temperature to min_temperature over the run.", "linear"
    )
    kd_weight: Float = doc("loss = kd_weight * KD + (1 - kd_weight) * CE; in [0, 1].", 0.5)
    scale_by_t2: Bool = doc("Multiply the KD divergence by T^2 (Hinton et al. 2015).", True)
    divergence: Literal[DIVERGENCES] = doc(
        "forward_kl = KL(teacher || student); reverse_kl = KL(student || teacher); jsd = generalised "
        "Jensen-Shannon (jsd_beta); skew_kl, skew_reverse_kl = skewed KLs (skew_alpha); tvd = total variation.",
        "forward_kl",
    )
    jsd_beta: Float = doc("jsd: weight of the teacher in the mixture, in [0, 1] (0 = forward_kl, 1 = reverse_kl).", 0.5)
    skew_alpha: Float = doc("skew_kl / skew_reverse_kl: share of the own distribution in the mixture, in [0, 1).", 0.1)
    cross_tokenizer: Literal["auto", "always", "never"] = doc(
        "A teacher and a student with different tokenizers: auto = distil across them when they differ (with a "
        "note), always = through the cross-tokenizer loss even for one tokenizer, never = refuse different ones.",
        "auto",
    )
    hidden: HiddenConfig = field(
        default_factory=HiddenConfig, metadata={"doc": "Intermediate-layer (hidden-state) distillation."}
    )
    on_policy: OnPolicyConfig = field(
        default_factory=OnPolicyConfig, metadata={"doc": "On-policy distillation on the student's own generations."}
    )

    @property
    def divergence_params(self) -> DivergenceParams:
        """``jsd_beta`` and ``skew_alpha`` as the losses take them (a ValueError out of range)."""
        return DivergenceParams(self.jsd_beta, self.skew_alpha)


@dataclass
class TrainConfig:
    """Optimisation."""

    batch_size: Int = doc("Blocks per micro-batch (per process).", 8)
    grad_accum: Int = doc("Micro-batches per optimizer step.", 1)
    epochs: Int = doc("Passes over the training blocks (ignored when max_steps is set).", 1)
    max_steps: Int | None = doc("Optimizer steps to run; null = epochs x steps per epoch.", None)
    lr: Float = doc("Peak learning rate (AdamW).", 1e-3)
    min_lr_ratio: Float = doc("Cosine schedule ends at lr x min_lr_ratio.", 0.1)
    lr_schedule: Literal["cosine", "constant"] = doc("After warmup: cosine decay or constant.", "cosine")
    warmup_steps: Int | None = doc("Linear LR warmup steps; null = 5% of the run.", None)
    weight_decay: Float = doc("AdamW weight decay (not applied to norms and biases).", 0.01)
    betas: List = doc("AdamW betas.", [0.9, 0.95])
    max_grad_norm: Float | None = doc("Clip the global gradient norm to this; null = no clipping.", 1.0)
    eval_every: Int | None = doc(
        "Evaluate every N optimizer steps, and at the start and end; null = about 10 evaluations over the run.", None
    )
    log_every: Int = doc("Write a training metrics line every N steps.", 1)


@dataclass
class EvalConfig:
    """What the held-out evaluations measure beyond perplexity and agreement with the teacher."""

    generate: Bool = doc(
        "At every evaluation, judge the student's own continuations of held-out prompts with the teacher (the "
        "scores of lmdistill eval --generate); on-policy runs always do, with distill.on_policy's settings.",
        False,
    )
    draft: Bool = doc(
        "At the first and last evaluation, measure the student as a draft model for the teacher: assisted "
        "generation (speculative decoding) on held-out prompts, greedy and sampled: draft tokens accepted per "
        "teacher forward, and the speedup over the teacher alone (lmdistill eval --draft-for).",
        False,
    )
    prompts: Int = doc("Held-out prompts continued for generate and draft.", 16)
    prompt_tokens: Int = doc("Prompt length: the first tokens of each held-out block.", 32)
    max_new_tokens: Int = doc("Tokens written per prompt.", 64)
    repeats: Int = doc("draft: timed passes over the prompts; the median is reported.", 3)


@dataclass
class GuardConfig:
    """What happens when a step goes wrong."""

    enabled: Bool = doc("Check loss terms and gradient norm before every optimizer step.", True)
    max_consecutive_skips: Int = doc("Stop the run (exit code 3) after this many skipped steps in a row.", 5)
    spike: Literal["warn", "skip", "rollback"] = doc(
        "What to do on a loss spike: warn, skip the step, or roll back.", "warn"
    )
    spike_window: Int = doc("Recent steps the spike detector compares against.", 50)
    spike_warmup: Int = doc("Steps before the spike detector starts judging.", 20)
    spike_factor: Float = doc("A spike is a loss above median x spike_factor of the window ...", 1.4)
    spike_mad: Float = doc("... and more than spike_mad median absolute deviations above it ...", 6.0)
    spike_min_increase: Float = doc(
        "... and at least this many nats/token above it: a spike is material, not just unusual for a very flat loss.",
        0.5,
    )
    rollback_keep: Int = doc("Known-good states kept in memory for rollback (one every rollback_interval steps).", 2)
    rollback_interval: Int = doc("Steps between the known-good states kept for rollback.", 10)
    rollback_lr_factor: Float = doc("Multiply the LR by this after each rollback.", 0.5)
    max_rollbacks: Int = doc("Stop the run (exit code 3) at this many rollbacks.", 3)


@dataclass
class HealthConfig:
    """The original report's 'what to monitor' list as live checks."""

    start_loss_max: Float = doc("Fire when the first training loss is above this (the report's 20).", 20.0)
    ppl_max: Float = doc("Fire when eval perplexity is above this after ppl_after_step (the report's 1M).", 1e6)
    ppl_after_step: Int | None = doc(
        "Step after which ppl_max applies; null = 20% of the run (the report's step 5000 of 25000).", None
    )
    plateau_window: Int | None = doc(
        "Steps per window for the 'loss not decreasing' check; null = 10% of the run, at least 10.", None
    )
    plateau_patience: Int = doc("Fire after this many consecutive windows without a lower mean loss.", 3)


@dataclass
class LossConfig:
    """How the loss is computed."""

    impl: Literal["auto", "full", "chunked", "reference"] = doc(
        "full = logits of both models, closed-form gradients; chunked = fused linear+loss over token chunks "
        "(memory-flat); auto = chunked when the logits would be large (or, on the CPU, where chunked is the faster); "
        "reference = full logits through autograd (the slow reference the others are tested against).",
        "auto",
    )
    chunk_size: Int = doc("Tokens per chunk for impl=chunked.", 1024)
    auto_threshold_mib: Float = doc(
        "impl=auto switches to chunked above this size of one micro-batch's fp32 logits (both models): "
        "memory, on any device.",
        1024.0,
    )
    auto_cpu_threshold_mib: Float = doc(
        "On the CPU, with a live teacher of the student's tokenizer, impl=auto switches to chunked already above "
        "this size, where chunked was measured the faster (docs/performance.md).",
        96.0,
    )


@dataclass
class CheckpointConfig:
    """Resumable training state."""

    every: Int | None = doc("Save a checkpoint every N optimizer steps (and at the end); null = only at the end.", None)
    keep: Int = doc("Newest checkpoints kept.", 3)


@dataclass
class ParallelConfig:
    """How several processes share the work (torchrun --nproc_per_node N)."""

    strategy: Literal["ddp", "fsdp"] = doc(
        "ddp = every process holds the whole student (gradients all-reduced); fsdp = torch's FSDP2: each "
        "process holds 1/N of the student's weights, gradients and AdamW state, and of the teacher's weights "
        "(multi-process launches only).",
        "ddp",
    )


@dataclass
class DebugConfig:
    """Fault injection for tests and drills. Off by default; announced loudly when on."""

    inject: List = doc("Faults: [{step: 7, where: teacher_logits|student_logits|loss|grad, value: nan|inf}].", [])
    loss_multiplier: Dict = doc("Fake spikes: {step: factor} multiplies the loss at that step.", {})
    exit_after_step: Int | None = doc(
        "Kill drill: end the process abruptly (exit code 137, no clean-up) right after "
        "step N and its checkpoint, as a SIGKILL would.",
        None,
    )
    exit_rank: Int | None = doc(
        "Test hook for a dead peer: with exit_after_step, only the process of this rank "
        "ends (at once, not waiting for the others); null = every process.",
        None,
    )


@dataclass
class Config:
    """A whole lmdistill run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None) -> Config:
        cfg = cls()
        for key, value in (data or {}).items():
            cfg.set(key, value)
        return cfg

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
    ) -> Config:
        """Defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as
        YAML), then ``values`` (already typed, e.g. paths from named flags, set verbatim); validated."""
        if overrides is not None and not isinstance(overrides, (list, tuple)):
            raise ConfigError(
                f"overrides must be a list of 'key=value' strings, e.g. ['train.max_steps=3'], got "
                f"{type(overrides).__name__} {overrides!r}"
            )
        data: dict = {}
        if path is not None:
            data = load_yaml(path)
        cfg = cls.from_dict(data)
        for item in overrides or []:
            cfg.apply_override(item)
        for key, value in (values or {}).items():
            cfg.set(key, value)
        cfg.validate()
        return cfg

    def apply_override(self, item: str) -> None:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. distill.temperature=3.0), got {item!r}")
        try:
            value = parse_yaml(raw, f"--set {key.strip()}") if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        self.set(key.strip(), value)

    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` (or ``section.subsection.key``, or a whole (sub)section from a
        mapping) with type checks."""
        parts = dotted.split(".")
        owner: Any = self
        for depth, name in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(owner)}
            if name not in fields:
                if depth == 0:
                    raise ConfigError(_unknown_key_message(name, list(fields), "section"))
                raise ConfigError(_unknown_key_message(dotted, [k for k, _ in leaf_fields(self)], "key"))
            hint = typing.get_type_hints(type(owner))[name]
            last = depth == len(parts) - 1
            if dataclasses.is_dataclass(hint):
                if not last:
                    owner = getattr(owner, name)
                    continue
                if value is None:  # a section whose keys are all commented out
                    return
                if not isinstance(value, dict):
                    where = ".".join(parts)
                    raise ConfigError(
                        f"config section '{where}' must be a mapping of keys, got {type(value).__name__}; "
                        f"write e.g. '{parts[-1]}:\\n  key: value'"
                    )
                for key, sub in value.items():
                    self.set(f"{dotted}.{key}", sub)
                return
            if not last:
                raise ConfigError(_unknown_key_message(dotted, [k for k, _ in leaf_fields(self)], "key"))
            setattr(owner, name, _validated(dotted, value, type(owner), name))

    # ---- validation ---------------------------------------------------------------
    def validate(self) -> Config:
        """Every check that needs only the config: one ConfigError naming the key and what is allowed."""
        _check_objective(self)
        _check_numbers(self)
        _check_run(self)
        _validate_injections(self.debug)
        return self

    # ---- output -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_run_yaml(self) -> str:
        """The config as saved in a run directory: without the one-off run.overwrite / run.resume
        switches, so that resuming from it neither deletes the run nor contradicts itself."""
        data = self.to_dict()
        data["run"]["overwrite"] = data["run"]["resume"] = False
        return yaml.safe_dump(data, sort_keys=False)


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


def _check_objective(cfg: Config) -> None:
    """The distillation objective and the student's start."""
    d = cfg.distill
    if not (d.temperature > 0 and math.isfinite(d.temperature)):
        raise _bad("distill.temperature", d.temperature, "the KD temperature must be a finite number > 0 (default 2.0)")
    if not (d.min_temperature > 0 and math.isfinite(d.min_temperature)):
        raise _bad("distill.min_temperature", d.min_temperature, "must be a finite number > 0 (default 1.5)")
    if d.min_temperature > d.temperature:
        raise ConfigError(
            f"distill.min_temperature = {d.min_temperature} is above distill.temperature = {d.temperature}: "
            "the temperature anneals downwards; set min_temperature <= temperature "
            "(equal values give a constant temperature)"
        )
    if not 0.0 <= d.kd_weight <= 1.0:
        raise _bad("distill.kd_weight", d.kd_weight, "must be in [0, 1] (0 = plain LM training, 1 = pure KD)")
    try:
        _ = d.divergence_params  # built to check their ranges, which the divergences define
    except ValueError as exc:
        raise ConfigError(f"distill.{exc}") from None
    if not (d.hidden.weight >= 0 and math.isfinite(d.hidden.weight)):
        raise _bad("distill.hidden.weight", d.hidden.weight, "must be a finite number >= 0 (0 = no hidden-state term)")
    if not (d.hidden.layers == "auto" or isinstance(d.hidden.layers, list)):
        raise _bad(
            "distill.hidden.layers",
            d.hidden.layers,
            "use auto or a list of [student_layer, teacher_layer] pairs, e.g. [[0, 1], [1, 3]]",
        )
    if cfg.model.student_init == "teacher" and cfg.model.student is not None:
        raise ConfigError(
            "model.student_init = 'teacher' builds the student out of the teacher, but model.student "
            "names one to load; unset model.student or use model.student_init: random"
        )
    if cfg.model.prune.calibration_blocks < 1:
        raise _bad("model.prune.calibration_blocks", cfg.model.prune.calibration_blocks, "must be a whole number >= 1")
    _check_on_policy(cfg)
    _check_lora(cfg)
    _check_eval(cfg)
    if d.cross_tokenizer == "always" and (problem := cross_tokenizer_conflict(cfg)):
        raise ConfigError(f"distill.cross_tokenizer = always: {problem}")


def cross_tokenizer_conflict(cfg: Config) -> str | None:
    """What in ``cfg`` cross-tokenizer distillation cannot do yet, with the fix; None if nothing."""
    d = cfg.distill
    checks = (
        (
            d.divergence != "forward_kl",
            f"its loss is forward KL, not distill.divergence = {d.divergence}; set distill.divergence: forward_kl",
        ),
        (
            d.on_policy.fraction > 0,
            "on-policy steps score the student's tokens with the teacher; set distill.on_policy.fraction: 0",
        ),
        (d.hidden.weight > 0, "the hidden-state term pairs positions one to one; set distill.hidden.weight: 0"),
        (
            cfg.model.teacher_cache is not None,
            "with model.teacher_cache the cache decides (lmdistill cache-teacher --student builds one across "
            "tokenizers); leave distill.cross_tokenizer at auto",
        ),
        (bool(cfg.data.sources), "it reads one source; use data.path instead of data.sources"),
        (cfg.parallel.strategy == "fsdp", "it runs the teacher whole in every process; use parallel.strategy: ddp"),
        (
            cfg.eval.generate or cfg.eval.draft,
            "eval.generate and eval.draft score the student's tokens with the teacher; turn them off",
        ),
    )
    return next((fix for broken, fix in checks if broken), None)


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    for key in ("prompts", "prompt_tokens", "max_new_tokens", "repeats"):
        if getattr(e, key) < 1:
            raise _bad(f"eval.{key}", getattr(e, key), "must be a whole number >= 1")
    if e.prompt_tokens >= cfg.data.block_size and (e.generate or e.draft):
        raise ConfigError(
            f"eval.prompt_tokens = {e.prompt_tokens} must be shorter than a block (data.block_size = "
            f"{cfg.data.block_size}): the prompts are each held-out block's first tokens"
        )
    wanted = [k for k in ("generate", "draft") if getattr(e, k)]
    if wanted and cfg.model.teacher_cache is not None:
        raise ConfigError(
            f"eval.{wanted[0]} needs the teacher model itself, and model.teacher_cache runs none; measure the "
            "trained student afterwards with lmdistill eval RUN --teacher T --generate (or --draft-for T)"
        )
    if e.draft and cfg.parallel.strategy == "fsdp":
        raise ConfigError(
            "eval.draft times the teacher's generation in one process, and parallel.strategy = fsdp shards it "
            "over all of them; measure the trained student afterwards with lmdistill eval RUN --draft-for T"
        )


def _check_lora(cfg: Config) -> None:
    lora = cfg.model.lora
    if lora.r < 0:
        raise _bad("model.lora.r", lora.r, "must be a whole number >= 0 (0 = no LoRA, e.g. 16)")
    if lora.r == 0:
        defaults = LoraConfig()
        changed = [
            f.name
            for f in dataclasses.fields(lora)
            if f.name != "r" and getattr(lora, f.name) != getattr(defaults, f.name)
        ]
        if changed:
            raise ConfigError(
                f"model.lora.{changed[0]} is set, but model.lora.r is 0 (no LoRA: the whole student trains); "
                "set model.lora.r (e.g. 16) to train adapters"
            )
        return
    if lora.alpha is not None and not (lora.alpha > 0 and math.isfinite(lora.alpha)):
        raise _bad("model.lora.alpha", lora.alpha, "must be a finite number > 0, or null for 2 x r")
    if not 0.0 <= lora.dropout < 1.0:
        raise _bad("model.lora.dropout", lora.dropout, "must be in [0, 1)")
    targets = lora.target_modules
    if targets != "all-linear" and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    ):
        raise _bad(
            "model.lora.target_modules", targets, "use all-linear or a list of module names, e.g. [q_proj, v_proj]"
        )
    if cfg.parallel.strategy == "fsdp":
        raise ConfigError(
            "model.lora with parallel.strategy = fsdp is not supported: a LoRA student trains a few "
            "million weights, which DDP replicates cheaply; use parallel.strategy: ddp"
        )
    if lora.quantize == "4bit":
        raise ConfigError(
            "model.lora.quantize = 4bit (QLoRA) holds the frozen weights in 4 bits through bitsandbytes, which "
            "needs a CUDA GPU and which lmdistill does not drive yet; train the adapters in full precision "
            "(model.lora.quantize: none)"
        )


def _check_on_policy(cfg: Config) -> None:
    o = cfg.distill.on_policy
    if not 0.0 <= o.fraction <= 1.0:
        raise _bad("distill.on_policy.fraction", o.fraction, "must be in [0, 1] (0 = off, 1 = every step)")
    if o.fraction == 0:
        return
    for key, value in (("prompt_tokens", o.prompt_tokens), ("max_new_tokens", o.max_new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise _bad(f"distill.on_policy.{key}", value, "must be a whole number >= 1")
    if o.prompt_tokens >= cfg.data.block_size:
        raise _bad(
            "distill.on_policy.prompt_tokens",
            o.prompt_tokens,
            f"must be shorter than a block (data.block_size {cfg.data.block_size})",
        )
    if not o.sample_temperature > 0:
        raise _bad("distill.on_policy.sample_temperature", o.sample_temperature, "must be > 0")
    if not 0.0 < o.top_p <= 1.0:
        raise _bad("distill.on_policy.top_p", o.top_p, "must be in (0, 1] (1 = no nucleus cut)")
    if o.loss == "sampled_token" and (o.sample_temperature != 1.0 or o.top_p != 1.0):
        raise ConfigError(
            "distill.on_policy.loss = sampled_token estimates the reverse-KL gradient from tokens drawn "
            "from the student's own distribution: set distill.on_policy.sample_temperature=1 and "
            "top_p=1, or use loss full"
        )
    if o.loss == "sampled_token" and cfg.distill.hidden.weight > 0:
        raise ConfigError(
            "distill.on_policy.loss = sampled_token has no hidden-state term on its steps: set "
            "distill.hidden.weight=0 or use distill.on_policy.loss=full"
        )
    if cfg.model.teacher_cache is not None:
        raise ConfigError(
            "distill.on_policy needs a live teacher to score what the student writes; a teacher cache "
            "only holds the teacher's view of the training text: set distill.on_policy.fraction=0 "
            "or train with --teacher"
        )
    if cfg.distill.kd_weight == 0:
        raise ConfigError(
            "distill.on_policy trains the student on the teacher's scores of its own text, and "
            "distill.kd_weight is 0 (no teacher): set distill.kd_weight > 0 or "
            "distill.on_policy.fraction=0"
        )


def _check_counts(cfg: Config) -> None:
    """Sizes, steps and counts: whole numbers >= 1 (null where null means a default)."""
    t = cfg.train
    positive_ints = {
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.epochs": t.epochs,
        "train.log_every": t.log_every,
        "data.block_size": cfg.data.block_size,
        "loss.chunk_size": cfg.loss.chunk_size,
        "checkpoint.keep": cfg.checkpoint.keep,
        "guard.max_consecutive_skips": cfg.guard.max_consecutive_skips,
        "guard.spike_window": cfg.guard.spike_window,
        "guard.rollback_keep": cfg.guard.rollback_keep,
        "guard.rollback_interval": cfg.guard.rollback_interval,
        "guard.max_rollbacks": cfg.guard.max_rollbacks,
        "health.plateau_patience": cfg.health.plateau_patience,
        "cache.samples": cfg.cache.samples,
        "cache.k": cfg.cache.k,
        "cache.shard_blocks": cfg.cache.shard_blocks,
        "cache.batch_size": cfg.cache.batch_size,
    }
    if cfg.cache.samples > 255:
        raise _bad("cache.samples", cfg.cache.samples, "must be at most 255 (counts are stored in one byte)")
    optional_positive = {
        "train.max_steps": t.max_steps,
        "train.eval_every": t.eval_every,
        "checkpoint.every": cfg.checkpoint.every,
        "data.max_eval_blocks": cfg.data.max_eval_blocks,
        "health.plateau_window": cfg.health.plateau_window,
        "data.num_proc": cfg.data.num_proc,
        "data.max_tokens": cfg.data.max_tokens,
        "debug.exit_after_step": cfg.debug.exit_after_step,
    }
    if cfg.data.block_size < 2:
        raise _bad(
            "data.block_size",
            cfg.data.block_size,
            "must be a whole number >= 2 (a block needs a token and its successor)",
        )
    for key, value in {**positive_ints, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
        if value < 1:
            raise _bad(key, value, "must be a whole number >= 1")


def _check_numbers(cfg: Config) -> None:
    """Counts, rates and thresholds: in range and finite."""
    _check_counts(cfg)
    t = cfg.train
    if cfg.cache.temperature is not None and not 0 < cfg.cache.temperature <= MAX_TEMPERATURE:
        raise _bad(
            "cache.temperature",
            cfg.cache.temperature,
            f"must be in (0, {MAX_TEMPERATURE:g}], or null for distill.temperature",
        )
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise _bad("train.lr", t.lr, "the learning rate must be a finite number > 0")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise _bad("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        raise _bad("train.warmup_steps", t.warmup_steps, "must be >= 0")
    if t.max_grad_norm is not None and not t.max_grad_norm > 0:
        raise _bad("train.max_grad_norm", t.max_grad_norm, "must be > 0, or null for no clipping")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
        raise _bad("train.betas", t.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    _check_sources(cfg.data)
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise _bad("data.eval_fraction", cfg.data.eval_fraction, "must be between 0 and 1 (exclusive)")
    if not cfg.guard.spike_min_increase >= 0:
        raise _bad("guard.spike_min_increase", cfg.guard.spike_min_increase, "must be a number of nats >= 0")
    if cfg.guard.spike_factor <= 1.0:
        raise _bad("guard.spike_factor", cfg.guard.spike_factor, "must be > 1 (a spike is a loss above the median)")
    if not 0.0 < cfg.guard.rollback_lr_factor <= 1.0:
        raise _bad("guard.rollback_lr_factor", cfg.guard.rollback_lr_factor, "must be in (0, 1]")
    for key, value in _float_values(cfg):
        if value is not None and not math.isfinite(value):
            raise _bad(key, value, "must be a finite number (not NaN or infinity)")
    for key in ("distill.temperature", "distill.min_temperature"):
        if _get(cfg, key) > MAX_TEMPERATURE:
            raise _bad(
                key,
                _get(cfg, key),
                f"the KD temperature must be at most {MAX_TEMPERATURE:g}: the loss is "
                "scaled by T^2 and the logits are divided by T, and both must stay finite in fp32",
            )
    for key in ("run.seed", "data.split_seed", "cache.seed"):
        if not 0 <= _get(cfg, key) <= MAX_SEED:
            raise _bad(key, _get(cfg, key), "a seed must be a whole number in [0, 2**32 - 1]")
    non_negative = {
        "train.weight_decay": t.weight_decay,
        "guard.spike_mad": cfg.guard.spike_mad,
        "guard.spike_warmup": cfg.guard.spike_warmup,
        "health.ppl_after_step": cfg.health.ppl_after_step,
    }
    for key, value in non_negative.items():
        if value is not None and value < 0:
            raise _bad(key, value, "must be >= 0")
    for key in ("health.ppl_max", "loss.auto_threshold_mib", "loss.auto_cpu_threshold_mib"):
        if not _get(cfg, key) > 0:
            raise _bad(key, _get(cfg, key), "must be a number > 0")


def _check_sources(data: DataConfig) -> None:
    """A mixture: a non-empty list of {path, weight[, name]} with finite weights > 0, names unique."""
    if data.sources is None:
        return
    if data.path is not None:
        raise ConfigError(
            "data.path and data.sources are both set; give one source in data.path or a mixture in data.sources"
        )
    if not isinstance(data.sources, list) or not data.sources:
        raise _bad("data.sources", data.sources, "must be a non-empty list of {path: ..., weight: ...}")
    names = []
    for i, entry in enumerate(data.sources):
        where = f"data.sources[{i}]"
        if not isinstance(entry, dict) or "path" not in entry:
            raise _bad(
                where,
                entry,
                "must be a mapping with a path (null = the embedded corpus) and a weight, "
                "e.g. {path: data/chat.jsonl, weight: 2}",
            )
        unknown = sorted(set(entry) - {"path", "weight", "name"})
        if unknown:
            raise _bad(where, entry, f"has unknown key(s) {', '.join(unknown)}; allowed: path, weight, name")
        path, weight = entry["path"], entry.get("weight", 1.0)
        if path is not None and (not isinstance(path, str) or not path.strip()):
            raise _bad(f"{where}.path", path, "must be a file, a directory or a datasets name (null = embedded)")
        try:  # a number as any float key takes it ('1e-9' included)
            weight = _adapter(Float).validate_python(weight)
        except ValidationError:
            raise _bad(f"{where}.weight", weight, "a mixture weight must be a finite number > 0") from None
        if not (math.isfinite(weight) and weight > 0):
            raise _bad(f"{where}.weight", weight, "a mixture weight must be a finite number > 0")
        if "weight" in entry:
            entry["weight"] = weight
        names.append(str(entry.get("name") or path or "embedded"))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _bad("data.sources", duplicates[0], "two sources have this name; give each a distinct name")


def source_names(data: DataConfig) -> list[str]:
    """The display names of a mixture's sources (data.sources[i].name, else its path)."""
    return [str(e.get("name") or e["path"] or "embedded") for e in data.sources or []]


def _check_run(cfg: Config) -> None:
    """Names, devices and the run's switches."""
    name = cfg.run.name
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise _bad(
            "run.name",
            name,
            "give a plain name (no '/' or '\\', not '.' or '..'); to choose where "
            "the run goes, set run.output_dir (--output-dir) to a path",
        )
    if cfg.run.mixed_precision == "fp16" and cfg.run.device == "cpu":  # without CUDA: devices.check_precision
        raise ConfigError(fp16_on_cpu_message("run.device = 'cpu'"))
    if cfg.model.liger == "on" and cfg.run.device == "cpu":  # without CUDA: training/speedups.py
        raise ConfigError(
            "model.liger = on needs a CUDA GPU (run.device = 'cpu'): Liger's kernels are Triton kernels; set "
            "model.liger: off (or auto)"
        )
    if cfg.run.resume and cfg.run.overwrite:
        raise ConfigError(
            "run.resume and run.overwrite contradict each other: resume continues the run in "
            "output_dir, overwrite deletes it; choose one"
        )
    if cfg.run.resume and not cfg.run.output_dir:
        raise ConfigError("run.resume needs run.output_dir: the run directory to continue (--output-dir)")
    for tracker in cfg.run.trackers:
        if not isinstance(tracker, str):
            raise ConfigError(
                f"run.trackers entry {tracker!r} is not a tracker name; give a list of names, e.g. run.trackers=[wandb]"
            )
        if tracker not in TRACKERS:
            raise ConfigError(f"run.trackers entry {tracker!r} is not supported; choose from {', '.join(TRACKERS)}")


def fp16_on_cpu_message(why: str) -> str:
    return f"run.mixed_precision = fp16 needs a CUDA GPU ({why}); on the CPU use bf16 or no"


MAX_TEMPERATURE = 1000.0
MAX_SEED = 2**32 - 1  # what NumPy's seed (and so accelerate's set_seed) accepts


def _float_values(cfg: Config) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every float-typed key (``float`` or ``float | None``)."""
    out = []
    for dotted, _field in leaf_fields(cfg):
        owner_path, _, name = dotted.rpartition(".")
        owner = _get(cfg, owner_path)
        hint = typing.get_type_hints(type(owner))[name]
        if hint is float or (get_origin(hint) in (typing.Union, types.UnionType) and float in get_args(hint)):
            out.append((dotted, getattr(owner, name)))
    return out


# Tracker name -> the package that provides it (accelerate's integrations).
TRACKERS = {
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def _validate_injections(dbg: DebugConfig) -> None:
    for i, item in enumerate(dbg.inject):
        if not isinstance(item, dict) or set(item) - {"step", "where", "value", "rank"}:
            raise ConfigError(
                f"debug.inject[{i}] = {item!r} is not allowed: each entry is "
                "{step: N, where: teacher_logits|student_logits|loss|grad, value: nan|inf}"
            )
        if not isinstance(item.get("step"), int) or item["step"] < 0:
            raise ConfigError(f"debug.inject[{i}].step = {item.get('step')!r} must be a step number >= 0")
        if item.get("where") not in FAULT_SITES:
            raise ConfigError(
                f"debug.inject[{i}].where = {item.get('where')!r} must be one of {', '.join(FAULT_SITES)}"
            )
        if str(item.get("value", "nan")).lower() not in FAULT_VALUES:
            raise ConfigError(f"debug.inject[{i}].value = {item.get('value')!r} must be nan, inf or -inf")
    if dbg.exit_rank is not None and dbg.exit_rank < 0:
        raise _bad("debug.exit_rank", dbg.exit_rank, "must be a process rank >= 0, or null for every process")
    for step, factor in dbg.loss_multiplier.items():
        if not isinstance(step, int) or not isinstance(factor, (int, float)):
            raise ConfigError(
                f"debug.loss_multiplier entry {step!r}: {factor!r} must be step: factor, e.g. {{30: 4.0}}"
            )


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _TooLarge(Exception):
    """YAML nested too deep, or expanding through aliases to too many values."""


MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 100_000  # values after aliases are expanded: a config holds a few hundred


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: a repeated key, or a repeated section, would drop settings without a word), and
    bounds what a config may be: nested at most MAX_YAML_DEPTH levels (deeper ones end in a
    RecursionError), at most MAX_YAML_VALUES values once every alias is expanded (an alias bomb,
    nine levels of nine ``*a``, is a few hundred bytes and 9**9 values). Numbers in exponent
    notation without a dot (``1e-9``, which YAML 1.1 reads as a string) are numbers, as in YAML 1.2."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._values: dict[int, int] = {}  # id(node) -> how many values it expands to
        self._open: set = set()  # the anchors of the nodes being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and event.anchor in self._open:
            # a node holding an alias of itself (&c {x: *c}) would be a value containing itself
            raise _TooLarge(f"holds the alias *{event.anchor} inside the value it names (a recursive alias)")
        anchor = None if isinstance(event, yaml.AliasEvent) else event.anchor
        self._depth += 1
        self._open.add(anchor)
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooLarge(f"is nested more than {MAX_YAML_DEPTH} levels deep")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)
        if id(node) not in self._values:  # (an alias is the node it names: counted again where it is used)
            children = (
                node.value
                if isinstance(node, yaml.SequenceNode)
                else [part for pair in node.value for part in pair]
                if isinstance(node, yaml.MappingNode)
                else []
            )
            self._values[id(node)] = 1 + sum(self._values[id(child)] for child in children)
        if self._values[id(node)] > MAX_YAML_VALUES:
            raise _TooLarge(f"expands to more than {MAX_YAML_VALUES:,} values through its aliases (*name)")
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` and a key overriding what it merges in are not duplicates
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if duplicate:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats with an exponent and no dot (1e-9, 5E+3), which YAML 1.1 leaves as strings
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """``text`` read as YAML by the one loader of config values (files and ``--set``); ConfigError
    naming ``where`` for a duplicate key or a document too deep or too large. Syntax errors are
    the caller's (``yaml.YAMLError``)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{where}: duplicate key {exc.key!r} at line {exc.line}; keep one") from None
    except _TooLarge as exc:
        raise ConfigError(f"{where} {exc}; write the values out plainly (a config needs neither)") from None


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory; pass the path of a YAML file (see configs/)")
    if p.exists() and not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a regular file; pass the path of a YAML file (see configs/)")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML file (see configs/)")
    try:
        data = parse_yaml(p.read_text(encoding="utf-8"), f"config file {str(p)!r}")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (run:, model:, ...)")
    return data


def _unknown_key_message(key: str, candidates: list[str], what: str) -> str:
    leaf = key.split(".")[-1]
    tail = key.partition(".")[2]
    by_leaf = {c.split(".")[-1]: c for c in reversed(candidates)}
    same_tail = [c for c in candidates if tail and c.endswith("." + tail)]
    if same_tail:  # a right key in the wrong section: the shallowest of the sections that have it
        close = [min(same_tail, key=lambda c: c.count("."))]
    elif leaf in by_leaf:  # a right key name in the wrong section (or without one)
        close = [by_leaf[leaf]]
    else:
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        if not close:
            near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
            close = [by_leaf[near[0]]] if near else []
    hint = f"; did you mean '{close[0]}'?" if close else "; run 'lmdistill config-reference' for the list"
    return f"unknown config {what} '{key}'{hint}"


def _validated(key: str, value: Any, section: type, name: str) -> Any:
    """``value`` as the field ``name`` of ``section`` takes it, validated by pydantic against the
    field's annotation; a one-line ConfigError naming the key, the value and what is allowed."""
    try:
        return _adapter(typing.get_type_hints(section, include_extras=True)[name]).validate_python(value)
    except ValidationError:
        raise _wrong_type(key, value, typing.get_type_hints(section)[name]) from None


# A number is a string where a key takes one (Str: run.name: 1e5 is '100000.0'); pydantic's
# field-level form of this needs pydantic 2.7, the config form 2.6.
_ADAPTER_CONFIG = ConfigDict(coerce_numbers_to_str=True)


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint, config=_ADAPTER_CONFIG)


_EXPECTED = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _wrong_type(key: str, value: Any, hint: Any) -> ConfigError:
    """The config's message for a value pydantic refused: what ``key`` takes, by its type
    (``hint`` without pydantic's annotations; of a union, the first type other than None)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arm for arm in get_args(hint) if arm is not type(None))
    if get_origin(hint) is Literal:
        return _bad(key, value, "choose one of " + ", ".join(repr(a) for a in get_args(hint)))
    return ConfigError(f"{key} = {value!r} has the wrong type: expected {_EXPECTED[hint]}")


def _get(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def leaf_fields(obj: Any, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every settable key under ``obj`` (a config or a section) as ``(dotted name, field)``,
    subsections flattened (``distill.hidden.weight``)."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += leaf_fields(value, name + ".")
        else:
            out.append((name, f))
    return out


def reference_markdown() -> str:
    """Markdown table of every config key with type, default and documentation."""
    lines = [
        "# Configuration reference",
        "",
        "Every key, its default and what it does. Set keys in a YAML file (`--config`), "
        "with `--set section.key=value`, or with the named flags of `lmdistill train --help`.",
        "",
        "Files and `--set` values are read alike: a number in exponent notation is a number wherever it "
        "appears (`1e-9`, which YAML 1.1 leaves a string, as a mixture weight too), a key given twice is "
        f"refused, and so is YAML nested more than {MAX_YAML_DEPTH} levels deep or expanding through its "
        f"aliases (`*name`) to more than {MAX_YAML_VALUES:,} values.",
        "",
    ]
    cfg = Config()
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        lines += [
            f"## `{section.name}`",
            "",
            (type(obj).__doc__ or "").strip(),
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        for dotted, f in leaf_fields(obj, section.name + "."):
            default = _get(cfg, dotted)
            lines.append(f"| `{dotted}` | `{default!r}` | {f.metadata.get('doc', '')} |")
        lines.append("")
    return "\n".join(lines)
