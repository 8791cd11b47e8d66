"""Where a transformers Llama-family model's tensors go in a GGUF file, and in which row order.

Names come from gguf-py's own map (`gguf.get_tensor_name_map`), the one llama.cpp's converter uses:
`model.layers.0.self_attn.q_proj.weight` is `blk.0.attn_q.weight`. llama.cpp stores the query and key
projections of the `llama` architecture with the rows of each head reordered (its rotary embedding pairs
dimension i with i + d/2 the other way round from transformers, which undoes the order when it reads a
GGUF); writing them back means applying that reorder again. A row reorder of ΔW = B·A is a reorder of
B's rows only, so an adapter's A is written as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from lorafit.errors import LorafitError

# transformers model_type -> the llama.cpp architecture its weights are written as (same names, same layout)
SUPPORTED = {"llama": "llama", "mistral": "llama"}


@dataclass(frozen=True)
class Layout:
    """The facts about one model that naming and reordering its tensors need (from its config.json)."""

    architecture: str  # llama.cpp's name, e.g. "llama"
    block_count: int
    head_count: int
    head_count_kv: int
    tie_word_embeddings: bool

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF tensor name of a transformers parameter (`...q_proj.weight` -> `blk.N.attn_q.weight`)."""
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.architecture)
        name = gguf.get_tensor_name_map(arch, self.block_count).get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorafitError(f"{hf_name}: llama.cpp's {self.architecture} architecture has no tensor for it")
        return name

    def heads_reordered(self, gguf_name: str) -> int | None:
        """The head count whose rows llama.cpp reorders in this tensor (q: all heads, k: key/value heads)."""
        if gguf_name.endswith("attn_q.weight"):
            return self.head_count
        if gguf_name.endswith("attn_k.weight"):
            return self.head_count_kv
        return None

    def to_gguf_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """`rows` (out, ...) in transformers' order -> llama.cpp's order for `gguf_name` (a copy if reordered)."""
        heads = self.heads_reordered(gguf_name)
        return rows if heads is None else reorder_rotary_rows(rows, heads)


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


def layout_of(config) -> Layout:
    """The Layout of a transformers config, or one line naming the architecture and the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        classes = ", ".join(getattr(config, "architectures", None) or []) or "no class named"
        raise LorafitError(f"GGUF export does not know the architecture {model_type!r} ({classes}); it writes "
                           f"{', '.join(sorted(SUPPORTED))} models (llama.cpp's 'llama')")
    heads = config.num_attention_heads
    return Layout(architecture=SUPPORTED[model_type], block_count=config.num_hidden_layers, head_count=heads,
                  head_count_kv=getattr(config, "num_key_value_heads", None) or heads,
                  tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def layout_of_gguf(reader: gguf.GGUFReader, path) -> Layout:
    """The Layout a llama.cpp model file declares (its own keys, as llama.cpp reads them)."""
    def value(key):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    architecture = value("general.architecture")
    if architecture not in set(SUPPORTED.values()):
        raise LorafitError(f"{path}: GGUF export does not know the architecture {architecture!r}; it writes "
                           f"{', '.join(sorted(set(SUPPORTED.values())))} models")
    heads = value(f"{architecture}.attention.head_count")
    names = {tensor.name for tensor in reader.tensors}
    return Layout(architecture=architecture, block_count=value(f"{architecture}.block_count"), head_count=heads,
                  head_count_kv=value(f"{architecture}.attention.head_count_kv") or heads,
                  tie_word_embeddings="output.weight" not in names)
