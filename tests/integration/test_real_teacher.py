"""A real pretrained teacher: SmolLM2-135M-Instruct from its GGUF file (30 layers, 9 query / 3
key-value heads, vocabulary 49,152, tied embeddings, ChatML template).

These tests are marked ``real``: they need the file benchmarks/real_teacher.py fetches
(scripts/test.sh fetches it; see the ``real_teacher_dir`` fixture). Kept small: short blocks,
two steps, students of a few layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_jsonl

pytestmark = pytest.mark.real


def test_the_gguf_converts_to_the_published_model(real_teacher_dir, real_teacher, real_tokenizer):
    config = json.loads((real_teacher_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
        config["tie_word_embeddings"],
    ) == (30, 576, 9, 3, 49152, True)
    assert real_teacher.lm_head.weight is real_teacher.model.embed_tokens.weight
    assert len(real_tokenizer) == 49152 and real_tokenizer.eos_token == "<|im_end|>"
    prompt = real_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = real_teacher.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in real_tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def test_the_chat_mask_on_the_real_chatml_template_is_the_hand_count(real_tokenizer):
    from lmdistill.data.chat import encode_messages

    answers = ["The capital of France is Paris.", "About 2.1 million people live there."]
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "How many people live there?"},
        {"role": "assistant", "content": answers[1]},
    ]
    ids, mask = encode_messages(messages, real_tokenizer)
    # By hand: ChatML closes each turn with "<|im_end|>\n"; an assistant turn is trained on its
    # content and that close (the model learns to stop), not on "<|im_start|>assistant\n".
    expected = [real_tokenizer(a + "<|im_end|>\n", add_special_tokens=False).input_ids for a in answers]
    assert sum(mask) == sum(len(e) for e in expected)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == expected[0] + expected[1]
    assert real_tokenizer.decode(trained) == "".join(a + "<|im_end|>\n" for a in answers)
    assert real_tokenizer.decode(ids).startswith("<|im_start|>system\n")  # the template's default system turn
    assert len(ids) == len(mask)


def _kept_rows(student_w: torch.Tensor, teacher_w: torch.Tensor, channels: list[int], d_head: int) -> list[int]:
    """Which teacher heads a student projection's row blocks were copied from (by value)."""
    blocks = teacher_w[:, channels].reshape(-1, d_head, len(channels))
    found = []
    for block in student_w.reshape(-1, d_head, len(channels)):
        match = [h for h in range(blocks.shape[0]) if torch.equal(blocks[h], block)]
        assert len(match) == 1
        found.append(match[0])
    return found


def test_pruning_the_real_teacher_keeps_gqa_groups_and_tied_embeddings(real_teacher, real_tokenizer, corpus_texts):
    from lmdistill.models import prune

    calibration = torch.tensor([real_tokenizer("\n".join(corpus_texts[:4])).input_ids[: 4 * 48]]).reshape(4, 48)
    depth = prune.prune_teacher(
        real_teacher,
        prune.student_config(real_teacher.config, {"num_hidden_layers": 15}),
        "importance",
        "importance",
        calibration,
    )
    assert len(depth.layers) == 15 and depth.layers == sorted(depth.layers)
    assert depth.model.lm_head.weight is depth.model.model.embed_tokens.weight  # still tied
    for s, t in enumerate(depth.layers):  # a depth cut copies whole layers
        for (name, ws), (_, wt) in zip(
            depth.model.model.layers[s].state_dict().items(), real_teacher.model.layers[t].state_dict().items()
        ):
            assert torch.equal(ws, wt), name
    shape = {"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 2}
    width = prune.prune_teacher(
        real_teacher,
        prune.student_config(real_teacher.config, {"num_hidden_layers": 4, **shape}),
        "uniform",
        "importance",
        calibration,
    )
    assert width.model.lm_head.weight is width.model.model.embed_tokens.weight
    assert torch.equal(width.model.model.embed_tokens.weight, real_teacher.model.embed_tokens.weight[:, width.channels])
    for s, t in enumerate(width.layers):
        ta, sa = real_teacher.model.layers[t].self_attn, width.model.model.layers[s].self_attn
        kv = _kept_rows(sa.k_proj.weight, ta.k_proj.weight, width.channels, 64)
        q = _kept_rows(sa.q_proj.weight, ta.q_proj.weight, width.channels, 64)
        assert _kept_rows(sa.v_proj.weight, ta.v_proj.weight, width.channels, 64) == kv
        # teacher groups: 3 query heads per key-value head; student: 3 per key-value head as well.
        # Student query head j reads student key-value head j // 3: it must be a query head of
        # the teacher group that key-value head came from.
        assert [h // 3 for h in q] == [kv[j // 3] for j in range(6)]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, real_teacher_dir, real_teacher, real_tokenizer, text_file):
    """Two steps from one cut student (2 layers, 192 wide) on the full-logits and the chunked loss path."""
    from lmdistill.config import Config
    from lmdistill.training.trainer import train

    runs = {}
    for impl in ("full", "chunked"):
        cfg = Config()
        out = tmp_path_factory.mktemp(f"real-{impl}") / "run"
        cfg.run.output_dir, cfg.run.device = str(out), "cpu"
        cfg.model.teacher = str(real_teacher_dir)
        # 2 layers, a third of the width: the tied embedding (49,152 rows) stays the largest part,
        # and every checkpoint holds it three times (weights, AdamW's two moments)
        cfg.model.student_config = {
            "num_hidden_layers": 2,
            "hidden_size": 192,
            "intermediate_size": 512,
            "num_attention_heads": 3,
            "num_key_value_heads": 1,
        }
        cfg.model.prune.layers, cfg.model.prune.width = "uniform", "first"
        cfg.data.path, cfg.data.block_size, cfg.data.max_tokens = str(text_file), 32, 2000
        cfg.data.store_dir = str(out.parent / "stores")  # a module fixture runs outside the per-test LMDISTILL_HOME
        cfg.train.batch_size, cfg.train.max_steps, cfg.train.lr, cfg.train.eval_every = 2, 2, 1e-4, 100
        cfg.loss.impl, cfg.loss.chunk_size = impl, 24
        cfg.checkpoint.every = 2
        train(cfg, teacher=real_teacher, tokenizer=real_tokenizer, progress=False, print_summary=False)
        runs[impl] = out
    return runs


def test_two_steps_on_both_loss_paths_agree_on_the_real_teacher(real_runs):
    lines = {impl: [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] for impl, run in real_runs.items()}
    assert len(lines["full"]) == 2 and [r["step"] for r in lines["full"]] == [r["step"] for r in lines["chunked"]]
    for full, chunked in zip(lines["full"], lines["chunked"]):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert chunked[key] == pytest.approx(full[key], rel=1e-4), key
    first = lines["full"][0]
    assert 0 < first["kd_loss"] < 50 and first["ce_loss"] > 0  # finite, a real gap from a 2-layer cut
    final = json.loads((real_runs["full"] / "run.json").read_text())["final"]
    assert final["teacher_ppl"] < final["eval_ppl"]


def test_a_real_student_exports_and_reloads_without_quantization_settings(real_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmdistill.export import export_checkpoint

    run = real_runs["chunked"]
    out = export_checkpoint(run, tmp_path / "exported")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    final = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    x = torch.tensor([[1, 200, 3000, 49151]])
    with torch.no_grad():
        assert torch.equal(exported(x).logits, final(x).logits)
