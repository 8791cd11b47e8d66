"""BitFit: only biases train; merging folds the offsets into the biases; files hold just the biases."""

import pytest
import torch
from safetensors.torch import load_file

import lorafit
from lorafit import BitFitConfig, LorafitError
from tests.conftest import tiny_gpt2, tiny_llama


def _randomize(model, seed=4):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".bitfit_bias" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def test_gpt2_trains_every_bias_and_nothing_else(input_ids):
    model = tiny_gpt2()
    bias_count = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    lorafit.attach(model, BitFitConfig())
    count = lorafit.trainable_parameters(model)
    assert count.trainable == count.adapter == bias_count  # BitFit's count: exactly the model's biases
    model(input_ids, labels=input_ids).loss.backward()
    assert all(".bitfit_bias." in n for n, p in model.named_parameters() if p.grad is not None)


def test_identity_at_init_merge_equals_unmerged_and_unmerge_restores(input_ids):
    model = tiny_gpt2()
    with torch.no_grad():
        base = model(input_ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lorafit.attach(model, BitFitConfig())
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base)
    _randomize(model)
    with torch.no_grad():
        unmerged = model(input_ids).logits
        lorafit.merge(model)
        assert (model(input_ids).logits - unmerged).abs().max().item() <= 1e-5
    lorafit.unmerge(model)
    for key, value in lorafit.unload(model).state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


def test_llama_has_no_biases_and_says_so():
    with pytest.raises(LorafitError, match="LlamaForCausalLM has no bias terms to train.*add_missing_bias"):
        lorafit.attach(tiny_llama(), BitFitConfig())
    with pytest.raises(LorafitError, match="model.layers.0.self_attn.q_proj has no bias \\(nor do 3 more"):
        lorafit.attach(tiny_llama(), BitFitConfig(target_modules=["q_proj", "up_proj"]))


def test_added_zero_biases_train_and_merge_into_new_bias_parameters(input_ids):
    model = tiny_llama()
    lorafit.attach(model, BitFitConfig(target_modules=["q_proj", "up_proj"], add_missing_bias=True))
    assert lorafit.trainable_parameters(model).trainable == 2 * (32 + 64)  # the paper's b_q and b_m2 subset
    _randomize(model)
    with torch.no_grad():
        unmerged = model(input_ids).logits
    plain = lorafit.merge_and_unload(model)
    assert plain.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        assert (plain(input_ids).logits - unmerged).abs().max().item() <= 1e-5


def test_file_holds_only_the_biases_and_round_trips(tmp_path, input_ids):
    model = lorafit.attach(tiny_gpt2(), BitFitConfig(target_modules=["c_attn", "c_fc"]))
    _randomize(model)
    lorafit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.endswith(".bias") for k in tensors) and len(tensors) == 4
    base = tiny_gpt2()
    expected = base.transformer.h[0].attn.c_attn.bias + model.transformer.h[0].attn.c_attn.bitfit_bias["default"]
    torch.testing.assert_close(tensors["base_model.model.transformer.h.0.attn.c_attn.bias"], expected.detach())
    loaded = lorafit.load_adapter(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        assert (loaded(input_ids).logits - model(input_ids).logits).abs().max().item() <= 1e-5


def test_trainable_head_trains_merges_and_round_trips(tmp_path, input_ids):
    """train_head: the head's weight as an offset; merged = unmerged; the file holds the trained weight."""
    model = tiny_llama()
    with torch.no_grad():
        base_logits = model(input_ids).logits
    head_weight = model.lm_head.weight.detach().clone()
    lorafit.attach(model, BitFitConfig(train_head=True))  # Llama: no biases, so the head alone
    assert lorafit.trainable_parameters(model).trainable == 64 * 32  # vocab × hidden
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base_logits)
    model(input_ids, labels=input_ids).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["lm_head.bitfit_weight.default"]
    with torch.no_grad():
        model.lm_head.bitfit_weight["default"].normal_(0, 0.3)
        unmerged = model(input_ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-2

    lorafit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["base_model.model.lm_head.weight"]
    torch.testing.assert_close(tensors["base_model.model.lm_head.weight"],
                               head_weight + model.lm_head.bitfit_weight["default"].detach())
    loaded = lorafit.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert (loaded(input_ids).logits - unmerged).abs().max().item() <= 1e-5
        lorafit.merge(model)
        assert (model(input_ids).logits - unmerged).abs().max().item() <= 1e-5
    lorafit.unmerge(model)
    torch.testing.assert_close(model.lm_head.base_layer.weight, head_weight, atol=1e-6, rtol=0)


def test_trainable_head_with_biases_and_a_tied_head(input_ids):
    model = tiny_gpt2()  # GPT-2's head shares its weight with the token embedding
    bias_count = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    lorafit.attach(model, BitFitConfig(train_head=True))
    assert lorafit.trainable_parameters(model).trainable == bias_count + model.lm_head.weight.numel()
    with pytest.raises(LorafitError, match="lm_head.weight is shared with transformer.wte.weight"):
        lorafit.merge(model)
