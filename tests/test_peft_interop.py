"""peft as the oracle: adapters saved by lorafit load in peft and vice versa, with identical outputs."""

import pytest
import torch

import lorafit
from lorafit import FusedSlices, LoraConfig
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama, tiny_neox

peft = pytest.importorskip("peft")

CASES = [
    pytest.param(tiny_llama, dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), id="llama-qv"),
    pytest.param(tiny_llama, dict(r=4, alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2},
                                  alpha_pattern={"o_proj": 3}, use_rslora=True), id="llama-all-linear-patterns"),
    pytest.param(tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"], layers=[1]), id="llama-layers"),
    pytest.param(tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"]), id="llama-embedding"),
    pytest.param(tiny_gpt2, dict(r=4, alpha=8, target_modules=["c_attn", "c_fc"]), id="gpt2-conv1d"),
]

TOLERANCE = 1e-5  # fp32; the two libraries order the scaling multiply differently


@pytest.mark.parametrize("build, config", CASES)
def test_lorafit_adapter_loads_in_peft_with_identical_outputs(tmp_path, input_ids, build, config):
    model = build()
    lorafit.attach(model, LoraConfig(**config))
    randomize_adapters(model, scale=0.3)
    lorafit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        ours, theirs = model(input_ids).logits, peft_model(input_ids).logits
    assert (ours - build()(input_ids).logits).abs().max() > 1e-3  # the adapter matters
    assert (ours - theirs).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("build, config", CASES)
def test_peft_adapter_loads_in_lorafit_with_identical_outputs(tmp_path, input_ids, build, config):
    peft_config = peft.LoraConfig(
        r=config.get("r", 8), lora_alpha=config.get("alpha", 16), target_modules=config["target_modules"],
        rank_pattern=config.get("rank_pattern", {}), alpha_pattern=config.get("alpha_pattern", {}),
        use_rslora=config.get("use_rslora", False), layers_to_transform=config.get("layers"),
        init_lora_weights=False,  # random B: a zero adapter would prove nothing
    )
    peft_model = peft.get_peft_model(build(), peft_config).eval()
    peft_model.save_pretrained(tmp_path)
    model = lorafit.load_adapter(build(), tmp_path)
    with torch.no_grad():
        ours, theirs = model(input_ids).logits, peft_model(input_ids).logits
    assert (theirs - build()(input_ids).logits).abs().max() > 1e-3
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    # merged by lorafit == peft's merged model
    with torch.no_grad():
        ours_merged = lorafit.merge_and_unload(model)(input_ids).logits
        theirs_merged = peft_model.merge_and_unload()(input_ids).logits
    assert (ours_merged - theirs_merged).abs().max().item() <= TOLERANCE


def test_fused_slice_adapter_is_exported_as_an_exact_full_lora_for_peft(tmp_path, input_ids):
    model = tiny_neox()
    slices = FusedSlices(names=("q", "k", "v") * 4, sizes=(8,) * 12, adapt=("q", "v"))
    lorafit.attach(model, LoraConfig(r=2, alpha=6, target_modules=["query_key_value"],
                                     fused_slices={"query_key_value": slices}))
    randomize_adapters(model)
    lorafit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_neox(), tmp_path).eval()
    with torch.no_grad():
        assert (model(input_ids).logits - peft_model(input_ids).logits).abs().max().item() <= TOLERANCE
