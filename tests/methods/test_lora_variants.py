"""DoRA and PiSSA, the LoRA variants: their formulas, merging, and files peft reads."""

import copy

import pytest
import torch

import lorafit
from lorafit import LoraConfig, LorafitError
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _train_a_little(model, input_ids, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


# -- DoRA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_dora_magnitude_starts_at_the_row_norms_and_the_model_at_the_base(build, targets, input_ids):
    model = build()
    with torch.no_grad():
        base = model(input_ids).logits
    lorafit.attach(model, LoraConfig(r=4, target_modules=targets, use_dora=True))
    layer = next(m for m in model.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector)
    weight = layer.base_layer.weight
    linear = weight.T if layer.fan_in_fan_out else weight
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], linear.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base, atol=1e-5, rtol=1e-5)


def test_dora_forward_is_the_papers_formula_with_a_detached_norm():
    model = lorafit.attach(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True))
    randomize_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    a, b, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    x = torch.randn(3, 32)
    adapted = layer.base_layer.weight + 2.0 * b @ a
    expected = x @ (m[:, None] * adapted / adapted.norm(dim=1, keepdim=True).detach()).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # detached: the gradient reaching A is what a constant norm gives
    grad_ours = torch.autograd.grad(layer(x).sum(), a)[0]
    grad_expected = torch.autograd.grad(expected.sum(), a)[0]
    torch.testing.assert_close(grad_ours, grad_expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("build, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_dora_merge_equals_unmerged_and_unmerge_restores(build, targets, input_ids):
    model = build()
    weights = copy.deepcopy(model.state_dict())
    lorafit.attach(model, LoraConfig(r=4, target_modules=targets, use_dora=True))
    randomize_adapters(model, scale=0.2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "magnitude" in name:
                parameter.mul_(1.3)
        unmerged = model(input_ids).logits
        lorafit.merge(model)
        assert (model(input_ids).logits - unmerged).abs().max().item() <= 1e-5
    lorafit.unmerge(model)
    for key, value in lorafit.unload(model).state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_dora_files_move_to_peft_and_back(build, targets, tmp_path, input_ids):
    model = _train_a_little(lorafit.attach(build(), LoraConfig(r=4, target_modules=targets, use_dora=True)),
                            input_ids)
    lorafit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (theirs(input_ids).logits - model(input_ids).logits).abs().max().item() <= 1e-5
    peft_model = _train_a_little(peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=targets,
                                                                               use_dora=True)), input_ids)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lorafit.load_adapter(build(), tmp_path / "peft")
    with torch.no_grad():
        assert (loaded(input_ids).logits - peft_model(input_ids).logits).abs().max().item() <= 1e-5
        assert (loaded(input_ids).logits - build()(input_ids).logits).abs().max() > 1e-3


def test_dora_on_an_embedding_is_refused():
    with pytest.raises(LorafitError, match="embed_tokens is an embedding: fused_slices, DoRA and PiSSA apply to linear"):
        lorafit.attach(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], use_dora=True))


# -- PiSSA -----------------------------------------------------------------------------------------
def test_pissa_starts_from_the_top_singular_vectors_and_leaves_the_output_unchanged(input_ids):
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        base = model(input_ids).logits
    lorafit.attach(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    top = torch.linalg.svd(original).S[:4]
    delta = 2.0 * layer.lora_B["default"] @ layer.lora_A["default"]
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], top, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.base_layer.weight + delta, original, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base, atol=1e-4, rtol=1e-4)


def test_pissa_is_saved_as_a_plain_lora_for_the_untouched_base(tmp_path, input_ids):
    model = _train_a_little(lorafit.attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    init="pissa")), input_ids)
    with torch.no_grad():
        trained = model(input_ids).logits
    lorafit.save_adapter(model, tmp_path)
    ours = lorafit.load_adapter(tiny_llama(), tmp_path)  # a plain rank-8 LoRA on the original weights
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert (ours(input_ids).logits - trained).abs().max().item() <= 1e-4
        assert (theirs(input_ids).logits - trained).abs().max().item() <= 1e-4
        merged = lorafit.merge_and_unload(model)(input_ids).logits
        assert (merged - trained).abs().max().item() <= 1e-4


def test_unloading_or_deleting_a_pissa_adapter_gives_back_the_original_weights():
    original = tiny_llama().state_dict()
    for remove in (lorafit.unload, lambda m: lorafit.delete_adapter(m, "default")):
        model = lorafit.attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init="pissa"))
        remove(model)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, original[key], atol=1e-5, rtol=1e-5)
