"""Where a transformers model's tensors go in a GGUF file, and in which layout llama.cpp reads them.

Names come from gguf-py's own map (`gguf.get_tensor_name_map`), the one llama.cpp's converter uses:
`model.layers.0.self_attn.q_proj.weight` is `blk.0.attn_q.weight`. What the names do not say is per family
(gguf_families): llama.cpp stores the query and key projections of `llama`-style architectures with the
rows of each head reordered (its rotary embedding pairs dimension i with i + 1, transformers i with i + d/2,
and transformers undoes the order when it reads such a GGUF); a fused q/k/v projection that interleaves
its heads is regrouped as [all q; all k; all v]; Gemma's norms are stored + 1; GPT-2's (in, out) weights
are transposed. A row reorder of ΔW = B·A is a reorder of B's rows only, and a transposed Conv1D weight
changes nothing for LoRA (peft keeps A (r, in) and B (out, r) for it too), so an adapter's A is written
as it is; adapters never touch norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from lorafit.errors import LorafitError
from lorafit.formats.gguf_families import BY_ARCHITECTURE, Family, family_of


@dataclass(frozen=True)
class Layout:
    """The facts about one model that naming and reordering its tensors need (from its config.json)."""

    family: Family
    block_count: int
    head_count: int
    head_count_kv: int
    tie_word_embeddings: bool

    @property
    def architecture(self) -> str:
        """llama.cpp's name, e.g. "llama"."""
        return self.family.architecture

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF tensor name of a transformers parameter (`...q_proj.weight` -> `blk.N.attn_q.weight`)."""
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.architecture)
        name = gguf.get_tensor_name_map(arch, self.block_count).get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorafitError(f"{hf_name}: llama.cpp's {self.architecture} architecture has no tensor for it")
        return name

    def to_gguf_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """`rows` (out, ...) in transformers' order -> llama.cpp's order for `gguf_name`; for a weight or bias,
        and for a LoRA B (a copy when reordered)."""
        kind = gguf_name.rsplit(".", 2)[-2]  # blk.0.attn_q.weight -> attn_q
        if self.family.rotary_permuted and kind in ("attn_q", "attn_k"):
            return reorder_rotary_rows(rows, self.head_count if kind == "attn_q" else self.head_count_kv)
        if self.family.fused_qkv_grouped and kind == "attn_qkv":
            return regroup_qkv_rows(rows, self.head_count, self.head_count_kv)
        return rows

    def to_gguf(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        """A whole transformers weight or bias (float32) -> the array llama.cpp reads as `gguf_name`."""
        if self.family.conv1d and values.ndim == 2 and gguf_name.startswith("blk."):
            values = values.T  # Conv1D holds (in, out)
        if self.family.norm_plus_one and gguf_name.endswith("_norm.weight"):
            values = values + 1.0  # Gemma's RMSNorm multiplies by 1 + w, llama.cpp's by w
        return np.ascontiguousarray(self.to_gguf_rows(gguf_name, values))


def reorder_rotary_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Within each head's d rows, put row 2j+h (h = 0, 1) where transformers has row h·d/2 + j.

    transformers' rotary embedding rotates dimension j together with j + d/2; llama.cpp's (the original
    Llama code's) rotates 2j with 2j + 1. This is the inverse of what transformers does to q and k when it
    loads a llama GGUF, so a weight written this way reads back exactly.
    """
    out = rows.shape[0]
    if out % (2 * heads):
        raise LorafitError(f"{out} rows cannot be split into {heads} heads of even size")
    per_head = out // heads
    return np.ascontiguousarray(rows.reshape(heads, 2, per_head // 2, *rows.shape[1:])
                                .swapaxes(1, 2).reshape(rows.shape))


def regroup_qkv_rows(rows: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """A fused q/k/v projection's rows from transformers' grouping -- per key/value head, its share of query
    heads, then its key head, then its value head (GPT-NeoX: one query head per group; Falcon) -- to
    llama.cpp's [all query heads; all key heads; all value heads]."""
    per_group = heads // kv_heads + 2
    if rows.shape[0] % (kv_heads * per_group):
        raise LorafitError(f"{rows.shape[0]} fused q/k/v rows cannot be split into {kv_heads} groups of {per_group}")
    grouped = rows.reshape(kv_heads, per_group, rows.shape[0] // (kv_heads * per_group), *rows.shape[1:])
    parts = (grouped[:, :-2], grouped[:, -2:-1], grouped[:, -1:])
    return np.ascontiguousarray(np.concatenate([part.reshape(-1, *rows.shape[1:]) for part in parts]))


def layout_of(config) -> Layout:
    """The Layout of a transformers config, or one line naming the architecture and the supported ones."""
    family = family_of(config)
    return Layout(family=family, block_count=config.num_hidden_layers, head_count=config.num_attention_heads,
                  head_count_kv=family.kv_heads(config),
                  tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def layout_of_gguf(reader: gguf.GGUFReader, path) -> Layout:
    """The Layout a llama.cpp model file declares (its own keys, as llama.cpp reads them)."""
    def value(key):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    architecture = value("general.architecture")
    if architecture not in BY_ARCHITECTURE:
        raise LorafitError(f"{path}: GGUF export does not know the architecture {architecture!r}; it writes "
                           f"{', '.join(BY_ARCHITECTURE)} models")
    heads = value(f"{architecture}.attention.head_count")
    names = {tensor.name for tensor in reader.tensors}
    return Layout(family=BY_ARCHITECTURE[architecture], block_count=value(f"{architecture}.block_count"), head_count=heads,
                  head_count_kv=value(f"{architecture}.attention.head_count_kv") or heads,
                  tie_word_embeddings="output.weight" not in names)
