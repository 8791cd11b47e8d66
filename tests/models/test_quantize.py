"""A frozen base in 4/8 bits (bitsandbytes): the same weights as bitsandbytes' own path, exact gradients,
the base unchanged at init, every method on it, exact resume, honest merges, clear errors."""

import copy
import json
import sys

import pytest
import torch

import lorafit
from lorafit import LoraConfig, LorafitError
from lorafit.core.base_layer import linear_base
from lorafit.models.identity import fingerprint, mismatch
from lorafit.models.quantize import (
    QuantizeSettings,
    dequantize_model,
    quantization_of,
    quantize_model,
    quantize_report,
    quantized_layers,
)
from tests.conftest import QUANTIZABLE, randomize_adapters, tiny_llama

bnb = pytest.importorskip("bitsandbytes")

SETTINGS = [
    pytest.param(QuantizeSettings("nf4"), id="nf4"),
    pytest.param(QuantizeSettings("nf4", double_quant=True), id="nf4-double"),
    pytest.param(QuantizeSettings("fp4"), id="fp4"),
    pytest.param(QuantizeSettings("int8"), id="int8"),
]
# 4-bit layers dequantize their weight and run an fp32 matmul on CPU, as the dense layer does: the two
# differ only in summation order. LLM.int8() also rounds each input row to int8 (per-row absmax / 127)
# in its forward, so an int8 layer equals the dense one only to that rounding (its backward to the input
# is the dense one).
TOLERANCE = 1e-5
INT8_TOLERANCE = 1e-2


def _tolerance(settings) -> float:
    return INT8_TOLERANCE if settings.kind == "int8" else TOLERANCE


def _tiny(seed=0):
    return tiny_llama(seed, **QUANTIZABLE)


def _tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _quantized(settings, build=_tiny, seed=0):
    model = build(seed)
    quantize_model(model, settings)
    return model


@pytest.mark.parametrize("settings", SETTINGS)
def test_dense_weight_is_what_the_bitsandbytes_layer_multiplies_by(settings):
    model = _quantized(settings)
    layers = quantized_layers(model)
    assert len(layers) == 14  # 7 linear layers per block, 2 blocks; the head stays float
    assert type(model.lm_head) is torch.nn.Linear
    for path, layer in layers:
        view = linear_base(layer)
        eye = torch.eye(view.in_features)
        with torch.no_grad():  # bitsandbytes' own forward on the identity (exact in int8 too) gives Wᵀ (+ bias)
            through_layer = layer(eye) - (layer.bias if layer.bias is not None else 0)
        torch.testing.assert_close(view.dense_weight().T, through_layer, atol=TOLERANCE, rtol=0)
        # ...and it is the float weight up to the quantization error (~9% for NF4 on normal weights), not
        # something else (another random matrix would be ~1.4 away)
        original = _tiny(0).get_submodule(path).weight
        error = (view.dense_weight() - original).norm() / original.norm()
        assert 0 < error < (0.02 if settings.kind == "int8" else 0.15), path


def test_a_4bit_round_trip_is_bitsandbytes_own_dequantization():
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    model[0].weight.data.copy_(weight)

    class Wrapper(torch.nn.Module):  # quantize_model skips output heads; this one has none
        def __init__(self):
            super().__init__()
            self.body = model

    wrapped = Wrapper()
    quantize_model(wrapped, QuantizeSettings("nf4"))
    layer = wrapped.body[0]
    assert torch.equal(layer.weight.data, packed)
    assert torch.equal(linear_base(layer).dense_weight(), bnb.functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("settings", SETTINGS)
def test_quantize_model_gives_the_bytes_transformers_loading_gives(tmp_path, settings):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny(0).save_pretrained(tmp_path)
    if settings.kind == "int8":
        bnb_config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.kind,
                                        bnb_4bit_use_double_quant=settings.double_quant,
                                        bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config, device_map={"": "cpu"})
    ours = _quantized(settings)
    theirs = dict(quantized_layers(loaded))
    assert set(theirs) == {path for path, _ in quantized_layers(ours)}
    for path, layer in quantized_layers(ours):
        assert torch.equal(linear_base(layer).dense_weight(), linear_base(theirs[path]).dense_weight()), path
    assert quantization_of(loaded).same_format(settings)
    assert quantization_of(loaded).compute_dtype == torch.float32


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules="all-linear"),
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    lorafit.IA3Config(),
    lorafit.BitFitConfig(target_modules=["q_proj", "up_proj"], add_missing_bias=True),
], ids=["lora", "dora", "ia3", "bitfit"])
def test_every_method_starts_as_the_quantized_base_and_its_gradients_are_the_dense_ones(settings, config, input_ids):
    model = _quantized(settings)
    with torch.no_grad():
        base = model(input_ids).logits
    lorafit.attach(model, copy.deepcopy(config))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base)  # the adapter starts as the identity
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    dense = copy.deepcopy(model)
    assert dequantize_model(dense) == 14
    assert not quantized_layers(dense)
    labels = input_ids.clone()
    for network in (model, dense):
        network(input_ids, labels=labels).loss.backward()
    assert (model(input_ids).logits - base).abs().max() > 1e-3  # the update matters
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, parameter in dense.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, grads[name], atol=_tolerance(settings), rtol=1e-4)


def test_gpt2_conv1d_layers_quantize_and_carry_lora(input_ids):
    model = _quantized(QuantizeSettings("nf4"), build=_tiny_gpt2)
    assert len(quantized_layers(model)) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    with torch.no_grad():
        base = model(input_ids).logits
    lorafit.attach(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        unmerged = model(input_ids).logits
        assert (unmerged - base).abs().max() > 1e-3
        dequantize_model(model)
        torch.testing.assert_close(model(input_ids).logits, unmerged, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("settings", SETTINGS)
def test_merge_into_the_dequantized_base_reproduces_the_adapter_and_requantizing_is_refused(settings, input_ids):
    model = _quantized(settings)
    lorafit.attach(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, scale=0.05)
    packed_before = {p: layer.weight.data.clone() for p, layer in quantized_layers(model)}
    with torch.no_grad():
        unmerged = model(input_ids).logits
    with pytest.raises(LorafitError, match=r"is quantized: merging into it re-quantizes .*peft#2321"):
        lorafit.merge(model)
    assert all(torch.equal(layer.weight.data, packed_before[p]) for p, layer in quantized_layers(model))
    dequantize_model(model)
    merged = lorafit.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, unmerged, atol=_tolerance(settings), rtol=0)


def test_a_forced_requantizing_merge_runs_and_loses_part_of_a_small_update(input_ids):
    model = _quantized(QuantizeSettings("nf4"))
    with torch.no_grad():
        base = model(input_ids).logits
    lorafit.attach(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, scale=0.02)
    with torch.no_grad():
        unmerged = model(input_ids).logits
        merged_model = lorafit.merge_and_unload(model, requantize=True)
        merged = merged_model(input_ids).logits
    assert quantized_layers(merged_model)  # still 4-bit
    assert (merged - unmerged).abs().max() > 1e-3 * (unmerged - base).abs().max()  # not the adapter's outputs


def test_pissa_on_a_quantized_base_is_refused_by_module():
    model = _quantized(QuantizeSettings("nf4"))
    with pytest.raises(LorafitError, match=r"model.layers.0.self_attn.q_proj: init='pissa' .* re-quantizing"):
        lorafit.attach(model, LoraConfig(r=4, target_modules=["q_proj"], init="pissa"))
    assert not any(isinstance(m, lorafit.core.adapters.AdapterWrapper) for m in model.modules())


def test_training_on_a_quantized_base_is_deterministic_and_resumes_bit_for_bit(tmp_path):
    from lorafit.train.loop import LoopSettings, train
    from tests.conftest import random_examples

    def fresh():
        model = _quantized(QuantizeSettings("nf4", double_quant=True))
        torch.manual_seed(0)
        return lorafit.attach(model, LoraConfig(r=4, target_modules="all-linear", dropout=0.1))

    def run(folder, resume=None):
        model = fresh()
        settings = LoopSettings(steps=6, batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=1, save_every=3)
        result = train(model, random_examples(16, lengths=(4, 16)), settings, folder, pad_id=0, vocab_size=64,
                       resume=resume, echo=lambda _: None)
        return result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_adapter = run(tmp_path / "full")
    again, _ = run(tmp_path / "again")
    assert again.losses == full.losses
    assert full.losses[-1] < full.losses[0]
    resumed, resumed_adapter = run(tmp_path / "again", resume=tmp_path / "again" / "checkpoints" / "step-000003")
    assert resumed.losses == full.losses[3:]
    assert all(torch.equal(resumed_adapter[n], v) for n, v in full_adapter.items())


def test_counts_and_report_see_the_logical_weights():
    float_model, quantized = _tiny(0), _quantized(QuantizeSettings("nf4"))
    assert lorafit.trainable_parameters(quantized).total == lorafit.trainable_parameters(float_model).total
    report = quantize_report(quantized)
    assert report.quantized == 14
    assert report.left_in_float == ["embeddings", "output head", "norms"]
    assert report.weight_bytes_now < report.weight_bytes_float
    assert "quantized 14 linear layers to nf4; left in float: embeddings, output head, norms" in report.summary()


def test_the_fingerprint_knows_the_same_base_in_float_and_in_4bit_and_refuses_another():
    quantized = fingerprint(_quantized(QuantizeSettings("nf4")))
    assert "model.layers.0.self_attn.q_proj.weight" in quantized["quantized"]
    assert mismatch(quantized, _tiny(0)) is None
    assert mismatch(fingerprint(_tiny(0)), _quantized(QuantizeSettings("nf4"))) is None
    assert mismatch(quantized, _quantized(QuantizeSettings("nf4"))) is None
    assert "differs" in mismatch(quantized, _tiny(1))


def test_on_cpu_4bit_layers_whose_input_size_is_not_a_multiple_of_64_stay_float():
    model = tiny_llama(0)  # hidden 32: only down_proj (64 inputs) can be 4-bit here
    report = quantize_model(model, QuantizeSettings("nf4"))
    assert [path for path, _ in quantized_layers(model)] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert report.left_in_float[-1] == ("12 other linear layers (12 with an input size not a multiple of 64, which "
                                        "bitsandbytes' CPU 4-bit kernel dequantizes wrongly)")
    int8 = tiny_llama(0)
    quantize_model(int8, QuantizeSettings("int8"))  # one scale per row, no blocks: every layer
    assert len(quantized_layers(int8)) == 14


def test_quantizing_twice_or_after_attach_is_refused():
    model = _quantized(QuantizeSettings("nf4"))
    with pytest.raises(LorafitError, match="already quantized"):
        quantize_model(model, QuantizeSettings("nf4"))
    attached = lorafit.attach(_tiny(), LoraConfig(r=2))
    with pytest.raises(LorafitError, match="before attaching adapters"):
        quantize_model(attached, QuantizeSettings("nf4"))
    with pytest.raises(LorafitError, match="double quantization applies to 4-bit"):
        QuantizeSettings("int8", double_quant=True)
    with pytest.raises(LorafitError, match="unknown quantization 'nf3'"):
        QuantizeSettings("nf3")


def test_missing_bitsandbytes_is_one_line_with_the_install_command(monkeypatch):
    from lorafit.models.quantize import import_bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(LorafitError, match=r"needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        import_bitsandbytes()


# -- loading: a float folder quantized as it loads, a bitsandbytes folder as it is, others refused -----------
def test_a_float_folder_loads_quantized_and_a_saved_4bit_folder_loads_as_it_is(tmp_path, tiny_quantizable_chat_model):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorafit.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_quantizable_chat_model, quantize=QuantizeSettings("nf4", double_quant=True))
    assert quantization_of(model).to_record() == {"kind": "nf4", "double_quant": True, "dtype": "float32"}
    # read one tensor at a time (lorafit.models.quantized_load), and the same bytes as transformers' own load
    theirs = AutoModelForCausalLM.from_pretrained(tiny_quantizable_chat_model, device_map={"": "cpu"},
                                                  quantization_config=BitsAndBytesConfig(
                                                      load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.float32))
    for path, layer in quantized_layers(theirs):
        assert torch.equal(linear_base(layer).dense_weight(), linear_base(model.get_submodule(path)).dense_weight())
    assert len(quantized_layers(theirs)) == len(quantized_layers(model)) == 14
    assert model.name_or_path == str(tiny_quantizable_chat_model)
    assert getattr(model.get_submodule("model.layers.0.self_attn.q_proj"), "support_avx512bf16_for_cpu") is False
    model.save_pretrained(tmp_path / "bnb-4bit")
    (tmp_path / "bnb-4bit" / "tokenizer.json").write_bytes((tiny_quantizable_chat_model / "tokenizer.json").read_bytes())
    (tmp_path / "bnb-4bit" / "tokenizer_config.json").write_bytes((tiny_quantizable_chat_model / "tokenizer_config.json").read_bytes())
    again, _ = load_model_and_tokenizer(tmp_path / "bnb-4bit")
    assert quantization_of(again).to_record() == {"kind": "nf4", "double_quant": True, "dtype": "float32"}
    for path, layer in quantized_layers(model):
        assert torch.equal(linear_base(layer).dense_weight(), linear_base(again.get_submodule(path)).dense_weight())
    with pytest.raises(LorafitError, match=r"is already quantized \(nf4 \+ double quantization\); it cannot be "
                                           r"loaded as int8"):
        load_model_and_tokenizer(tmp_path / "bnb-4bit", quantize=QuantizeSettings("int8"))


def test_a_folder_in_another_quantization_format_is_refused_naming_it(tmp_path, tiny_quantizable_chat_model):
    from lorafit.models.loading import load_model_and_tokenizer

    folder = tmp_path / "gptq"
    folder.mkdir()
    for item in tiny_quantizable_chat_model.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorafitError, match=r"config.json: quantization_config.quant_method is 'gptq', which lorafit "
                                           r"does not read"):
        load_model_and_tokenizer(folder)
