"""A student's shape from its teacher's: the teacher's config with the sizes ``model.student_config`` sets.

Used by a fresh student (random weights, ``loading.py``) and by a student cut out of the
teacher (``prune.py``) alike, so that the two start from the same architecture.
"""

from __future__ import annotations

from lmdistill.core.errors import LmdistillError, last_line

_SHRINK_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


def student_config_from_teacher(teacher_config, overrides: dict):
    """The teacher's architecture with ``overrides``; with none, half the layers and width."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    if not overrides:
        missing = [k for k in _SHRINK_KEYS if getattr(config, k, None) is None]
        if missing:
            raise LmdistillError(
                f"cannot shrink a {config.model_type} teacher automatically (no {', '.join(missing)} in its config); "
                "set model.student_config or model.student"
            )
        heads = max(1, config.num_attention_heads // 2)
        overrides = {
            "num_hidden_layers": max(1, config.num_hidden_layers // 2),
            "hidden_size": max(heads, config.hidden_size // 2),
            "intermediate_size": max(1, config.intermediate_size // 2),
            "num_attention_heads": heads,
        }
        if getattr(config, "num_key_value_heads", None) is not None:
            kv = config.num_key_value_heads
            while heads % kv:
                kv -= 1
            overrides["num_key_value_heads"] = min(kv, heads)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise LmdistillError(f"model.student_config key '{key}' is not a field of {type(config).__name__}")
        value = _checked_student_value(config, key, value)
        try:
            setattr(config, key, value)
        except Exception as exc:  # transformers' (strict dataclass) validation of the field, of several types
            raise LmdistillError(f"model.student_config.{key} = {value!r} is not allowed: {last_line(exc)}") from None
    if getattr(config, "head_dim", None) is not None and "head_dim" not in overrides:
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


# The keys that give a model its shape: each a count or a size, so a whole number >= 1.
_SHAPE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


_ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")


def _checked_student_value(config, key: str, value):
    """One ``model.student_config`` value checked before it reaches the config: shape keys are
    whole numbers >= 1 (a whole float becomes an int), activations are ones transformers knows."""
    where = f"model.student_config.{key} = {value!r}"
    if key in _SHAPE_KEYS and value is not None:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LmdistillError(
                f"{where} is not allowed: it must be a whole number >= 1 (the teacher has {getattr(config, key, None)})"
            )
    if key in _ACTIVATION_KEYS and isinstance(getattr(config, key, None), str):
        from transformers.activations import ACT2FN

        if not isinstance(value, str) or value not in ACT2FN:
            known = ", ".join(a for a in ("silu", "gelu", "gelu_pytorch_tanh", "relu") if a in ACT2FN)
            raise LmdistillError(
                f"{where} is not an activation {type(config).__name__} knows; use one of the "
                f"transformers activations ({known}, ...), e.g. the teacher's "
                f"{getattr(config, key)!r}"
            )
    return value
