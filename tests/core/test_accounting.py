"""Parameter accounting, including the seed's llama-7B figures on a meta-device model."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lorafit
from lorafit import LoraConfig
from tests.conftest import tiny_llama


def llama_7b_on_meta():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_the_seed_figures_for_llama_7b_come_out_exactly():
    model = llama_7b_on_meta()
    assert lorafit.trainable_parameters(model).total == 6_738_415_616
    lorafit.attach(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    count = lorafit.trainable_parameters(model)
    assert (count.base, count.adapter, count.trainable) == (6_738_415_616, 4_194_304, 4_194_304)
    assert round(100 * count.adapter / count.base, 3) == 0.062
    assert lorafit.report(model) == (
        "trainable 4,194,304 / 6,742,609,920 (0.062%) · base 6,738,415,616 · adapter 4,194,304")
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].is_meta


def test_counts_follow_the_formula_r_times_in_plus_out():
    model = tiny_llama()  # q: 32->32, v: 32->16 (2 kv heads of 8)
    lorafit.attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    count = lorafit.trainable_parameters(model)
    assert count.adapter == count.trainable == expected
    assert count.base == sum(p.numel() for p in tiny_llama().parameters())


def test_inactive_adapters_count_as_adapter_but_not_trainable():
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lorafit.attach(model, LoraConfig(r=2, target_modules=["q_proj"]), "b")
    count = lorafit.trainable_parameters(model)
    assert count.adapter == 2 * (4 * 64 + 2 * 64) and count.trainable == 2 * 2 * 64
