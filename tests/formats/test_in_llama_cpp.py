"""lorafit's GGUF files checked in llama.cpp itself (llama-cpp-python builds llama.cpp; the test extra has it).

Float models are held to tolerances from llama.cpp's float kernels (fp32 accumulation in another order);
the embedded model's Q4_1 tensors run through llama.cpp's quantized kernels (activations rounded to 8 bits),
which differ from the exact dequantized weights lorafit computes with, so on it the comparisons are the
task's exact match and greedy replies, and logits relative to llama.cpp's own error on the unmodified base.
"""

import json

import gguf
import numpy as np
import pytest
import torch

from lorafit.cli.main import main
from lorafit.models.gguf_cache import default_model_path
from tests.formats import llama_cpp_oracle as oracle
from tests.formats.conftest import lorafit_model, make_adapter, write_tiny_smollm

TEXTS = [
    "Rewrite the date in ISO 8601: 17 March 2021",
    "  leading spaces,\ttabs\nand new lines\n\n  ",
    "Numbers 1234567 and 3.14159, prices $12.50; emails a.b@c.de",
    "Unicode: café, naïve, 東京, emoji 🙂 and <|im_start|>special tokens<|im_end|>",
    "don't won't it's I'll we've they're",
]


def export(*args) -> int:
    return main(["export", *map(str, args)])


def lorafit_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def tiny_base_gguf(tiny_smollm, tmp_path_factory):
    """The tiny float model itself as a GGUF (a zero adapter merged: W + 0), the base the adapter files apply to."""
    folder = tmp_path_factory.mktemp("tiny-base")
    zero = make_adapter(tiny_smollm, folder / "zero", zero=True)
    assert export("--adapter", zero, "--format", "gguf", "--outtype", "f32", "--output", folder / "base.gguf") == 0
    return folder / "base.gguf"


# max |logit difference| relative to the largest logit (measured on this model: f32 2.3e-6, f16 4.9e-3)
@pytest.mark.parametrize("outtype, tolerance", [("f32", 1e-4), ("f16", 1.5e-2)])
def test_a_merged_float_model_gives_lorafits_logits_in_llama_cpp(tiny_smollm, tmp_path, outtype, tolerance):
    adapter = make_adapter(tiny_smollm, tmp_path / "adapter", target_modules="all-linear")
    output = tmp_path / "merged.gguf"
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", outtype, "--output", output) == 0
    model, tokenizer = lorafit_model(tiny_smollm, adapter)
    llm = oracle.load(output)
    for text in TEXTS[:2]:
        ids = tokenizer(text).input_ids
        expected = lorafit_logits(model, ids)
        got = oracle.logits(llm, ids)
        error = float(np.abs(got - expected).max() / np.abs(expected).max())
        assert error <= tolerance, (text, error)


@pytest.mark.parametrize("settings", [
    {},
    {"use_rslora": True, "r": 8},
    {"rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"o_proj": 3.0}},
    {"target_modules": ["q_proj", "k_proj", "embed_tokens", "lm_head"]},
], ids=["plain", "rslora", "rank-and-alpha-pattern", "embedding-and-head"])
def test_an_adapter_file_on_the_base_gguf_gives_the_merged_models_output(tiny_smollm, tiny_base_gguf, tmp_path,
                                                                          settings):
    adapter = make_adapter(tiny_smollm, tmp_path / "adapter", **settings)
    assert export("--adapter", adapter, "--outtype", "f32", "--output", tmp_path / "adapter.gguf") == 0
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f32", "--output", tmp_path / "merged.gguf") == 0
    model, tokenizer = lorafit_model(tiny_smollm, adapter)
    with_adapter = oracle.load(tiny_base_gguf, lora_path=tmp_path / "adapter.gguf")
    merged = oracle.load(tmp_path / "merged.gguf")
    base = oracle.load(tiny_base_gguf)
    ids = tokenizer(TEXTS[0]).input_ids
    expected = lorafit_logits(model, ids)
    scale = np.abs(expected).max()
    assert np.abs(oracle.logits(base, ids) - expected).max() > 0.1 * scale  # the adapter matters here
    assert np.abs(oracle.logits(with_adapter, ids) - expected).max() <= 1e-4 * scale
    assert np.abs(oracle.logits(with_adapter, ids) - oracle.logits(merged, ids)).max() <= 1e-4 * scale


@pytest.mark.parametrize("pre_tokenizer", ["as converted", "smollm", "llama-bpe"])
def test_llama_cpp_tokenizes_a_written_tokenizer_as_transformers_does(tmp_path, pre_tokenizer):
    """The tokenizer keys written for a folder: llama.cpp's tokens equal transformers' for texts with digits,
    whitespace runs, contractions, Unicode and special tokens; also with SmolLM's and Llama 3's pre-tokenizers
    put into the same vocabulary."""
    from transformers import AutoTokenizer

    from lorafit.formats.gguf_tokenizer import LLAMA3_SPLIT

    folder = write_tiny_smollm(tmp_path / "model")
    if pre_tokenizer != "as converted":
        spec = json.loads((folder / "tokenizer.json").read_text())
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        first = ({"type": "Digits", "individual_digits": True} if pre_tokenizer == "smollm" else
                 {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False})
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            first, {**byte_level, "use_regex": pre_tokenizer == "smollm"}]}
        (folder / "tokenizer.json").write_text(json.dumps(spec))
    adapter = make_adapter(folder, tmp_path / "zero", zero=True)
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f32", "--output", tmp_path / "m.gguf") == 0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = oracle.load(tmp_path / "m.gguf")
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text).input_ids, text


@pytest.mark.slow
def test_the_trained_default_adapter_answers_in_llama_cpp_as_in_lorafit(trained_default_run, tmp_path):
    """After `lorafit train` on the built-in task: the exported adapter on the embedded Q4_1 GGUF (as llama.cpp
    and Ollama would run it) scores the held-out exact match within 5 points of lorafit's figure, and the
    merged f16 export answers held-out prompts with lorafit's greedy tokens."""
    from lorafit.data.tasks import BUILTIN, date_task_splits, evaluation_pairs
    from lorafit.data.tokenizing import encode_prompt

    run = trained_default_run
    lorafit_exact = json.loads((run / "metrics.json").read_text())["after"]["exact_match"]
    assert export("--adapter", run, "--output", tmp_path / "adapter.gguf") == 0
    assert export("--adapter", run, "--format", "gguf", "--output", tmp_path / "merged.gguf") == 0
    _, held_out = date_task_splits(BUILTIN.train_examples, BUILTIN.held_out_examples, 0)
    model, tokenizer = lorafit_model(None, run / "adapter")

    with_adapter = oracle.exact_match(oracle.load(default_model_path(), lora_path=tmp_path / "adapter.gguf"),
                                      tokenizer, held_out)
    assert with_adapter["tokenized_differently"] == 0
    assert abs(with_adapter["exact_match"] - lorafit_exact) <= 0.05
    assert oracle.exact_match(oracle.load(default_model_path()), tokenizer, held_out)["exact_match"] <= 0.2

    merged = oracle.load(tmp_path / "merged.gguf")
    for prompt, _ in evaluation_pairs(held_out[:8]):
        ids = encode_prompt(tokenizer, prompt)
        with torch.no_grad():
            ours = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        ours = [t for t in ours[0, len(ids):].tolist() if t != tokenizer.eos_token_id]
        assert oracle.greedy(merged, ids, 16) == ours


def test_a_bitfit_adapter_with_added_biases_merges_into_its_gguf_base_and_runs_in_llama_cpp(tiny_base_gguf, tmp_path):
    """BitFit --add-missing-bias on a GGUF base: the merged file carries the base over and adds the new bias tensors
    (llama.cpp's llama reads attention and MLP biases where a file has them); its logits are lorafit's."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    adapter = make_adapter(tiny_base_gguf, tmp_path / "adapter", method="bitfit", target_modules=targets,
                           add_missing_bias=True)
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f32", "--output", tmp_path / "m.gguf") == 0
    names = {tensor.name for tensor in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert {"blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.ffn_down.bias"} <= names
    model, tokenizer = lorafit_model(tiny_base_gguf, adapter)
    ids = tokenizer(TEXTS[0]).input_ids
    expected = lorafit_logits(model, ids)
    scale = np.abs(expected).max()
    assert np.abs(oracle.logits(oracle.load(tiny_base_gguf), ids) - expected).max() > 0.01 * scale  # biases matter
    assert np.abs(oracle.logits(oracle.load(tmp_path / "m.gguf"), ids) - expected).max() <= 1e-4 * scale
