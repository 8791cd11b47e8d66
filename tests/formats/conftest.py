"""Fixtures for the GGUF export tests: a tiny float Llama with the embedded model's real tokenizer, adapters."""

import shutil
from pathlib import Path

import torch

import lorafit
from lorafit.models.identity import base_identity

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tiny_smollm(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama (2 layers, hidden 64, grouped kv heads) with SmolLM2's tokenizer, as a model folder.

    Real vocabulary and merges, so llama.cpp tokenizes it as it tokenizes SmolLM2; float32 weights, so
    llama.cpp's float kernels can be held to tight tolerances.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.models.loading import resolve_model_folder

    torch.manual_seed(seed)
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                    initializer_range=0.1, rope_theta=10000.0)
    LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).save_pretrained(folder)
    source = resolve_model_folder(None)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def make_adapter(base: Path | None, out: Path, seed: int = 1, scale: float = 0.3, zero: bool = False,
                 method: str = "lora", **settings) -> Path:
    """An adapter for `base` (None: the embedded model) with random (or zero) tensors, saved with its base record."""
    from lorafit.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(None if base is None else str(base), dtype="float32")
    identity = base_identity(model, None if base is None else str(base))
    if method == "lora":
        config = lorafit.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                       **settings})
    elif method == "ia3":
        config = lorafit.IA3Config(**settings)
    else:
        config = lorafit.BitFitConfig(**settings)
    lorafit.attach(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and not zero:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            elif parameter.requires_grad:
                parameter.zero_()
    lorafit.save_adapter(model, out, base_model=identity)
    return out


def lorafit_model(base: Path | None, adapter: Path | None):
    """lorafit's own fp32 model (base + adapter): the reference every export is compared with."""
    from lorafit.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None if base is None else str(base), dtype="float32")
    if adapter is not None:
        lorafit.load_adapter(model, adapter)
    return model.eval(), tokenizer
