"""The models' speed-ups without compiling anything: compiled layers in place (torch.compile stood
in for, so that nothing compiles), the switches' resolution, Liger's patching through a stand-in
package (the real one needs CUDA and Triton), and the config's on / off."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from conftest import TINY_VOCAB, tiny_llama
from lmdistill.config import Config
from lmdistill.core.errors import ConfigError, LmdistillError
from lmdistill.models import speedups
from lmdistill.models.speedups import compile_layers, compiled_layers
from lmdistill.training.speedups import Speedups

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # (a device object needs no GPU)


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile as seen by models.speedups: the function itself, each call counted."""
    calls = []

    def compile_(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(kwargs)
            return fn(*args, **kw)

        return compiled

    monkeypatch.setattr(speedups.torch, "compile", compile_)
    monkeypatch.setattr(speedups, "_BROKEN", set())
    return calls


def _ids(n=8):
    return torch.arange(n).unsqueeze(0) % TINY_VOCAB


def test_compiled_layers_keep_every_name_and_every_value(fake_compile, tmp_path):
    model = tiny_llama(TINY_VOCAB, layers=2).eval()
    names = list(model.state_dict())
    with torch.no_grad():
        before = model(input_ids=_ids(), use_cache=False).logits
    assert compile_layers(model) == compiled_layers(model) == 2
    forwards = [layer.forward for layer in model.model.layers]
    assert compile_layers(model) == 2 and [layer.forward for layer in model.model.layers] == forwards  # once
    assert list(model.state_dict()) == names and not any("_orig_mod" in name for name in names)
    with torch.no_grad():
        after = model(input_ids=_ids(), use_cache=False).logits
    assert torch.equal(before, after) and len(fake_compile) == 2  # each layer through its compiled forward
    assert fake_compile[0] == {"dynamic": False}
    model.save_pretrained(tmp_path)  # (the compiled forwards are no part of what is saved)
    from transformers import AutoModelForCausalLM

    assert list(AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()) == names


def test_generation_runs_the_layers_eagerly(fake_compile):
    """A call carrying a KV cache would recompile for every length: it takes the eager forward."""
    model = tiny_llama(TINY_VOCAB, layers=2).eval()
    want = model.generate(_ids(), max_new_tokens=4, do_sample=False)
    compile_layers(model)
    assert torch.equal(model.generate(_ids(), max_new_tokens=4, do_sample=False), want)
    assert fake_compile == []


def test_layers_inside_lora_adapters_are_found(fake_compile):
    from lmdistill.config import LoraConfig
    from lmdistill.models.lora import add_adapters

    model = add_adapters(tiny_llama(TINY_VOCAB, layers=2), LoraConfig(r=2), None)
    names = list(model.state_dict())
    assert compile_layers(model) == 2 and list(model.state_dict()) == names


def test_a_compiler_failure_is_said_once_and_the_layers_run_eagerly(monkeypatch, capsys):
    def failing(fn, **kwargs):
        def compiled(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException("cannot trace this")

        return compiled

    monkeypatch.setattr(speedups.torch, "compile", failing)
    monkeypatch.setattr(speedups, "_BROKEN", set())
    model = tiny_llama(TINY_VOCAB, layers=2).eval()
    with torch.no_grad():
        want = model(input_ids=_ids(), use_cache=False).logits
        compile_layers(model)
        for _ in range(2):
            assert torch.equal(model(input_ids=_ids(), use_cache=False).logits, want)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "warning: torch.compile failed on LlamaDecoderLayer (TorchDynamoException); its layers run eagerly"
    ]


def _cfg(**settings) -> Config:
    return Config.load(None, [f"model.{key}={value}" for key, value in settings.items()])


@pytest.mark.parametrize(
    "setting, device, on, why",
    [
        ("auto", CPU, False, "auto: CPU"),
        ("auto", CUDA, True, "auto: CUDA"),
        ("on", CPU, True, "model.compile: on"),
        ("off", CUDA, False, "model.compile: off"),
    ],
)
def test_compile_resolves_by_device(setting, device, on, why):
    s = Speedups.resolve(_cfg(compile=setting), device)
    assert (s.compile, s.compile_why) == (on, why)


def test_yaml_reads_on_and_off_as_the_switch_values():
    cfg = _cfg(compile="on", liger="off")  # unquoted: YAML 1.1 booleans
    assert (cfg.model.compile, cfg.model.liger) == ("on", "off")
    with pytest.raises(ConfigError, match=r"model.compile = 'fast' is not allowed: choose one of 'auto', 'on', 'off'"):
        _cfg(compile="fast")
    with pytest.raises(ConfigError, match=r"model.liger = on needs a CUDA GPU \(run.device = 'cpu'\)"):
        Config.load(None, ["model.liger=on", "run.device=cpu"])


def test_liger_refusals_and_silence_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # an import of it fails, installed or not
    with pytest.raises(LmdistillError, match="needs a CUDA GPU"):
        Speedups.resolve(_cfg(liger="on"), CPU)
    with pytest.raises(LmdistillError, match="not installed or does not import here; pip install liger-kernel"):
        Speedups.resolve(_cfg(liger="on"), CUDA)
    auto = Speedups.resolve(_cfg(liger="auto", compile="off"), CUDA)  # auto: off, silently
    auto.apply(tiny_llama(TINY_VOCAB), "student")
    assert auto.liger_version is None and auto.patched == [] and auto.line() is None
    assert auto.record() == {"compile": "off", "liger": "off"}


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in liger-kernel that knows Llama and records what it was asked to patch."""
    calls = []
    package = types.ModuleType("liger_kernel")
    transformers_part = types.ModuleType("liger_kernel.transformers")
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None}
    transformers_part._apply_liger_kernel_to_instance = lambda model, **kwargs: calls.append((model, kwargs))
    package.transformers, transformers_part.monkey_patch = transformers_part, monkey_patch
    for module in (package, transformers_part, monkey_patch):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls


def test_liger_patches_supported_models_without_its_loss(fake_liger, fake_compile):
    from transformers import GPT2Config, GPT2LMHeadModel

    s = Speedups.resolve(_cfg(liger="auto", compile="auto"), CUDA)
    student = tiny_llama(TINY_VOCAB)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=2))
    s.apply(student, "student")
    s.apply(teacher, "teacher")  # no kernels for gpt2: auto passes it over
    assert len(fake_liger) == 1 and fake_liger[0][0] is student
    kwargs = fake_liger[0][1]
    assert kwargs["fused_linear_cross_entropy"] is False and kwargs["cross_entropy"] is False
    assert kwargs["rms_norm"] and kwargs["rope"] and kwargs["swiglu"]
    assert s.record() == {"compile": "on", "liger": "student"}
    assert s.line() == (
        "models: torch.compile on (auto: CUDA); Liger kernels on for the student only (auto: CUDA, liger-kernel "
        f"{s.liger_version})"
    )
    with pytest.raises(LmdistillError, match=r"model.liger = on: .*'gpt2' \(the teacher\); set model.liger: off"):
        Speedups.resolve(_cfg(liger="on"), CUDA).apply(teacher, "teacher")


def test_liger_keeps_an_mlp_that_is_not_swiglu(fake_liger):
    Speedups.resolve(_cfg(liger="on", compile="off"), CUDA).apply(tiny_llama(TINY_VOCAB, hidden_act="gelu"), "student")
    assert fake_liger[0][1]["swiglu"] is False
