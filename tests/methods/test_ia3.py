"""IA3: identity at init, merge = unmerged, the paper's shapes and counts, peft files both ways."""

import pytest
import torch

import lorafit
from lorafit import IA3Config, LorafitError
from lorafit.methods.ia3 import IA3Linear
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _randomize(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ia3_l" in name:
                parameter.copy_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_identity_at_init_then_merge_equals_unmerged_and_unmerge_restores(build, input_ids):
    model = build()
    with torch.no_grad():
        base = model(input_ids).logits
        weights = {k: v.clone() for k, v in model.state_dict().items()}
    lorafit.attach(model, IA3Config())
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base)
    _randomize(model)
    with torch.no_grad():
        unmerged = model(input_ids).logits
        assert (unmerged - base).abs().max() > 1e-3
        lorafit.merge(model)
        assert (model(input_ids).logits - unmerged).abs().max().item() <= 1e-5
        lorafit.unmerge(model)
    restored = lorafit.unload(model).state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(restored[key], value, atol=1e-5, rtol=1e-5)


def test_llama_defaults_are_the_papers_k_v_and_feedforward_input():
    model = lorafit.attach(tiny_llama(), IA3Config())
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, IA3Linear) and isinstance(layer.mlp.down_proj, IA3Linear)
    assert layer.self_attn.k_proj.ia3_l["default"].shape == (16, 1)  # l_k scales k_proj's output
    assert layer.mlp.down_proj.ia3_l["default"].shape == (1, 64)  # l_ff scales down_proj's input
    # the paper's count: per block, d_k + d_v + d_ff
    assert lorafit.trainable_parameters(model).trainable == 2 * (16 + 16 + 64)


def test_feedforward_scales_the_input_and_others_the_output():
    model = lorafit.attach(tiny_llama(), IA3Config())
    _randomize(model)
    down, k = model.model.layers[0].mlp.down_proj, model.model.layers[0].self_attn.k_proj
    h, x = torch.randn(3, 64), torch.randn(3, 32)
    torch.testing.assert_close(down(h), down.base_layer(h * down.ia3_l["default"].flatten()))
    torch.testing.assert_close(k(x), k.base_layer(x) * k.ia3_l["default"].flatten())


def test_feedforward_modules_must_be_targets():
    with pytest.raises(LorafitError, match="feedforward_modules \\['up_proj'\\] matches none of the IA3 targets"):
        lorafit.attach(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=["up_proj"]))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_lorafit_ia3_loads_in_peft_and_back(build, tmp_path, input_ids):
    model = lorafit.attach(build(), IA3Config())
    _randomize(model)
    lorafit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (theirs(input_ids).logits - model(input_ids).logits).abs().max().item() <= 1e-5
    # and peft's own file into lorafit
    peft_model = peft.get_peft_model(build(), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"] if build is tiny_llama else ["c_attn", "mlp.c_proj"],
        feedforward_modules=["down_proj"] if build is tiny_llama else ["mlp.c_proj"], init_ia3_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lorafit.load_adapter(build(), tmp_path / "peft")
    with torch.no_grad():
        assert (loaded(input_ids).logits - peft_model(input_ids).logits).abs().max().item() <= 1e-5
        assert (loaded(input_ids).logits - build()(input_ids).logits).abs().max() > 1e-3


def test_unmerging_a_zero_vector_is_refused():
    model = lorafit.attach(tiny_llama(), IA3Config())
    lorafit.merge(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.ia3_l["default"][0] = 0.0
    with pytest.raises(LorafitError, match="NaN/Inf"):
        lorafit.unmerge(model)


def test_ia3_and_lora_cannot_share_a_module():
    model = lorafit.attach(tiny_llama(), IA3Config())
    with pytest.raises(LorafitError, match="already carries a IA3Linear adapter; one method per module"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["k_proj"]), "lora")
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"]), "lora")  # other modules are fine
    randomize_adapters(model)
