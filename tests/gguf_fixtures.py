"""Tiny GGUF files written with the `gguf` package, as llama.cpp's converter lays them out.

A GGUF file keeps a Llama's weights under llama.cpp's names (``blk.N.attn_q.weight``...) with
the rows of the query and key projections reordered for its rotary kernel (the two halves of
each head interleaved), and its tokenizer as metadata arrays (tokens, merges, token types).
Written here from a transformers model and tokenizer, it is a file whose right answer is known:
loaded back, it must give the same logits and the same token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def interleave_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from the Hugging Face order (per head: first half of the rotary
    pairs, then the second half) to GGUF's (per head: the pairs side by side)."""
    rows, cols = weight.shape
    per_head = rows // heads
    return weight.reshape(heads, 2, per_head // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def write_tiny_gguf(path: Path, model, tokenizer, arch: str = "llama") -> Path:
    """``model`` (a LlamaForCausalLM) and its byte-level BPE ``tokenizer`` as an F32 GGUF file."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            weight = state[f"model.layers.{layer}.{hf}.weight"]
            if ours == "attn_q":
                weight = interleave_rotary_halves(weight, cfg.num_attention_heads)
            elif ours == "attn_k":
                weight = interleave_rotary_halves(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{ours}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
