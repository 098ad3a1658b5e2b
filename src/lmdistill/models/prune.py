"""Start the student from the teacher: cut a smaller model of the same family out of it.

Depth: the student keeps ``n_s`` of the teacher's ``n_t`` decoder layers, in order.
  uniform     evenly spaced, the first and the last included (layer ``i (n_t - 1) / (n_s - 1)``,
              rounded half up),
              as DistilBERT initialised its student from every other layer.
  importance  the layers with the largest *block influence* (Men et al. 2024, "ShortGPT"):
              ``1 - cos(x, f(x))`` between a layer's input and output hidden states, averaged over
              the calibration tokens. A layer that barely turns the residual stream is the
              cheapest to drop.

Width (a narrower hidden size, MLP or fewer heads), by activation importance as in Minitron
(Muralidharan et al. 2024), measured on the calibration tokens:
  hidden channels  mean |activation| of the normalised residual stream (every RMSNorm output),
  MLP neurons      mean |input of down_proj| per neuron, per layer,
  attention heads  mean L2 norm of each head's output (the input of o_proj), per layer.
``width: first`` keeps the first channels, neurons and heads instead (a baseline). The head size
stays the teacher's. With grouped-query attention a key/value head is kept with the query heads
it serves: the student keeps the ``kv_s`` groups of largest total importance and in each the
``q_s / kv_s`` most important query heads.

The weights are then sliced consistently: the embedding and lm_head columns and every norm by
the kept hidden channels, each projection by its kept rows and columns; tied embeddings stay
tied. Nothing removed reproduces the teacher exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lmdistill.core.errors import LmdistillError
from lmdistill.models.shapes import student_config_from_teacher

# Decoder-only families whose layers are (RMSNorm, attention with q/k/v/o projections,
# RMSNorm, gated MLP with gate/up/down projections): what the slicing below knows.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class PrunedStudent:
    model: torch.nn.Module
    layers: list[int]  # the teacher layer each student layer was copied from
    channels: list[int]  # the teacher hidden channel each student hidden channel was copied from
    layer_importance: list[float] | None  # block influence of every teacher layer (None: not measured)


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED:
        raise LmdistillError(
            f"model.student_init: teacher supports the {', '.join(SUPPORTED)} families; the teacher is "
            f"'{config.model_type}': use model.student_init: random, or a teacher of those families"
        )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def student_config(teacher_config, overrides: dict):
    """The teacher's config with ``overrides`` (half the teacher when empty), checked for what
    pruning can produce: nothing wider or deeper than the teacher, the teacher's head size."""

    check_supported(teacher_config)
    vocab = overrides.get("vocab_size", teacher_config.vocab_size)
    if vocab != teacher_config.vocab_size:
        raise LmdistillError(
            f"model.student_config: vocab_size = {vocab!r} differs from the teacher's "
            f"{teacher_config.vocab_size}; a student cut out of the teacher keeps its vocabulary "
            "(and its tokenizer): leave vocab_size out"
        )
    config = student_config_from_teacher(teacher_config, overrides)
    if "head_dim" not in overrides:
        config.head_dim = head_dim(teacher_config)
    t, s = teacher_config, config
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(s, key) > getattr(t, key):
            raise LmdistillError(
                f"model.student_config: {key} = {getattr(s, key)} is larger than the teacher's "
                f"{getattr(t, key)}; a student cut out of the teacher can only be smaller"
            )
    if head_dim(s) != head_dim(t):
        raise LmdistillError(
            f"model.student_config: head_dim = {head_dim(s)} differs from the teacher's {head_dim(t)}; "
            "pruning keeps whole heads: leave head_dim out or set it to the teacher's"
        )
    if s.num_attention_heads % s.num_key_value_heads:
        raise LmdistillError(
            f"model.student_config: num_attention_heads = {s.num_attention_heads} is not a multiple "
            f"of num_key_value_heads = {s.num_key_value_heads}"
        )
    group_t = t.num_attention_heads // t.num_key_value_heads
    group_s = s.num_attention_heads // s.num_key_value_heads
    if group_s > group_t:
        raise LmdistillError(
            f"model.student_config: {group_s} query heads per key/value head, the teacher has {group_t}; pruning "
            f"keeps heads within their groups: set num_key_value_heads to at least "
            f"{-(-s.num_attention_heads // group_t)}"
        )
    layer_types = getattr(t, "layer_types", None)
    if layer_types is not None:
        config.layer_types = None  # set from the kept layers by prune_teacher
    return config


# ---- importance ----------------------------------------------------------------------------


def _hidden_arg(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def measure_importance(teacher, input_ids: torch.Tensor) -> dict:
    """Block influence per layer and activation magnitudes per channel, neuron and head, from
    one forward pass of the teacher over ``input_ids`` (calibration blocks, no padding)."""
    config = teacher.config
    layers = teacher.model.layers
    n_heads, d_head = config.num_attention_heads, head_dim(config)
    sums = {
        "influence": torch.zeros(len(layers), dtype=torch.float64),
        "channels": torch.zeros(config.hidden_size, dtype=torch.float64),
        "neurons": [torch.zeros(config.intermediate_size, dtype=torch.float64) for _ in layers],
        "heads": [torch.zeros(n_heads, dtype=torch.float64) for _ in layers],
    }
    tokens = input_ids.numel()

    def on_layer(i):
        def hook(module, args, kwargs, output):
            x, y = _hidden_arg(args, kwargs).double(), _first(output).double()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            sums["influence"][i] += (1 - cos).sum()

        return hook

    def on_norm(module, args, output):
        sums["channels"].add_(output.double().abs().sum(dim=(0, 1)))

    def on_down(i):
        def hook(module, args):
            sums["neurons"][i].add_(args[0].double().abs().sum(dim=(0, 1)))

        return hook

    def on_o_proj(i):
        def hook(module, args):
            x = args[0].double()
            sums["heads"][i].add_(x.reshape(*x.shape[:-1], n_heads, d_head).norm(dim=-1).sum(dim=(0, 1)))

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
            handles.append(layer.input_layernorm.register_forward_hook(on_norm))
            handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        teacher.model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "influence": (sums["influence"] / tokens).tolist(),
        "channels": sums["channels"] / (tokens * 2 * len(layers)),
        "neurons": [s / tokens for s in sums["neurons"]],
        "heads": [s / tokens for s in sums["heads"]],
    }


# ---- what is kept --------------------------------------------------------------------------


def uniform_layers(n_teacher: int, n_student: int) -> list[int]:
    if n_student == 1:
        return [n_teacher - 1]
    return [math.floor(i * (n_teacher - 1) / (n_student - 1) + 0.5) for i in range(n_student)]


def _top(scores: torch.Tensor | None, n_total: int, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` largest scores, in ascending order (the first ``n_keep`` when
    there are no scores); ties go to the lower index."""
    if scores is None or n_keep == n_total:
        return torch.arange(n_keep)
    order = sorted(range(n_total), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:n_keep]))


def _kept_heads(scores: torch.Tensor | None, t_config, s_config) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, key/value heads) of the teacher that one student layer keeps."""
    kv_t, kv_s = t_config.num_key_value_heads, s_config.num_key_value_heads
    group_t = t_config.num_attention_heads // kv_t
    group_s = s_config.num_attention_heads // kv_s
    group_scores = None if scores is None else scores.reshape(kv_t, group_t).sum(dim=1)
    kv = _top(group_scores, kv_t, kv_s)
    queries = []
    for g in kv.tolist():
        within = _top(None if scores is None else scores[g * group_t : (g + 1) * group_t], group_t, group_s)
        queries += (within + g * group_t).tolist()
    return torch.tensor(queries), kv


def _head_rows(heads: torch.Tensor, d_head: int) -> torch.Tensor:
    return (heads[:, None] * d_head + torch.arange(d_head)).reshape(-1)


# ---- slicing -------------------------------------------------------------------------------

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _slice(name: str, w: torch.Tensor, hidden, rows: dict) -> torch.Tensor:
    """The student's tensor ``name`` cut from the teacher's ``w``; ``rows`` holds this layer's
    kept query/key-value rows and MLP neurons."""
    is_bias = name.endswith(".bias")
    part = name.rsplit(".", 2)[-2]  # e.g. q_proj, input_layernorm, embed_tokens
    if part in ("embed_tokens", "lm_head"):
        return w[:, hidden]
    if part in ("input_layernorm", "post_attention_layernorm", "norm"):
        return w[hidden]
    if part in ("q_norm", "k_norm"):  # over the head size, which pruning keeps
        return w
    if part in ("q_proj", "k_proj", "v_proj"):
        r = rows["q" if part == "q_proj" else "kv"]
        return w[r] if is_bias else w[r][:, hidden]
    if part == "o_proj":
        return w[hidden] if is_bias else w[hidden][:, rows["q"]]
    if part in ("gate_proj", "up_proj"):
        return w[rows["mlp"]] if is_bias else w[rows["mlp"]][:, hidden]
    if part == "down_proj":
        return w[hidden] if is_bias else w[hidden][:, rows["mlp"]]
    raise LmdistillError(
        f"model.student_init: teacher cannot prune the parameter '{name}'; supported families: {', '.join(SUPPORTED)}"
    )


def prune_teacher(
    teacher, config, layers: str = "importance", width: str = "importance", calibration: torch.Tensor | None = None
) -> PrunedStudent:
    """A float32 student of ``config`` (from :func:`student_config`) cut out of ``teacher``.

    ``calibration`` (token ids, (N, L)) is needed when either choice is ``importance``."""
    from transformers import AutoModelForCausalLM

    t_config = teacher.config
    check_supported(t_config)
    needs_data = layers == "importance" or width == "importance"
    if needs_data and calibration is None:
        raise ValueError("importance pruning needs calibration token ids")
    importance = measure_importance(teacher, calibration) if needs_data else None
    n_t, n_s = t_config.num_hidden_layers, config.num_hidden_layers
    if layers == "importance":
        influence = torch.tensor(importance["influence"])
        kept_layers = _top(influence, n_t, n_s).tolist()
    elif layers == "uniform":
        kept_layers = uniform_layers(n_t, n_s)
    else:
        raise ValueError(f"unknown layer choice {layers!r}")
    if getattr(t_config, "layer_types", None) is not None:
        config.layer_types = [t_config.layer_types[i] for i in kept_layers]
    by_width = width == "importance"
    hidden = _top(importance["channels"] if by_width else None, t_config.hidden_size, config.hidden_size)
    d_head = head_dim(t_config)

    teacher_state = teacher.state_dict()
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layer_rows = []
    for t_layer in kept_layers:
        q, kv = _kept_heads(importance["heads"][t_layer] if by_width else None, t_config, config)
        mlp_scores = importance["neurons"][t_layer] if by_width else None
        layer_rows.append(
            {
                "q": _head_rows(q, d_head),
                "kv": _head_rows(kv, d_head),
                "mlp": _top(mlp_scores, t_config.intermediate_size, config.intermediate_size),
            }
        )
    state = {}
    for name in student.state_dict():
        match = _LAYER_KEY.match(name)
        rows = {}
        source = name
        if match:
            i, rest = int(match.group(1)), match.group(2)
            source, rows = f"model.layers.{kept_layers[i]}.{rest}", layer_rows[i]
        if source not in teacher_state:
            raise LmdistillError(
                f"model.student_init: teacher found no teacher tensor for '{name}'; supported "
                f"families: {', '.join(SUPPORTED)}"
            )
        state[name] = _slice(name, teacher_state[source], hidden, rows).to(torch.float32).clone()
    student.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return PrunedStudent(student, kept_layers, hidden.tolist(), importance["influence"] if importance else None)
