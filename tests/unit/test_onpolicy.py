"""On-policy pieces against independent references: the sampled-token estimator's expected
gradient against the exact reverse-KL gradient (enumerating a tiny vocabulary), the masking
of prompt, padding and post-EOS positions against hand counts, the per-step draw, and the
generator (seeded, prompt kept, train mode restored)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmdistill.loss.dense import IGNORE_INDEX
from lmdistill.loss.sampled import sampled_token_loss, teacher_token_logprobs
from lmdistill.loss.views import TeacherHidden, TeacherLogits
from lmdistill.teacher.generation import HFGenerator, Sampling, rollout_batch
from lmdistill.teacher.onpolicy import is_on_policy


def test_sampled_token_gradient_in_expectation_is_the_reverse_kl_gradient():
    g = torch.Generator().manual_seed(0)
    positions, vocab = 3, 5
    zs = torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    zt = torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    log_p = F.log_softmax(zt, -1)
    # the reference: autograd through KL(q || p) = sum_x q (log q - log p), summed over positions
    z = zs.clone().requires_grad_()
    log_q = F.log_softmax(z, -1)
    (log_q.exp() * (log_q - log_p)).sum().backward()
    want = z.grad
    # the estimator, every combination of written tokens weighted by its probability under q
    q = F.softmax(zs, -1)
    expected = torch.zeros_like(zs)
    for pos in range(positions):
        for x in range(vocab):
            targets = torch.full((positions,), IGNORE_INDEX)
            targets[pos] = x
            z = zs.clone().requires_grad_()
            student_logp = F.log_softmax(z, -1).gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
            parts = sampled_token_loss(
                student_logp, log_p.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1), targets, num_tokens=1
            )
            parts.total.backward()
            expected += q[pos, x] * z.grad
            # its value (and the logged loss): log q(x) - log p(x) at that position
            assert parts.total.item() == pytest.approx(parts.kd.item(), abs=1e-6)
            assert parts.kd.item() == pytest.approx((F.log_softmax(zs[pos], -1)[x] - log_p[pos, x]).item(), abs=1e-6)
    torch.testing.assert_close(expected, want.to(expected.dtype), rtol=1e-5, atol=1e-7)


def test_teacher_token_logprobs_from_hidden_states_equal_those_from_logits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 8, generator=g)
    head = torch.nn.Linear(8, 11)
    targets = torch.randint(0, 11, (2, 7), generator=g)
    targets[0, :3] = IGNORE_INDEX
    with torch.no_grad():
        logits = head(hidden)
    from_logits = teacher_token_logprobs(TeacherLogits(logits, torch.zeros(())), targets, 11)
    from_hidden = teacher_token_logprobs(
        TeacherHidden(hidden, head.weight.detach(), head.bias.detach(), torch.zeros(())), targets, 11, chunk_size=4
    )
    torch.testing.assert_close(from_hidden, from_logits, rtol=1e-5, atol=1e-6)
    want = F.log_softmax(logits, -1)[1, 4, targets[1, 4]]
    assert from_logits[1, 4].item() == pytest.approx(want.item(), rel=1e-6)


def test_rollout_targets_are_the_written_tokens_up_to_the_first_eos():
    eos, pad = 9, 0
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    written = torch.tensor(
        [
            [7, 9, 9, 9],  # ends after one token: targets 7 and the EOS
            [8, 8, 8, 8],
        ]
    )  # never ends: all four written tokens
    batch = rollout_batch(prompts, written, eos_token_id=eos, pad_token_id=pad)
    assert batch.generated and batch.num_targets == 2 + 4
    # rows start at position 0 (as generation counted them) and are padded on the right
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 9, 0, 0], [4, 5, 8, 8, 8, 8, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]]
    want = torch.full((2, 6), IGNORE_INDEX)
    want[0, 2:4] = torch.tensor([7, 9])  # position 2 (the last prompt token) predicts the first written one
    want[1, 1:5] = torch.tensor([8, 8, 8, 8])
    assert torch.equal(batch.targets, want)


def test_prompts_are_the_first_tokens_of_text_and_what_precedes_the_first_target_of_chat():
    from lmdistill.core.batch import Batch
    from lmdistill.teacher.generation import prompts_of

    text = Batch.from_blocks(torch.arange(20).reshape(2, 10))
    assert [p.tolist() for p in prompts_of(text, 4)] == [[0, 1, 2, 3], [10, 11, 12, 13]]
    ids = torch.arange(1, 9).repeat(2, 1)
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]])
    chat = Batch.from_ids(ids, None, loss_mask)  # targets from the 4th and the 6th token on
    assert [p.tolist() for p in prompts_of(chat, 4)] == [[1, 2, 3], [1, 2, 3, 4, 5]]
    # decided row by row: a text row (every token a target) next to a chat row, as in a mixture,
    # keeps its first prompt_tokens tokens; a short padded row keeps what it has, less one
    ids = torch.arange(1, 9).repeat(3, 1)
    attention = torch.tensor([[1] * 8, [1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]])
    loss_mask = torch.tensor([[1] * 8, [0, 0, 0, 0, 0, 1, 1, 1], [1] * 8])
    mixed = Batch.from_ids(ids, attention, loss_mask)
    assert [p.tolist() for p in prompts_of(mixed, 4)] == [[1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 2]]


def test_the_on_policy_draw_is_a_function_of_seed_and_step():
    assert not any(is_on_policy(0, s, 0.0) for s in range(200))
    assert all(is_on_policy(0, s, 1.0) for s in range(200))
    draws = [is_on_policy(3, s, 0.5) for s in range(2000)]
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert draws == [is_on_policy(3, s, 0.5) for s in range(2000)]
    assert draws != [is_on_policy(4, s, 0.5) for s in range(2000)]


@pytest.fixture(scope="module")
def tiny_student():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=31,
        pad_token_id=31,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def test_generation_is_seeded_keeps_the_prompt_and_restores_train_mode(tiny_student):
    generator = HFGenerator(tiny_student, eos_token_id=31, pad_token_id=31)
    tiny_student.train()
    prompts = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    state = torch.random.get_rng_state()
    a = generator(prompts, Sampling(max_new_tokens=6), seed=11)
    assert torch.equal(torch.random.get_rng_state(), state), "generation moved the global RNG"
    assert tiny_student.training
    b = generator(prompts, Sampling(max_new_tokens=6), seed=11)
    c = generator(prompts, Sampling(max_new_tokens=6), seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape[0] == 2 and 4 < a.shape[1] <= 10 and torch.equal(a[:, :4], prompts)
    # sampling is the student's: at a tiny temperature it writes its greedy continuation
    greedy = tiny_student.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=6, pad_token_id=31
    )
    cold = generator(prompts, Sampling(max_new_tokens=6, temperature=1e-4), seed=5)
    assert torch.equal(cold, greedy)


def test_repeated_ngram_share_against_a_hand_count():
    from lmdistill.teacher.judge import repeated_ngram_share

    # row 1: 4-grams (1234) (2341) (3412) (4123) (1234): one repeat of five; row 2: too short
    assert repeated_ngram_share([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7]]) == pytest.approx(1 / 5)
    assert repeated_ngram_share([[1, 1, 1, 1, 1, 1]]) == pytest.approx(2 / 3)
    assert repeated_ngram_share([]) == 0.0


def test_generation_quality_scores_the_written_tokens_with_each_model(tiny_student):
    from lmdistill.teacher.judge import generation_quality

    prompts = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    scores, written = generation_quality(
        tiny_student,
        tiny_student,
        prompts,
        Sampling(max_new_tokens=5),
        seed=2,
        eos_token_id=31,
        pad_token_id=31,
        vocab_size=32,
        batch_size=2,
    )
    assert scores["gen_teacher_nll"] == pytest.approx(scores["gen_student_nll"], rel=1e-6)
    assert len(written) == 3 and scores["gen_length"] == pytest.approx(sum(map(len, written)) / 3)
    # the teacher's NLL of a row, by hand: one forward over prompt + written tokens
    one, (tokens,) = generation_quality(
        tiny_student,
        tiny_student,
        prompts[:1],
        Sampling(max_new_tokens=5),
        seed=2,
        eos_token_id=31,
        pad_token_id=31,
        vocab_size=32,
    )
    row = torch.tensor([[1, 2, 3, *tokens]])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_student(input_ids=row).logits[0, :-1].float(), -1)
    nll = -logp[2:].gather(1, row[0, 3:].unsqueeze(1)).sum()
    assert one["gen_teacher_nll"] == pytest.approx(nll.item() / len(tokens), rel=1e-5)


def test_prompts_of_different_lengths_are_continued_as_each_alone(tiny_student):
    """Left padding with its mask: a short prompt batched with a long one is continued as when
    it is alone (greedy at a tiny temperature), so positions and masking are right."""
    from lmdistill.teacher.generation import continue_prompts

    generator = HFGenerator(tiny_student, eos_token_id=31, pad_token_id=0)
    cold = Sampling(max_new_tokens=5, temperature=1e-4)
    short, long = torch.tensor([3, 4]), torch.tensor([5, 6, 7, 8, 9, 10])
    together = continue_prompts(generator, [short, long], cold, 1, 31, 0, "cpu")
    alone = [continue_prompts(generator, [p], cold, 1, 31, 0, "cpu") for p in (short, long)]
    for row, single in enumerate(alone):
        n = int(single.attention_mask.sum())
        assert together.input_ids[row, :n].tolist() == single.input_ids[0, :n].tolist()
        assert int(together.attention_mask[row].sum()) == n


def test_student_token_logprobs_from_hidden_states_match_logits_in_value_and_gradient():
    from lmdistill.loss.sampled import token_logprobs, token_logprobs_from_hidden

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, 8, generator=g)
    weight = torch.randn(13, 8, generator=g)
    targets = torch.randint(0, 13, (2, 9), generator=g)
    targets[1, 5:] = IGNORE_INDEX
    grads = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = (
            token_logprobs_from_hidden(h, w, None, targets, 13, chunk_size=4)
            if chunked
            else token_logprobs(h @ w.t(), targets)
        )
        (logp * (targets != IGNORE_INDEX)).sum().backward()
        grads.append((logp.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_models_own_generation_settings_do_not_change_the_samples(tiny_student):
    """A checkpoint's generation_config (a repetition penalty, banned tokens) is set aside: the
    samples are the student's distribution at the configured temperature."""
    from transformers import GenerationConfig

    generator = HFGenerator(tiny_student, eos_token_id=31, pad_token_id=31)
    prompts = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    plain = generator(prompts, Sampling(max_new_tokens=8), seed=3)
    own = tiny_student.generation_config
    tiny_student.generation_config = GenerationConfig(
        repetition_penalty=5.0, no_repeat_ngram_size=1, suppress_tokens=list(range(10, 20))
    )
    try:
        assert torch.equal(generator(prompts, Sampling(max_new_tokens=8), seed=3), plain)
        assert tiny_student.generation_config.repetition_penalty == 5.0  # put back after the call
    finally:
        tiny_student.generation_config = own


def test_gen_reverse_kl_is_zero_against_the_same_weights_and_positive_against_others(tiny_student):
    """gen_reverse_kl = teacher NLL - student NLL of the student's own samples, an estimate of
    KL(student || teacher): 0 for a teacher with the student's weights (another object), clearly
    positive for a teacher the student does not match (a sharper student than a near-uniform one)."""
    import copy

    from lmdistill.teacher.judge import generation_quality

    prompts = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    settings = dict(sampling=Sampling(max_new_tokens=6), seed=3, eos_token_id=31, pad_token_id=31, vocab_size=32)
    same, _ = generation_quality(tiny_student, copy.deepcopy(tiny_student), prompts, **settings)
    assert same["gen_reverse_kl"] == pytest.approx(same["gen_teacher_nll"] - same["gen_student_nll"], abs=1e-12)
    assert abs(same["gen_reverse_kl"]) < 1e-5 and same["gen_teacher_nll"] > 1.0
    sharp = copy.deepcopy(tiny_student)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(30.0)  # nearly deterministic next tokens; the teacher spreads its mass
    other, _ = generation_quality(sharp, tiny_student, prompts, **settings)
    assert other["gen_reverse_kl"] == pytest.approx(other["gen_teacher_nll"] - other["gen_student_nll"], abs=1e-12)
    assert other["gen_reverse_kl"] > 0.5
