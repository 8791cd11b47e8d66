import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig, LorafitError
from lorafit.core.targeting import block_index, select_modules
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
    with pytest.raises(LorafitError, match="no default targets for model type None; set target_modules"):
        select_modules(nn.Sequential(nn.Linear(4, 4)), LoraConfig())


def test_second_adapter_sees_wrapped_modules_as_their_base_layer():
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(target_modules=["q_proj"]))
    assert select_modules(model, LoraConfig(target_modules=["q_proj", "k_proj"], layers=[0])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert torch.is_tensor(model.model.layers[0].self_attn.q_proj.weight)
