"""GGUF export checked without llama.cpp: what the files hold, read back with gguf-py and transformers.

llama.cpp itself checks the same files in test_in_llama_cpp.py.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafit.cli.main import main
from lorafit.formats.gguf_layout import layout_of, reorder_rotary_rows
from lorafit.models.gguf_cache import default_model_path
from tests.formats.conftest import lorafit_model, make_adapter

PROMPT = "Rewrite the date in ISO 8601: 17 March 2021, then 5 Jan 1999."


def export(*args) -> int:
    return main(["export", *map(str, args)])


def tensors_of(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_the_rotary_row_order_is_the_one_transformers_undoes_when_it_reads_a_gguf():
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    rows = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)  # 4 heads of 16 rows
    reordered = reorder_rotary_rows(rows, heads=4)
    assert not np.array_equal(reordered, rows) and sorted(reordered[:, 0]) == sorted(rows[:, 0])
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 4, "num_key_value_heads": 4})
    assert np.array_equal(processor._reverse_permute_weights(reordered, 4, 4), rows)


# relative to the largest logit; f16 measured 0.73% on this model (a 10-bit mantissa per weight, 2 layers)
@pytest.mark.parametrize("outtype, tolerance", [("f32", 1e-5), ("f16", 1.5e-2)])
def test_a_merged_transformers_folder_reloads_in_transformers_as_base_plus_adapter(tiny_smollm, tmp_path, outtype,
                                                                                   tolerance):
    adapter = make_adapter(tiny_smollm, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "gate_proj", "down_proj"])
    output = tmp_path / "merged.gguf"
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", outtype, "--output", output) == 0
    model, tokenizer = lorafit_model(tiny_smollm, adapter)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=output.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = model(ids).logits, back(ids).logits
        with __import__("lorafit").disable_adapters(model):
            base = model(ids).logits
    assert float((expected - base).abs().max()) > 0.5  # the adapter changes the output: the check below means something
    assert float((got - expected).abs().max()) <= tolerance * float(expected.abs().max())


def _delta_from_gguf(tensors: dict, name: str, scale: float, embedding: bool) -> np.ndarray:
    a, b = (np.array(tensors[f"{name}.lora_{x}"].data, dtype=np.float32) for x in "ab")
    return scale * (a @ b.T if embedding else b @ a)


@pytest.mark.parametrize("settings, folded", [
    ({}, False),
    ({"use_rslora": True}, False),  # one rank: alpha' = s·r gives llama.cpp's alpha'/r = alpha/sqrt(r) exactly
    ({"use_rslora": True, "rank_pattern": {"k_proj": 2}}, True),
    ({"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3.0}}, True),
    ({"target_modules": ["q_proj", "embed_tokens", "lm_head"]}, False),
])
def test_the_adapter_file_holds_each_modules_exact_update_in_llama_cpps_layout(tiny_smollm, tmp_path, settings,
                                                                               folded):
    adapter = make_adapter(tiny_smollm, tmp_path / "adapter", **settings)
    output = tmp_path / "adapter.gguf"
    assert export("--adapter", adapter, "--outtype", "f32", "--output", output) == 0
    reader = gguf.GGUFReader(output)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert (alpha == 0) == folded
    tensors = {t.name: t for t in reader.tensors}

    model, _ = lorafit_model(tiny_smollm, adapter)
    layout = layout_of(model.config)
    from lorafit.core.adapters import wrappers

    checked = 0
    for path, wrapper in wrappers(model):
        name = layout.gguf_name(path + ".weight")
        embedding = path.endswith("embed_tokens")
        rank = tensors[f"{name}.lora_b"].data.shape[-1]
        scale = alpha / rank if alpha else 1.0  # what llama.cpp applies
        expected = wrapper.delta_weight("default").numpy()
        if not embedding:
            expected = layout.to_gguf_rows(name, expected)
        np.testing.assert_allclose(_delta_from_gguf(tensors, name, scale, embedding), expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == len(tensors) // 2 > 0


def test_a_merged_gguf_base_keeps_every_unchanged_tensor_byte_for_byte_and_its_keys(tmp_path):
    adapter = make_adapter(None, tmp_path / "adapter", scale=0.02, target_modules=["q_proj", "v_proj"], layers=[0, 1])
    output = tmp_path / "merged.gguf"
    assert export("--adapter", adapter, "--format", "gguf", "--output", output) == 0
    source, merged = gguf.GGUFReader(default_model_path()), gguf.GGUFReader(output)
    changed = {f"blk.{i}.attn_{p}.weight" for i in (0, 1) for p in "qv"}
    source_tensors = {t.name: t for t in source.tensors}
    assert [t.name for t in merged.tensors] == [t.name for t in source.tensors]
    for tensor in merged.tensors:
        if tensor.name in changed:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
        else:
            original = source_tensors[tensor.name]
            assert tensor.tensor_type == original.tensor_type
            assert np.array_equal(np.asarray(tensor.data), np.asarray(original.data)), tensor.name
    for key, field in source.fields.items():
        if not key.startswith("GGUF."):
            assert merged.fields[key].contents() == field.contents(), key
    assert json.loads(merged.fields["lorafit.export"].contents())["format"] == "gguf"

    # and transformers reads it back as base + adapter (the merged q weights back in its row order)
    model, tokenizer = lorafit_model(None, adapter)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=output.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = model(ids).logits, back(ids).logits
    assert float((got - expected).abs().max()) <= 1.5e-2 * float(expected.abs().max())


def test_the_tokenizer_written_from_a_folder_is_the_one_in_the_original_gguf(tiny_smollm, tmp_path):
    """SmolLM2's tokenizer.json (here converted from its GGUF by transformers) written back: the same tokens,
    types, merges and special ids as the GGUF it came from."""
    adapter = make_adapter(tiny_smollm, tmp_path / "adapter", zero=True)
    output = tmp_path / "tiny.gguf"
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f32", "--output", output) == 0
    ours, original = gguf.GGUFReader(output).fields, gguf.GGUFReader(default_model_path()).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key].contents() == original[key].contents(), key
    assert ours["tokenizer.ggml.pre"].contents() == "gpt-2"  # what this tokenizer.json declares: ByteLevel alone


def test_pre_tokenizers_are_named_by_what_they_declare_and_unknown_ones_are_refused():
    from lorafit.formats.gguf_tokenizer import LLAMA3_SPLIT, llama_cpp_pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert llama_cpp_pre_tokenizer(byte_level) == "gpt-2"
    assert llama_cpp_pre_tokenizer({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    assert llama_cpp_pre_tokenizer({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}) == "llama-bpe"
    assert llama_cpp_pre_tokenizer({**byte_level, "use_regex": False}) is None
    assert llama_cpp_pre_tokenizer({"type": "Metaspace"}) is None


@pytest.mark.parametrize("outtype, tolerance", [("bf16", 2**-8), ("q8_0", 1 / 127)])
def test_bf16_and_q8_0_tensors_read_back_as_the_f32_export_within_their_rounding(tiny_smollm, tmp_path, outtype,
                                                                                 tolerance):
    """Each tensor dequantized by gguf-py equals the f32 export's within one step of the type's rounding (bf16:
    2^-8 relative; q8_0: its block's scale, max|block| / 127; rounding to nearest makes half of it); 1-D tensors
    stay f32."""
    adapter = make_adapter(tiny_smollm, tmp_path / "adapter")
    for kind in ("f32", outtype):
        assert export("--adapter", adapter, "--format", "gguf", "--outtype", kind, "--output", tmp_path / f"{kind}.gguf") == 0
    exact, rounded = tensors_of(tmp_path / "f32.gguf"), tensors_of(tmp_path / f"{outtype}.gguf")
    for name, tensor in rounded.items():
        reference = np.asarray(exact[name].data, dtype=np.float32)
        if reference.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert tensor.tensor_type.name == outtype.upper()
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(reference.shape)
        blocks = np.abs(reference).reshape(reference.shape[0], -1, 32).max(axis=-1, keepdims=True)
        bound = (np.abs(reference) if outtype == "bf16" else np.broadcast_to(blocks, reference.shape[:1] + (
            reference.shape[1] // 32, 32)).reshape(reference.shape)) * tolerance
        assert np.all(np.abs(values - reference) <= bound + 1e-12), name
