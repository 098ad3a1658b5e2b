"""Pruned students: the kept layers, channels, neurons and heads, and the sliced weights,
against references written here by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lmdistill.core.errors import LmdistillError
from lmdistill.models.prune import prune_teacher, student_config, uniform_layers

V = 40
SHAPE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def teacher(family=LlamaForCausalLM, config_class=LlamaConfig, seed=0, **kw):
    args = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    args.update(kw)
    torch.manual_seed(seed)
    return family(config_class(**args)).eval()


def ids(n=3, length=11, seed=1):
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed))


def same_shape(model) -> dict:
    return {k: getattr(model.config, k) for k in SHAPE}


@pytest.mark.parametrize(
    "family, config_class, tied, layers",
    [
        (LlamaForCausalLM, LlamaConfig, False, "importance"),
        (LlamaForCausalLM, LlamaConfig, True, "uniform"),
        (Qwen2ForCausalLM, Qwen2Config, False, "importance"),  # q/k/v biases
        (Qwen3ForCausalLM, Qwen3Config, True, "importance"),  # q/k norms
        (MistralForCausalLM, MistralConfig, False, "uniform"),
    ],
    ids=["llama", "llama-tied", "qwen2", "qwen3-tied", "mistral"],
)
def test_nothing_removed_reproduces_the_teacher_exactly(family, config_class, tied, layers):
    t = teacher(family, config_class, tie_word_embeddings=tied)
    x = ids()
    pruned = prune_teacher(t, student_config(t.config, same_shape(t)), layers, "importance", x)
    assert pruned.layers == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.equal(pruned.model(x).logits, t(x).logits)


def test_uniform_layers_are_evenly_spaced_with_both_ends():
    assert uniform_layers(4, 2) == [0, 3]
    assert uniform_layers(6, 3) == [0, 3, 5]  # 2.5 rounds up
    assert uniform_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert uniform_layers(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_layers(7, 1) == [6]


def test_uniform_depth_copies_the_kept_layers_parameters():
    t = teacher(num_hidden_layers=6)
    config = student_config(t.config, {"num_hidden_layers": 3})
    pruned = prune_teacher(t, config, "uniform", "first")
    assert pruned.layers == [0, 3, 5]
    for i, source in enumerate(pruned.layers):
        s_params = dict(pruned.model.model.layers[i].named_parameters())
        t_params = dict(t.model.layers[source].named_parameters())
        assert s_params.keys() == t_params.keys()
        for name in s_params:
            assert torch.equal(s_params[name], t_params[name]), (i, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(pruned.model.state_dict()[name], t.state_dict()[name])


def test_importance_depth_drops_the_layer_that_changes_nothing():
    t = teacher()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: its influence is 0
        t.model.layers[2].self_attn.o_proj.weight.zero_()
        t.model.layers[2].mlp.down_proj.weight.zero_()
    pruned = prune_teacher(t, student_config(t.config, {"num_hidden_layers": 3}), "importance", "first", ids())
    assert pruned.layer_importance[2] == pytest.approx(0.0, abs=1e-6)
    assert min(pruned.layer_importance[i] for i in (0, 1, 3)) > 1e-3
    assert pruned.layers == [0, 1, 3]


def _hand_sliced_reference(t, config, layers, hidden, heads_q, heads_kv, neurons):
    """The student's state dict sliced by hand from the teacher's, per the indices given."""
    d = t.config.head_dim
    sd = t.state_dict()
    ref = {
        "model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, hidden],
        "model.norm.weight": sd["model.norm.weight"][hidden],
        "lm_head.weight": sd["lm_head.weight"][:, hidden],
    }
    for i, src in enumerate(layers):
        q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads_q[i]])
        kv_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads_kv[i]])
        p, s = f"model.layers.{src}.", f"model.layers.{i}."
        ref[s + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"][hidden]
        ref[s + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"][hidden]
        ref[s + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][q_rows][:, hidden]
        ref[s + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"][kv_rows][:, hidden]
        ref[s + "self_attn.v_proj.weight"] = sd[p + "self_attn.v_proj.weight"][kv_rows][:, hidden]
        ref[s + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][hidden][:, q_rows]
        ref[s + "mlp.gate_proj.weight"] = sd[p + "mlp.gate_proj.weight"][neurons[i]][:, hidden]
        ref[s + "mlp.up_proj.weight"] = sd[p + "mlp.up_proj.weight"][neurons[i]][:, hidden]
        ref[s + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][hidden][:, neurons[i]]
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(ref, strict=True)
    return model


def test_width_pruning_keeps_the_most_active_channels_neurons_and_heads():
    t = teacher()  # 4 query heads in 2 groups of 2, hidden 32, MLP 48, head size 8
    hidden_big = [3, 7, 8, 20, 21, 30, 1, 12, 13, 14, 15, 16, 17, 18, 19, 22]  # 16 of 32
    neurons_big = [[5, 9, 40] + list(range(10, 31)), [0, 2, 4] + list(range(20, 41))]  # 24 of 48, per kept layer
    with torch.no_grad():
        for layer in t.model.layers:  # these channels dominate every norm output
            layer.input_layernorm.weight[hidden_big] *= 50
            layer.post_attention_layernorm.weight[hidden_big] *= 50
        for layer, big in zip((t.model.layers[0], t.model.layers[3]), neurons_big):
            layer.mlp.up_proj.weight[big] *= 40
        # A key/value head's values scale the outputs of its whole group: layer 0 keeps group 1
        # (query heads 2, 3), layer 3 keeps group 0 (query heads 0, 1).
        t.model.layers[0].self_attn.v_proj.weight[8:16] *= 30
        t.model.layers[3].self_attn.v_proj.weight[0:8] *= 30
    config = student_config(
        t.config,
        {
            "num_hidden_layers": 2,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
    )
    x = ids(n=4, length=16)
    pruned = prune_teacher(t, config, "uniform", "importance", x)
    assert pruned.layers == [0, 3]
    sd = pruned.model.state_dict()
    hidden = torch.tensor(sorted(hidden_big))
    assert torch.equal(sd["model.norm.weight"], t.state_dict()["model.norm.weight"][hidden])
    neurons = [torch.tensor(sorted(b)) for b in neurons_big]
    # kept groups: 1 in layer 0, 0 in layer 3; both query heads of the group (group size 2 -> 2)
    heads_q, heads_kv = [[2, 3], [0, 1]], [[1], [0]]
    ref = _hand_sliced_reference(t, config, [0, 3], hidden, heads_q, heads_kv, neurons)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(sd[name], tensor), name
    with torch.no_grad():
        assert torch.equal(pruned.model(x).logits, ref(x).logits)


def test_fewer_query_heads_per_group_keeps_the_stronger_head():
    t = teacher(num_hidden_layers=1, num_key_value_heads=2)
    attn = t.model.layers[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight[0:8] *= 20  # group 0 (query heads 0, 1) outweighs group 1
    config = student_config(t.config, {"num_attention_heads": 1, "num_key_value_heads": 1})
    x = ids(n=4, length=16)
    pruned = prune_teacher(t, config, "uniform", "importance", x)
    # the kept query head: the larger output norm within group 0, measured here independently
    outputs = []
    attn.o_proj.register_forward_pre_hook(lambda m, a: outputs.append(a[0].detach()))
    with torch.no_grad():
        t(x)
    norms = outputs[0].reshape(4, 16, 4, 8).norm(dim=-1).mean(dim=(0, 1))
    head = int(norms[:2].argmax())
    q = pruned.model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, attn.q_proj.weight[head * 8 : (head + 1) * 8][:, torch.arange(32)])
    assert torch.equal(pruned.model.model.layers[0].self_attn.k_proj.weight, attn.k_proj.weight[0:8])


def test_tied_embeddings_stay_tied_and_the_student_saves_and_loads(tmp_path):
    t = teacher(tie_word_embeddings=True)
    pruned = prune_teacher(t, student_config(t.config, {}), "importance", "importance", ids())
    m = pruned.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    c = m.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    ) == (2, 16, 24, 2, 2, 8)
    m.save_pretrained(tmp_path / "s")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, m.eval()(x).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_qwen2_layer_types_follow_the_kept_layers():
    t = teacher(
        Qwen2ForCausalLM,
        Qwen2Config,
        layer_types=["full_attention", "sliding_attention"] * 2,
        use_sliding_window=True,
        sliding_window=4,
    )
    pruned = prune_teacher(t, student_config(t.config, {"num_hidden_layers": 2}), "uniform", "first")
    assert pruned.layers == [0, 3]
    assert pruned.model.config.layer_types == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 64}, "hidden_size = 64 is larger than the teacher's 32"),
        ({"num_hidden_layers": 5}, "num_hidden_layers = 5 is larger"),
        ({"head_dim": 4}, "head_dim = 4 differs from the teacher's 8"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "set num_key_value_heads to at least 2"),
        ({"num_attention_heads": 3, "num_key_value_heads": 2}, "not a multiple of num_key_value_heads"),
    ],
)
def test_shapes_pruning_cannot_make_are_refused_in_one_line(overrides, message):
    with pytest.raises(LmdistillError, match=message) as info:
        student_config(teacher().config, overrides)
    assert "\n" not in str(info.value)


def test_other_families_are_refused_naming_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(
        LmdistillError, match="supports the llama, mistral, qwen2, qwen3 families; the teacher is 'gpt2'"
    ) as info:
        student_config(gpt2.config, {})
    assert "\n" not in str(info.value)


def test_qwen2_biases_follow_their_rows():
    t = teacher(Qwen2ForCausalLM, Qwen2Config)
    config = student_config(t.config, {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1})
    pruned = prune_teacher(t, config, "uniform", "first")
    s_attn, t_attn = pruned.model.model.layers[1].self_attn, t.model.layers[1].self_attn
    # first width: kept group 0 (key/value head 0) and its first two query heads (0, 1), head size 8
    assert torch.equal(s_attn.q_proj.bias, t_attn.q_proj.bias[:16])
    assert torch.equal(s_attn.k_proj.bias, t_attn.k_proj.bias[:8])
    assert torch.equal(s_attn.v_proj.bias, t_attn.v_proj.bias[:8])
    assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight[:16, :16])
