"""GGUF export of every family llama.cpp runs, checked in llama.cpp itself: a tiny random model of each family
(tests/families.py, SmolLM2's tokenizer) exported merged and as an adapter on the exported base.

Tolerances are relative to the largest logit. Families whose MLP computes GELU get a wider one, for a reason
in llama.cpp and not in the files: ggml's CPU GELU reads a float16 table (each activation rounded, 4.9e-4
relative; emulating that table in lorafit's model brings the measured differences down 3-20×). Measured on
these models: SiLU families 1.3e-6 to 1.2e-5 (phi3), GELU families 3.7e-4 (gpt2) to 1.6e-3 (falcon).
"""

import gguf
import numpy as np
import pytest
import torch

from lorafit.cli.main import main
from lorafit.formats.gguf_families import FAMILIES, GELU
from tests.cli.test_train_trust import error_line
from tests.families import write_family_model
from tests.formats import llama_cpp_oracle as oracle
from tests.formats.conftest import lorafit_model, make_adapter

# The family's attention query and value (or its fused q/k/v) and one MLP projection.
TARGETS = {"phi3": ["qkv_proj", "gate_up_proj"], "gpt2": ["c_attn", "c_fc"],
           "gpt_neox": ["query_key_value", "dense_h_to_4h"], "falcon": ["query_key_value", "dense_4h_to_h"],
           "glm4": ["q_proj", "v_proj", "gate_up_proj"]}
DEFAULT_TARGETS = ["q_proj", "v_proj", "down_proj"]
# query_pre_attn_scalar: llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim) (what real checkpoints of
# these sizes use); soft-caps small enough that leaving one out would show far beyond the tolerance.
OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 16, "final_logit_softcapping": 2.0, "attn_logit_softcapping": 3.0},
             "gemma3_text": {"query_pre_attn_scalar": 16, "final_logit_softcapping": 2.0}}
EXACT, GELU_TABLE = 1e-4, 3e-3
# Longer than the Gemma models' sliding window (16 tokens), with digits, punctuation, contractions, Unicode.
TEXTS = ["Rewrite the date in ISO 8601: 17 March 2021. Numbers 1234567 and 3.14159, prices $12.50; emails "
         "a.b@c.de, don't won't it's I'll we've they're, café 東京 🙂 and more words here",
         "  leading spaces,\ttabs\nand new lines\n\n  "]


def export(*args) -> int:
    return main(["export", *map(str, args)])


def tolerance(model_type: str) -> float:
    return GELU_TABLE if FAMILIES[model_type].activation == GELU else EXACT


def tensors(path) -> dict:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_family_exports_merged_and_as_an_adapter_and_llama_cpp_gives_lorafits_logits(model_type, tmp_path):
    folder = write_family_model(tmp_path / "model", model_type, **OVERRIDES.get(model_type, {}))
    targets = TARGETS.get(model_type, DEFAULT_TARGETS)
    zero = make_adapter(folder, tmp_path / "zero", zero=True, target_modules=targets)
    adapter = make_adapter(folder, tmp_path / "adapter", target_modules=targets)
    assert export("--adapter", zero, "--format", "gguf", "--outtype", "f32", "--output", tmp_path / "base.gguf") == 0
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f32", "--output", tmp_path / "merged.gguf") == 0
    assert export("--adapter", adapter, "--outtype", "f32", "--output", tmp_path / "lora.gguf") == 0
    # the same adapter written against the base's GGUF (the names and row orders it declares) is the same file
    assert export("--adapter", adapter, "--model", tmp_path / "base.gguf", "--outtype", "f32",
                  "--output", tmp_path / "lora-for-gguf.gguf") == 0
    written = tensors(tmp_path / "lora.gguf")
    assert written.keys() == tensors(tmp_path / "lora-for-gguf.gguf").keys() and len(written) == 4 * len(targets)
    assert all(np.array_equal(values, tensors(tmp_path / "lora-for-gguf.gguf")[name]) for name, values in written.items())

    model, tokenizer = lorafit_model(folder, adapter)
    merged, base = oracle.load(tmp_path / "merged.gguf"), oracle.load(tmp_path / "base.gguf")
    with_adapter = oracle.load(tmp_path / "base.gguf", lora_path=tmp_path / "lora.gguf")
    bound = tolerance(model_type)
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].float().numpy()
        scale = float(np.abs(expected).max())
        from_merged = oracle.logits(merged, ids)
        assert np.abs(oracle.logits(base, ids) - expected).max() > 0.1 * scale  # the adapter matters here
        assert np.abs(from_merged - expected).max() <= bound * scale, (text, np.abs(from_merged - expected).max() / scale)
        error = np.abs(oracle.logits(with_adapter, ids) - from_merged).max() / scale
        assert error <= bound, (text, error)


@pytest.mark.parametrize("model_type", ["glm", "llama4_text"])
def test_a_family_llama_cpp_has_no_exact_architecture_for_is_refused_in_one_line(model_type, tmp_path, capsys):
    folder = write_family_model(tmp_path / "model", model_type)
    adapter = make_adapter(folder, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    for form in ("gguf", "gguf-lora"):
        assert export("--adapter", adapter, "--format", form, "--output", tmp_path / "out.gguf") == 1
        classes = {"glm": "GlmForCausalLM", "llama4_text": "Llama4ForCausalLM"}[model_type]
        assert error_line(capsys) == (f"lorafit export: error: GGUF export does not know the architecture "
                                      f"{model_type!r} ({classes}); it writes {', '.join(FAMILIES)} models")
        assert not (tmp_path / "out.gguf").exists()


def test_a_config_llama_cpp_would_compute_otherwise_is_refused_merged_and_its_adapter_still_exports(tmp_path, capsys):
    """Gemma 2 with transformers' default query_pre_attn_scalar (256) on 16-wide heads: llama.cpp would scale
    queries by 1/sqrt(16). The merged file is refused; the adapter's tensors are the same either way."""
    folder = write_family_model(tmp_path / "model", "gemma2")
    adapter = make_adapter(folder, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    assert export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "m.gguf") == 1
    assert error_line(capsys) == (
        f"lorafit export: error: {folder / 'config.json'}: this gemma2 model has query_pre_attn_scalar 256, and "
        "llama.cpp scales queries by 1/sqrt(16) for this shape; llama.cpp's gemma2 would compute something else: "
        "export the adapter (--format gguf-lora) for a GGUF made by llama.cpp's converter")
    assert not (tmp_path / "m.gguf").exists()
    assert export("--adapter", adapter, "--output", tmp_path / "a.gguf") == 0


def test_a_sliding_window_llama_cpp_does_not_apply_is_said_and_the_merged_model_still_exports(tmp_path, capsys):
    """Mistral-7B-v0.1 (window 4096) and Phi-3-mini-4k (2047) run in llama.cpp with full attention: the same answers
    up to the window's length of context, so the merged file is written, and the difference said."""
    folder = write_family_model(tmp_path / "model", "mistral", sliding_window=16)
    adapter = make_adapter(folder, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    capsys.readouterr()
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f32", "--output", tmp_path / "m.gguf") == 0
    assert ("note: this mistral model attends to the last 16 tokens only (sliding_window) and llama.cpp to all of "
            "them: its answers equal transformers' up to 16 tokens of context") in capsys.readouterr().out
    assert (tmp_path / "m.gguf").is_file()


def test_llama_cpp_tokenizes_qwen2s_pre_tokenizer_as_transformers_does(tmp_path):
    """Qwen2's split regex (every digit alone) put into SmolLM2's vocabulary: written as llama.cpp's "qwen2",
    llama.cpp's tokens equal transformers' on digits, whitespace runs, contractions, Unicode, special tokens."""
    import json

    from transformers import AutoTokenizer

    from lorafit.formats.gguf_tokenizer import QWEN2_SPLIT
    from tests.formats.test_in_llama_cpp import TEXTS as TOKENIZER_TEXTS

    folder = write_family_model(tmp_path / "model", "qwen2")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    zero = make_adapter(folder, tmp_path / "zero", zero=True, target_modules=["q_proj"])
    assert export("--adapter", zero, "--format", "gguf", "--outtype", "f32", "--output", tmp_path / "m.gguf") == 0
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = oracle.load(tmp_path / "m.gguf")
    for text in [*TOKENIZER_TEXTS, TEXTS[0]]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text).input_ids, text
