"""Tiny random models of every decoder family the family matrix covers, built from transformers' own configs.

One place that knows how to make each family small: the loss-equality tests build them in memory with a small
vocabulary, the matrix and export tests save them as model folders with the embedded model's real tokenizer
(SmolLM2's byte-level BPE), so the CLI and llama.cpp can load them like a user's download.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

# Shapes every family shares: 2 blocks, hidden 64, 4 query heads of 16 over 2 key/value heads.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1)

# model_type -> what that family needs beyond COMMON (or instead of it) to be small and loadable.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window": 16},
    "gemma3_text": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                    "final_logit_softcapping": 20.0},
    "phi3": {},
    "glm": {},
    "glm4": {},
    "granite": {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.25},
    "cohere": {"logit_scale": 0.5},
    "olmo2": {},
    "llama4_text": {"intermediate_size_mlp": 128, "num_local_experts": 8, "interleave_moe_layer_step": 2,
                    "layer_types": ["chunked_attention", "full_attention"], "attention_chunk_size": 32},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "n_inner": 128},
    "gpt_neox": {"rotary_pct": 0.5},
    "falcon": {},
}
# Settings a family's config does not take (it computes them, or names them otherwise).
_NOT_TAKEN = {"gpt2": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "max_position_embeddings"),
              "falcon": ("head_dim", "intermediate_size"),
              "gpt_neox": ("head_dim", "num_key_value_heads")}


def family_config(model_type: str, vocab_size: int = 96, **overrides):
    """The transformers config of a tiny `model_type` model, with token ids inside the vocabulary."""
    from transformers import AutoConfig

    settings = {k: v for k, v in COMMON.items() if k not in _NOT_TAKEN.get(model_type, ())}
    settings.update(FAMILIES[model_type])
    settings.update(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides)
    return AutoConfig.for_model(model_type, **settings)


def tiny_family_model(model_type: str, seed: int = 0, vocab_size: int = 96, **overrides):
    """A tiny random float32 model of the family, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(family_config(model_type, vocab_size, **overrides))
    return model.float().eval()


def write_family_model(folder: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A tiny random model of the family with the embedded model's tokenizer, saved as a model folder."""
    from lorafit.models.loading import resolve_model_folder

    model = tiny_family_model(model_type, seed, vocab_size=49152, **overrides)
    model.save_pretrained(folder)
    source = resolve_model_folder(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder
