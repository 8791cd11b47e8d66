import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig, LorafitError
from lorafit.core.targeting import block_index, select_modules, short_names
from tests.conftest import tiny_gpt2, tiny_llama


def test_default_targets_for_llama_are_q_and_v():
    paths = select_modules(tiny_llama(), LoraConfig())
    assert paths == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_suffix_entries_and_exact_paths():
    model = tiny_llama()
    assert select_modules(model, LoraConfig(target_modules=["self_attn.o_proj"])) == [
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert select_modules(model, LoraConfig(target_modules=["model.layers.1.mlp.up_proj"])) == [
        "model.layers.1.mlp.up_proj"]


def test_regex_must_match_the_full_path():
    model = tiny_llama()
    assert select_modules(model, LoraConfig(target_modules=r".*\.1\.self_attn\.(k|v)_proj")) == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(LorafitError, match="matches no module path"):
        select_modules(model, LoraConfig(target_modules=r"q_proj"))  # a suffix is not a full match


def test_all_linear_leaves_out_the_output_head():
    model = tiny_llama()
    paths = select_modules(model, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in paths and len(paths) == 2 * 7
    gpt2_paths = select_modules(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in gpt2_paths
    assert {p.rsplit(".", 1)[-1] for p in gpt2_paths} == {"c_attn", "c_proj", "c_fc"}


def test_layers_and_exclude():
    model = tiny_llama()
    assert select_modules(model, LoraConfig(target_modules=["q_proj", "v_proj"], layers=[1])) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert select_modules(model, LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(LorafitError, match="layers=\\[5\\] leaves no target module"):
        select_modules(model, LoraConfig(target_modules=["q_proj"], layers=[5]))
    with pytest.raises(LorafitError, match="exclude_modules removes every target"):
        select_modules(model, LoraConfig(target_modules=["q_proj"], exclude_modules="model.*"))


def test_block_index():
    assert block_index("model.layers.12.mlp.up_proj", None) == 12
    assert block_index("transformer.h.3.attn.c_attn", ["h"]) == 3
    assert block_index("lm_head", None) is None


def test_an_entry_that_matches_nothing_names_the_closest_modules():
    with pytest.raises(LorafitError) as err:
        select_modules(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_prj"]))
    message = str(err.value)
    assert "target 'v_prj' matches no module of LlamaForCausalLM" in message
    assert "v_proj" in message.split("closest names:")[1]


def test_a_container_module_is_refused_with_its_inner_layers_named():
    with pytest.raises(LorafitError) as err:
        select_modules(tiny_llama(), LoraConfig(target_modules=["self_attn"]))
    assert "is a LlamaAttention" in str(err.value) and "q_proj" in str(err.value)


def test_unknown_architecture_without_targets_asks_for_them():
    with pytest.raises(LorafitError) as err:
        select_modules(nn.Sequential(nn.Linear(4, 4)), LoraConfig())
    assert str(err.value).startswith("no default targets for model type None: no linear layers named like "
                                     "attention's query and value projections (q_proj/v_proj, query/value")
    assert str(err.value).endswith("--targets (target_modules; linear layers here: 0) or use --targets all-linear")


class _Attention(nn.Module):
    def __init__(self, names):
        super().__init__()
        for name in names:
            setattr(self, name, nn.Linear(4, 4))


@pytest.mark.parametrize(("names", "chosen"), [(("q_proj", "k_proj", "v_proj"), ["q_proj", "v_proj"]),
                                               (("query", "key", "value"), ["query", "value"]),
                                               (("Wqkv", "out_proj"), ["Wqkv"]), (("W_pack", "o_proj"), ["W_pack"])])
def test_default_targets_come_from_module_names_not_a_table_of_model_types(names, chosen):
    model = nn.Module()
    model.config = type("Config", (), {"model_type": "a-family-lorafit-never-heard-of"})()
    model.layers = nn.ModuleList([_Attention(names) for _ in range(2)])
    assert short_names(select_modules(model, LoraConfig())) == sorted(chosen)


class _Router(nn.Linear):
    """A Linear subclass whose forward returns two tensors, as Llama 4's MoE router does."""

    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


class _WrittenOutLinear(nn.Linear):
    """A Linear subclass that computes the same product in a forward of its own (Falcon's FalconLinear)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_a_linear_subclass_is_adapted_when_it_computes_a_product_and_refused_when_not():
    model = nn.Module()
    model.block = nn.ModuleDict({"router": _Router(8, 4), "fused": _WrittenOutLinear(8, 8), "up": nn.Linear(8, 8)})
    assert select_modules(model, LoraConfig(target_modules="all-linear")) == ["block.fused", "block.up"]
    with pytest.raises(LorafitError) as err:
        select_modules(model, LoraConfig(target_modules=["router"]))
    assert str(err.value) == ("target module 'block.router' is a _Router, a Linear subclass with a forward of its own "
                              "(a router?), which adapters cannot add to")


def test_second_adapter_sees_wrapped_modules_as_their_base_layer():
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(target_modules=["q_proj"]))
    assert select_modules(model, LoraConfig(target_modules=["q_proj", "k_proj"], layers=[0])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert torch.is_tensor(model.model.layers[0].self_attn.q_proj.weight)
