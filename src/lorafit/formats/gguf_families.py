"""What differs per model family when a transformers model is written for llama.cpp: the facts tensor names
do not carry, and the hyperparameter keys each llama.cpp architecture reads.

Tensor names are gguf-py's (`gguf.get_tensor_name_map`, see gguf_layout); everything here is what that map
cannot say. Which of transformers' rotary layouts llama.cpp expects (only the `llama`-style architectures
that rotate pairs (2j, 2j+1) take q and k rows reordered; the NEOX-style ones rotate (j, j + d/2) as
transformers does), whether norms are stored +1 (Gemma's RMSNorm is x·(1 + w), llama.cpp's x·w), whether a
fused q/k/v projection interleaves its heads (GPT-NeoX, Falcon: llama.cpp wants [all q; all k; all v]),
whether weights are stored (in, out) (GPT-2's Conv1D), and the hyperparameters. A model whose config asks
for something llama.cpp's architecture does not compute is refused rather than written inexactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf

from lorafit.errors import LorafitError

# llama.cpp's activation per architecture is fixed; these are transformers' names for the same function. Its
# GELU is the tanh form, read from a float16 table on CPUs (ggml's GGML_GELU_FP16: each value rounded, 4.9e-4
# relative); exact GELU ("gelu": Pythia, Falcon) is within 4.7e-4 of the tanh form, the same order, so it is
# taken too.
SILU = ("silu", "swish")
GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh", "gelu")


@dataclass(frozen=True)
class Family:
    """How one transformers model_type is written as one llama.cpp architecture."""

    architecture: str  # llama.cpp's name (gguf.MODEL_ARCH_NAMES)
    keys: Callable  # (writer, config) -> None: the hyperparameters this architecture reads beyond the common ones
    activation: tuple[str, ...] = SILU  # the activations llama.cpp computes for it (transformers' names)
    rotary_permuted: bool = False  # q, k rows reordered to llama.cpp's pairwise rotary order
    norm_plus_one: bool = False  # norm weights stored as 1 + w
    fused_qkv_grouped: bool = False  # attn_qkv rows are [q.., k, v] per key/value group in transformers
    conv1d: bool = False  # the blocks' 2-D weights are stored (in, out)
    check: Callable | None = None  # config -> why llama.cpp would compute something else, or None
    note: Callable | None = None  # config -> what llama.cpp computes otherwise only beyond some length, or None

    def kv_heads(self, config) -> int:
        """The key/value head count llama.cpp reads, which is also the number of groups a fused q/k/v holds."""
        if self.architecture == "falcon":  # multi-query: one key/value head; the old layout without it: one per head
            if getattr(config, "new_decoder_architecture", False):
                return config.num_kv_heads
            return 1 if getattr(config, "multi_query", True) else config.num_attention_heads
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def rope_settings(config) -> dict:
    """The rotary settings of a config, as one flat dict (transformers 5 keeps them in `rope_parameters`,
    per layer type for Gemma 3: there the full-attention layers' with the sliding ones' under "sliding")."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "full_attention" in rope:
        rope = {**rope["full_attention"], "sliding": rope.get("sliding_attention") or {}}
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def rope_type(rope: dict) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_rope(writer: gguf.GGUFWriter, config) -> None:
    """Frequency base, rotated dimensions (a partial rotary factor rotates fewer), linear scaling."""
    rope = rope_settings(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(head_dim(config) * factor))
    if rope_type(rope) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def add_rms(writer, config) -> None:
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    add_rope(writer, config)


def add_granite(writer, config) -> None:
    add_rms(writer, config)
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_attention_scale(float(config.attention_multiplier))
    writer.add_logit_scale(float(config.logits_scaling))


def add_gemma2(writer, config) -> None:
    add_rms(writer, config)
    writer.add_sliding_window(config.sliding_window)
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(config, key, None):
            add(float(getattr(config, key)))


def add_gemma3(writer, config) -> None:
    """Sliding-window layers as an explicit per-layer list (llama.cpp assumes five of every six without it),
    their own rotary base, and the final logit cap when the config has one."""
    add_rms(writer, config)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in _layer_types(config)])
    writer.add_rope_freq_base_swa(float(rope_settings(config).get("sliding", {}).get("rope_theta", 10000.0)))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def add_cohere(writer, config) -> None:
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    add_rope(writer, config)
    writer.add_logit_scale(float(config.logit_scale))


def add_gpt2(writer, config) -> None:
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))


def add_gpt_neox(writer, config) -> None:
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    add_rope(writer, config)
    writer.add_parallel_residual(bool(config.use_parallel_residual))


def add_falcon(writer, config) -> None:
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
    add_rope(writer, config)


def note_full_attention(config) -> str | None:
    """llama.cpp's llama, qwen2 and phi3 attend to every earlier token (phi3's sliding_window it reads and
    turns off: llama.cpp#13676). A model with a shorter window (Mistral-7B-v0.1: 4096; Phi-3-mini-4k: 2047)
    answers the same up to that many tokens of context, so it is exported, and the difference said."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    if window and window < config.max_position_embeddings:
        return (f"this {config.model_type} model attends to the last {window} tokens only (sliding_window) and "
                f"llama.cpp to all of them: its answers equal transformers' up to {window} tokens of context")
    return None


def _gemma_attention_scale(config, layers_27b: int) -> str | None:
    """llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B layer count, where
    transformers uses query_pre_attn_scalar: they must agree."""
    wanted = (config.hidden_size / config.num_attention_heads if config.num_hidden_layers == layers_27b
              else head_dim(config))
    if not math.isclose(float(config.query_pre_attn_scalar), float(wanted)):
        return (f"has query_pre_attn_scalar {config.query_pre_attn_scalar}, and llama.cpp scales queries by "
                f"1/sqrt({wanted:g}) for this shape")
    return None


def _layer_types(config) -> list[str]:
    return list(getattr(config, "layer_types", None) or [])


def check_gemma2(config) -> str | None:
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
    if _layer_types(config) and _layer_types(config) != expected:
        return "alternates its sliding-window layers otherwise than llama.cpp's gemma2 (every other, from the first)"
    return _gemma_attention_scale(config, 46)


def check_gemma3(config) -> str | None:
    if getattr(config, "attn_logit_softcapping", None):
        return "caps its attention logits, which llama.cpp's gemma3 does not do"
    return _gemma_attention_scale(config, 62)


def check_falcon(config) -> str | None:
    if getattr(config, "alibi", False):
        return "uses ALiBi, which lorafit does not write for llama.cpp"
    if not getattr(config, "parallel_attn", True):
        return "has sequential attention and MLP (parallel_attn false), which llama.cpp's falcon does not compute"
    return None


# transformers model_type -> how it is written; one row per family llama.cpp runs exactly as transformers does
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", add_rms, rotary_permuted=True),
    "mistral": Family("llama", add_rms, rotary_permuted=True, note=note_full_attention),
    "granite": Family("granite", add_granite, rotary_permuted=True),
    "qwen2": Family("qwen2", add_rms, note=note_full_attention),
    "qwen3": Family("qwen3", add_rms),
    "gemma": Family("gemma", add_rms, GELU, norm_plus_one=True),
    "gemma2": Family("gemma2", add_gemma2, GELU, norm_plus_one=True, check=check_gemma2),
    "gemma3_text": Family("gemma3", add_gemma3, GELU, norm_plus_one=True, check=check_gemma3),
    "phi3": Family("phi3", add_rms, note=note_full_attention),
    "olmo2": Family("olmo2", add_rms),
    "cohere": Family("command-r", add_cohere),
    "glm4": Family("glm4", add_rms),
    "gpt2": Family("gpt2", add_gpt2, GELU, conv1d=True),
    "gpt_neox": Family("gptneox", add_gpt_neox, GELU, fused_qkv_grouped=True),
    "falcon": Family("falcon", add_falcon, GELU, fused_qkv_grouped=True, check=check_falcon),
}
# llama.cpp architecture -> its family (for an adapter checked against a GGUF base, which names only that)
BY_ARCHITECTURE = {family.architecture: family for family in reversed(FAMILIES.values())}


def _activation_reason(config, family: Family) -> str | None:
    activation = next((getattr(config, key) for key in ("hidden_activation", "hidden_act", "activation_function",
                                                        "activation") if getattr(config, key, None)), None)
    if activation is not None and activation not in family.activation:
        return f"computes {activation!r} where llama.cpp's {family.architecture} computes {family.activation[0]!r}"
    return None


def _rope_reason(config) -> str | None:
    rope = rope_settings(config)
    kinds = {rope_type(rope)} | ({rope_type(rope["sliding"])} if rope.get("sliding") else set())
    if not kinds <= {"default", "linear"}:
        return (f"has the rope type {', '.join(sorted(kinds - {'default', 'linear'}))}, and lorafit writes the default "
                "and linear rotary embeddings only")
    return None


def family_of(config) -> Family:
    """The family of a transformers config, or one line naming it and the families export writes."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        classes = ", ".join(getattr(config, "architectures", None) or []) or "no class named"
        raise LorafitError(f"GGUF export does not know the architecture {model_type!r} ({classes}); it writes "
                           f"{', '.join(FAMILIES)} models")
    return family


def check_computable(config, family: Family, where) -> None:
    """Refuse, in one line, a model whose config asks for what llama.cpp's architecture does not compute: its
    merged GGUF would run, and answer otherwise. (Its adapter is another matter: the tensors are the same.)"""
    reason = _activation_reason(config, family) or _rope_reason(config) or (family.check and family.check(config))
    if reason:
        raise LorafitError(f"{where}: this {config.model_type} model {reason}; llama.cpp's {family.architecture} "
                           "would compute something else: export the adapter (--format gguf-lora) for a GGUF made "
                           "by llama.cpp's converter")


def feed_forward_length(config) -> int:
    """The MLP's inner width (GPT-2 and Falcon name it otherwise; 4 × hidden when unset)."""
    for key in ("intermediate_size", "n_inner", "ffn_hidden_size"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 4 * config.hidden_size


def add_hyperparameters(writer: gguf.GGUFWriter, config, family: Family, name: str) -> None:
    """Every hyperparameter key llama.cpp reads for `family`, from a transformers config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(feed_forward_length(config))
    writer.add_head_count(heads)
    writer.add_head_count_kv(family.kv_heads(config))
    if head_dim(config) != hidden // heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    family.keys(writer, config)
    writer.add_vocab_size(config.vocab_size)
