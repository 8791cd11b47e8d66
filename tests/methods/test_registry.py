"""The method registry: a new method is one module plus one `register` line, and the shared code does the rest.

This file is that module for a toy method, a learned scalar gate per layer: y = (1 + g) · (W x + b), g = 0 at
the start. Nothing else in lorafit knows about it, yet attach, save, load, merge and delete work for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import pytest
import torch
from torch import nn

import lorafit
from lorafit.core.base_layer import linear_base, linear_types
from lorafit.core.registry import Method
from lorafit.core.selection import Targets, check_selection
from lorafit.core.targeting import portable_targets, select_modules
from lorafit.core.wrapper import AdapterWrapper
from lorafit.methods import MethodEntry, entry_for, method_of, register, unregister
from tests.conftest import tiny_llama


@dataclass
class GateConfig:
    """A scalar gate on each target's output."""

    target_modules: Targets = None
    exclude_modules: Targets = None
    layers: list | int | None = None
    layers_pattern: str | list | None = None

    method = "gate"

    def __post_init__(self) -> None:
        check_selection(self)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class GatedLinear(AdapterWrapper):
    adapter_parameter_dicts = ("gate",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.base = linear_base(base_layer)
        self.gate = nn.ParameterDict()

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.adapters_disabled:
            return out
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                out = out * (1 + self.gate[name])
        return out

    def _scaled(self, name: str, factor: torch.Tensor) -> dict[str, torch.Tensor]:
        scaled = {"weight": self.base_layer.weight.float() * factor}
        if self.base_layer.bias is not None:
            scaled["bias"] = self.base_layer.bias.float() * factor
        return scaled

    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self._scaled(name, 1 + self.gate[name].detach().float())

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self._scaled(name, 1 / (1 + self.gate[name].detach().float()))

    def file_suffixes(self, name: str) -> dict[str, str]:
        return {"gate": "gate"}


def _add(wrapper, name, config, module_path, dtype, model) -> None:
    wrapper.gate[name] = nn.Parameter(torch.zeros((), dtype=dtype, device=wrapper.base.device))


def _file_config(model, config, paths, name):
    return {"peft_type": "GATE", **portable_targets(model, config, paths)}, {"toy_note": "gated"}


def _config_from_file(raw, metadata, where):
    assert metadata.get("toy_note") == "gated"  # the method's own metadata comes back to it
    return GateConfig(target_modules=raw["target_modules"], exclude_modules=raw.get("exclude_modules"),
                      layers=raw.get("layers_to_transform"))


METHOD = Method(
    name="gate", config_class=GateConfig, peft_type="GATE", wrappers=(GatedLinear,),
    select=lambda model, config: select_modules(model, config, allowed_types=linear_types()),
    wrap=GatedLinear, add=_add, file_config=_file_config, config_from_file=_config_from_file,
    file_keys=frozenset({"peft_type", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}),
    required_file_keys=("target_modules",),
)


@pytest.fixture
def gate_method():
    register(MethodEntry("gate", __name__))  # the one registry line
    yield
    unregister("gate")


def _set_gates(model, value: float) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".gate." in name:
                parameter.fill_(value)


def test_a_registered_toy_method_attaches_saves_loads_merges_and_deletes(gate_method, tmp_path, input_ids):
    model = tiny_llama()
    with torch.no_grad():
        base = model(input_ids).logits
    lorafit.attach(model, GateConfig(target_modules=["v_proj", "o_proj"]))
    assert method_of(model.lorafit_state.configs["default"]).name == "gate"
    assert lorafit.trainable_parameters(model).trainable == 4  # one scalar per layer, 2 targets × 2 layers
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base)  # g = 0: the base model
    _set_gates(model, 0.5)
    with torch.no_grad():
        gated = model(input_ids).logits
    assert not torch.allclose(gated, base)

    lorafit.save_adapter(model, tmp_path / "gate")
    config = json.loads((tmp_path / "gate" / "adapter_config.json").read_text())
    assert config["peft_type"] == "GATE" and config["target_modules"] == ["o_proj", "v_proj"]
    fresh = lorafit.load_adapter(tiny_llama(), tmp_path / "gate")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, gated, atol=1e-6, rtol=0)
        lorafit.merge(fresh)
        assert (fresh(input_ids).logits - gated).abs().max().item() <= 1e-5
    lorafit.unmerge(fresh)
    lorafit.delete_adapter(fresh, "default")
    with torch.no_grad():
        assert (fresh(input_ids).logits - base).abs().max().item() <= 1e-5
    assert not any(isinstance(m, GatedLinear) for m in fresh.modules())


def test_a_file_of_an_unregistered_method_is_refused_by_name(gate_method, tmp_path):
    model = lorafit.attach(tiny_llama(), GateConfig(target_modules=["v_proj"]))
    lorafit.save_adapter(model, tmp_path / "gate")
    unregister("gate")
    with pytest.raises(lorafit.LorafitError, match="peft_type 'GATE' is not supported"):
        lorafit.load_adapter(tiny_llama(), tmp_path / "gate")
    register(MethodEntry("gate", __name__))  # for the fixture's teardown


def test_a_name_is_registered_once():
    with pytest.raises(lorafit.LorafitError, match="'dora' is already registered"):
        register(MethodEntry("dora", "lorafit.methods.lora.method"))
    assert entry_for("dora").name == "lora"
    with pytest.raises(lorafit.LorafitError, match=r"method 'lorra' is unknown \(did you mean lora\?\)"):
        entry_for("lorra")
