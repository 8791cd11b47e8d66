"""peft as the oracle: adapters saved by lorafit load in peft and vice versa, with identical outputs."""

import json

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


# -- QLoRA: the same adapter files on a bitsandbytes nf4 base, both ways --------------------------------------
def _nf4_from_transformers(folder):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    from lorafit.models.quantize import keep_weights_as_trained

    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=settings, device_map={"": "cpu"}).eval()
    # Without this, on AVX512-BF16 CPUs bitsandbytes repacks the weights at the first eval-mode forward with
    # their scales rounded to bf16 (~1e-3 on these logits): another base than lorafit's, which never repacks.
    keep_weights_as_trained(model)
    return model


def _nf4_from_lorafit(folder):
    from lorafit.models.loading import load_model_and_tokenizer
    from lorafit.models.quantize import QuantizeSettings

    return load_model_and_tokenizer(folder, quantize=QuantizeSettings("nf4"), device="cpu")[0].eval()


def test_a_lorafit_adapter_trained_on_nf4_loads_in_peft_on_the_same_nf4_base(tmp_path, tiny_quantizable_chat_model):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    model = _nf4_from_lorafit(tiny_quantizable_chat_model)
    with torch.no_grad():
        base = model(ids).logits
    lorafit.attach(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, scale=0.3)
    lorafit.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"  # a plain peft LoRA file: nothing says "quantized"
    peft_model = peft.PeftModel.from_pretrained(_nf4_from_transformers(tiny_quantizable_chat_model), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    assert (ours - base).abs().max() > 1e-3
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_a_peft_qlora_adapter_loads_in_lorafit_on_the_same_nf4_base(tmp_path, tiny_quantizable_chat_model):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False)
    peft_model = peft.get_peft_model(_nf4_from_transformers(tiny_quantizable_chat_model), peft_config).eval()
    peft_model.save_pretrained(tmp_path / "qlora")
    model = lorafit.load_adapter(_nf4_from_lorafit(tiny_quantizable_chat_model), tmp_path / "qlora")
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    assert (ours - _nf4_from_lorafit(tiny_quantizable_chat_model)(ids).logits).abs().max() > 1e-3
    assert (ours - theirs).abs().max().item() <= TOLERANCE
