"""Every registered method, the toy one of test_registry.py included, through the same checks: what each
declares in the registry (merging, a llama.cpp adapter form, per-row serving, FSDP, the ranges of its flags)
is what the shared code then does with it. A method registered without an example here fails the first test.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import lorafit
from lorafit.core.adapters import state_of, wrappers
from lorafit.core.registry import MethodEntry, check_ranges, entries, entry_for, method_of, register, unregister
from lorafit.core.wrapper import AdapterWrapper
from lorafit.errors import LorafitError
from tests.conftest import tiny_llama
from tests.methods.test_registry import GateConfig

# One adapter config per --method spelling (and the toy gate), small enough for tiny_llama.
EXAMPLES = {
    "lora": lambda: lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "dora": lambda: lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    "ia3": lambda: lorafit.IA3Config(),
    "bitfit": lambda: lorafit.BitFitConfig(target_modules=["q_proj", "down_proj"], add_missing_bias=True),
    "gate": lambda: GateConfig(target_modules=["v_proj", "o_proj"]),
}


@pytest.fixture(autouse=True)
def gate_method():
    register(MethodEntry("gate", "tests.methods.test_registry"))
    yield
    unregister("gate")


def _spellings() -> list[str]:
    register(MethodEntry("gate", "tests.methods.test_registry"))
    try:
        return [spelling for entry in entries() for spelling in entry.spellings]
    finally:
        unregister("gate")


SPELLINGS = _spellings()


def test_every_registered_method_has_an_example_here():
    assert set(SPELLINGS) <= set(EXAMPLES), f"add an example config for {sorted(set(SPELLINGS) - set(EXAMPLES))}"
    assert "gate" in SPELLINGS  # the toy method takes part like the built-in ones


def _randomize(model, seed: int = 3) -> None:
    """Every adapter tensor random (near its start), so no check passes because an update is zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, wrapper in wrappers(model):
            for dict_name in wrapper.adapter_parameter_dicts:
                for parameter in getattr(wrapper, dict_name).values():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_attach_save_load_merge_delete(spelling, tmp_path, input_ids):
    model = tiny_llama()
    base = _logits(model, input_ids)
    lorafit.attach(model, EXAMPLES[spelling]())
    torch.testing.assert_close(_logits(model, input_ids), base, atol=1e-6, rtol=0)  # starts as the base model
    _randomize(model)
    adapted = _logits(model, input_ids)
    assert (adapted - base).abs().max().item() > 1e-3

    lorafit.save_adapter(model, tmp_path / spelling)
    fresh = lorafit.load_adapter(tiny_llama(), tmp_path / spelling)
    torch.testing.assert_close(_logits(fresh, input_ids), adapted, atol=1e-5, rtol=0)
    method = method_of(state_of(fresh).configs["default"])
    if method.merges:
        lorafit.merge(fresh)
        assert (_logits(fresh, input_ids) - adapted).abs().max().item() <= 1e-5  # fp32: merged = unmerged
        lorafit.unmerge(fresh)
    lorafit.delete_adapter(fresh, "default")
    assert (_logits(fresh, input_ids) - base).abs().max().item() <= 1e-5
    assert not any(isinstance(m, AdapterWrapper) for m in fresh.modules())


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_llama_cpp_adapter_form_is_what_the_method_declares(spelling, tmp_path):
    from lorafit.formats.gguf_lora import lora_pairs
    from lorafit.formats.peft import KEY_PREFIX, read_adapter

    model = lorafit.attach(tiny_llama(), EXAMPLES[spelling]())
    _randomize(model)
    lorafit.save_adapter(model, tmp_path / spelling)
    raw, config, tensors = read_adapter(tmp_path / spelling)
    method = method_of(config)
    refusal = method.gguf_adapter(config) if method.gguf_adapter else f"a {method.name} adapter"
    if refusal:
        with pytest.raises(LorafitError, match=re.escape(refusal) + ".*has no llama.cpp adapter form"):
            lora_pairs(raw, config, tensors, tmp_path, KEY_PREFIX)
    else:
        pairs = lora_pairs(raw, config, tensors, tmp_path, KEY_PREFIX)
        assert sorted(p.module_path for p in pairs) == sorted(state_of(model).module_paths["default"])


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_per_row_serving_is_what_the_method_declares(spelling, input_ids):
    model = tiny_llama()
    lorafit.attach(model, EXAMPLES[spelling](), "a")
    _randomize(model, seed=4)
    config = state_of(model).configs["a"]
    method = method_of(config)
    refusal = method.per_row(config) if method.per_row else "adapter_per_row serves plain LoRA adapters only"
    if refusal:
        with pytest.raises(LorafitError, match=re.escape(refusal)):
            with lorafit.adapter_per_row(model, ["a", "a"]):
                pass
        return
    alone = _logits(model, input_ids)
    with lorafit.adapter_per_row(model, ["a", "a"]):
        torch.testing.assert_close(_logits(model, input_ids), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("entry", entries(), ids=lambda e: e.name)
def test_fsdp_refuses_exactly_the_methods_that_declare_it(entry):
    from lorafit.train.fsdp import check_fsdp_settings

    if entry.fsdp_refusal:
        with pytest.raises(LorafitError, match=re.escape(f"--strategy fsdp with {entry.title}: {entry.fsdp_refusal}")):
            check_fsdp_settings(quantized=False, compile=False, method=entry)
    else:
        check_fsdp_settings(quantized=False, compile=False, method=entry)


# A value outside each rule a method's option may declare.
OUT_OF_RANGE = {">= 1": 0, "> 0": float("inf"), "[0, 1)": 1.0}


@pytest.mark.parametrize("entry", entries(), ids=lambda e: e.name)
def test_every_declared_range_is_checked(entry):
    ranges = getattr(entry.options, "RANGES", {})
    defaults = entry.options() if entry.options else None
    check_ranges(defaults)  # the defaults are in range
    for name, rule in ranges.items():
        with pytest.raises(LorafitError, match=f"--{name.replace('_', '-')} must"):
            check_ranges(dataclasses.replace(defaults, **{name: OUT_OF_RANGE[rule]}))


def test_the_train_flags_build_the_config_each_method_declares():
    """`lorafit train --method X` attaches what the registry's from_options makes of X's flags."""
    from lorafit.recipes.train_settings import TrainConfig, adapter_config

    for entry in entries():
        if entry.load().from_options is None:
            continue  # a method without flags (the toy gate) is attached from the library only
        for spelling in entry.spellings:
            extra = {"add_missing_bias": True, "targets": ["q_proj"]} if spelling == "bitfit" else {}
            config = adapter_config(TrainConfig(method=spelling, **extra))
            assert method_of(config).name == entry.name
            assert entry_for(spelling) is entry
