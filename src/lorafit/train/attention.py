"""Attention in fp32 for a bf16 base on CPU: the one part of the step where bf16 is slower there.

Profiled on the built-in task (bench/profile_step.py --precision bf16, 2-core Xeon with AMX): with the
base in bf16 the matmuls ran 2.4× faster than in fp32 (325 vs 782 ms per step), but PyTorch's CPU
flash-attention backward ran 7× slower in bf16 (267 vs 37 ms), eating most of the gain. So, for a bf16
model on CPU, attention runs on fp32 copies of q, k and v (a few MB per layer) and hands bf16 back;
everything else stays bf16. This uses transformers' public extension point (`AttentionInterface` /
`AttentionMaskInterface.register`): the model's own sdpa code path, under a name of its own.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)

NAME = "lorafit_sdpa_fp32_on_cpu"


def sdpa_fp32_on_cpu(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, on fp32 copies of bf16 CPU inputs; the output in the inputs' dtype."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dtype == torch.bfloat16:  # an additive float mask
        attention_mask = attention_mask.float()
    output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                             **kwargs)
    return output.to(query.dtype), weights


AttentionInterface.register(NAME, sdpa_fp32_on_cpu)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _switchable(model) -> bool:
    config = getattr(model, "config", None)
    parameter = next(model.parameters(), None)
    return (config is not None and parameter is not None and parameter.device.type == "cpu"
            and getattr(config, "_attn_implementation", None) == "sdpa" and getattr(model, "dtype", None) == torch.bfloat16)


def use_fp32_attention(model) -> str | None:
    """Switch a bf16 model on CPU that uses sdpa attention to NAME; returns the setting to restore (None:
    nothing was switched)."""
    if not _switchable(model):
        return None
    model.set_attn_implementation(NAME)
    return "sdpa"
