"""``views.final_hidden``: the final hidden states the chunked forms start from, with the outputs
of the layers a caller names and no others.

Against the call it replaced (``output_hidden_states=True, logits_to_keep=1``, the last hidden
state and ``layer_outputs`` read from every layer's output): the same values, bit for bit, for
a Llama-like and a GPT-2-like model, plain, inside a LoRA wrapper, through a wrapper module and
sharded with FSDP2. And the point of it: with no layers named, the model is not asked for its
hidden states, and no earlier layer's output is alive when the last layer has run.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_llama
from lmdistill.core.batch import Batch
from lmdistill.core.parallel import decoder_layers, shard
from lmdistill.loss.views import final_hidden, layer_outputs

VOCAB, LAYERS = 64, 4


def tiny_gpt2(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def padded_batch(seed: int = 0) -> Batch:
    """Two rows, the second padded on the right: the attention mask takes part."""
    ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return Batch(ids, mask, targets, int((targets != -100).sum()))


def old_final_hidden(model, batch: Batch, forward=None) -> tuple[torch.Tensor, tuple]:
    """The call ``final_hidden`` made before it took ``layers``: every layer's output, always."""
    out = (forward or model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.hidden_states[-1][:, :-1], out.hidden_states


@pytest.fixture(params=sorted(BUILDERS))
def model(request):
    return BUILDERS[request.param](VOCAB, layers=LAYERS, seed=3).eval()


@torch.no_grad()
def test_the_final_hidden_state_is_the_one_every_layer_output_ends_with(model):
    batch = padded_batch()
    hidden, layers = final_hidden(model, batch)
    want, _ = old_final_hidden(model, batch)
    assert layers == []
    assert hidden.shape == (2, 10, 32)
    assert torch.equal(hidden, want)


@torch.no_grad()
@pytest.mark.parametrize("names", [(0,), (LAYERS - 1, 1), (0, 1, 2, 3)])
def test_named_layers_are_the_old_layer_outputs(model, names):
    """The last layer's "output" is the final hidden state after the final norm, as it was."""
    batch = padded_batch(1)
    hidden, layers = final_hidden(model, batch, names)
    want, states = old_final_hidden(model, batch)
    assert torch.equal(hidden, want)
    old = layer_outputs(states, names)
    assert len(layers) == len(old) == len(names)
    assert all(torch.equal(got, w) for got, w in zip(layers, old))


def _spy_on_forward(model) -> list[dict]:
    """The keyword arguments of each call of ``model``'s forward, from now on."""
    calls, forward = [], model.forward

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    model.forward = recorded
    return calls


@torch.no_grad()
def test_without_layers_the_model_is_not_asked_for_hidden_states(model):
    calls = _spy_on_forward(model)
    final_hidden(model, padded_batch())
    final_hidden(model, padded_batch(), (1,))
    assert [bool(c.get("output_hidden_states")) for c in calls] == [False, True]
    assert all(c["logits_to_keep"] == 1 and c["use_cache"] is False for c in calls)
    assert not model._forward_hooks and not model.base_model._forward_hooks  # the hooks are gone


def _outputs_alive_after_the_last_layer(model, run) -> int:
    """How many decoder layers' outputs, those of every layer but the last two, are still held
    when the last layer has run: the activations a forward keeps beyond the one it needs."""
    blocks = decoder_layers(model)
    outputs, alive = [], []

    def keep_ref(module, args, output):
        outputs.append(weakref.ref(output if isinstance(output, torch.Tensor) else output[0]))

    def count(module, args, output):
        gc.collect()
        alive.append(sum(ref() is not None for ref in outputs[:-2]))

    handles = [block.register_forward_hook(keep_ref) for block in blocks]
    handles.append(blocks[-1].register_forward_hook(count))
    try:
        kept = run()
    finally:
        for handle in handles:
            handle.remove()
    del kept
    return alive[0]


@torch.no_grad()
def test_without_layers_no_earlier_layer_output_outlives_its_use(model):
    """The memory the change is for: asked for every layer's output, the model holds them all
    to the end of its forward (and hands them back); asked for none, a layer's output is freed
    once the next layer has read it."""
    batch = padded_batch()
    assert _outputs_alive_after_the_last_layer(model, lambda: old_final_hidden(model, batch)) == LAYERS - 2
    assert _outputs_alive_after_the_last_layer(model, lambda: final_hidden(model, batch)) == 0
    assert _outputs_alive_after_the_last_layer(model, lambda: final_hidden(model, batch, (1,))) == LAYERS - 2


class Wrapper(torch.nn.Module):
    """Stands for a DDP wrapper: the step runs it, the objective knows the model inside."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_through_a_wrapper_the_student_gets_the_same_values_and_gradients():
    """A student's forward runs through its wrapper (``forward``) and is trained through the
    final hidden state: the gradient of every weight is the one the old call gave."""
    batch = padded_batch(2)
    grads = []
    for new in (False, True):
        student = tiny_llama(VOCAB, layers=LAYERS, seed=5)
        wrapped = Wrapper(student)
        hidden = (
            final_hidden(student, batch, forward=wrapped)[0] if new else old_final_hidden(student, batch, wrapped)[0]
        )
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        grads.append({name: p.grad for name, p in student.named_parameters() if p.grad is not None})
    old, new = grads
    assert old.keys() == new.keys() and len(new) > 2 * LAYERS
    assert all(torch.equal(new[name], old[name]) for name in old)


def test_a_forward_that_runs_another_model_is_refused():
    batch = padded_batch()
    model, other = tiny_llama(VOCAB, seed=1), tiny_llama(VOCAB, seed=2)
    with pytest.raises(RuntimeError, match="did not run LlamaForCausalLM's LlamaModel"):
        final_hidden(model, batch, forward=other)
    assert not model._forward_hooks and not model.base_model._forward_hooks


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_hook_on_the_model_meets_the_final_hidden_state_in_its_output(value):
    """Fault injection poisons the last of a model's hidden states from a hook on the model
    (``training/faults.py``); the teacher's view is then flagged, as it was when the model was
    asked for every layer's output."""
    from types import SimpleNamespace

    from lmdistill.teacher.signals import LiveHidden
    from lmdistill.training.faults import FaultInjector

    debug = SimpleNamespace(
        inject=[{"step": 0, "where": "teacher_logits", "value": value}],
        loss_multiplier={},
        exit_after_step=None,
        exit_rank=None,
    )
    injector, teacher = FaultInjector(debug), tiny_llama(VOCAB, seed=1).eval()
    teacher.register_forward_hook(injector._output_hook("teacher_logits"))
    signal = LiveHidden(teacher)
    assert float(signal(padded_batch(), 1.0).nonfinite) == 0.0
    injector.step = 0
    view = signal(padded_batch(), 1.0)
    assert float(view.nonfinite) == 1.0 and not torch.isfinite(view.hidden[0, 0, 0])
    assert torch.isfinite(view.hidden.flatten()[1:]).all()


@torch.no_grad()
def test_a_lora_student_gives_the_final_hidden_state_of_its_adapted_model():
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(tiny_llama(VOCAB, layers=LAYERS, seed=6), LoraConfig(r=4, target_modules=["q_proj"]))
    for module in student.modules():  # adapters that change the output (B starts at zero)
        if isinstance(module, torch.nn.Linear) and module.weight.shape[1] == 4:
            torch.nn.init.normal_(module.weight)
    batch = padded_batch(3)
    hidden, layers = final_hidden(student, batch, (2,))
    want, states = old_final_hidden(student, batch)
    assert torch.equal(final_hidden(student, batch)[0], want)
    assert torch.equal(hidden, want) and torch.equal(layers[0], layer_outputs(states, (2,))[0])
    plain = student.get_base_model()
    with student.disable_adapter():
        assert not torch.equal(final_hidden(student, batch)[0], want)
    assert torch.equal(final_hidden(plain, batch)[0], want)


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@torch.no_grad()
def test_a_sharded_teacher_gives_what_the_unsharded_one_does(group_of_one):
    """FSDP2's root gathers its weights (embeddings, final norm) in its own forward hook: the
    whole model runs, and the base model's output is read as it passes."""
    batch = padded_batch(4)
    plain = tiny_llama(VOCAB, layers=LAYERS, seed=7).eval()
    sharded = shard(tiny_llama(VOCAB, layers=LAYERS, seed=7).eval(), "no", torch.device("cpu"))
    want, states = old_final_hidden(plain, batch)
    hidden, layers = final_hidden(sharded, batch)
    assert layers == [] and torch.equal(hidden, want)
    hidden, layers = final_hidden(sharded, batch, (0, 3))
    assert torch.equal(hidden, want)
    assert all(torch.equal(got, w) for got, w in zip(layers, layer_outputs(states, (0, 3))))
