"""Next-token cross-entropy that runs the output head only where a label exists.

The output head is ~21% of SmolLM2's matmul work and its logits (tokens × 49,152 floats) are the
largest activation of a step; a plain `model(labels=...)` spends both on every prompt and padding
position. Here the body runs once, the hidden states at labelled positions are gathered, and the head
plus cross-entropy run on those in chunks, each recomputed in backward rather than kept (torchtune's
idea: drop ignored tokens before the vocabulary projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafit.train.batching import IGNORE, Batch, forward_hidden

# Config attributes of models whose logits are transformed after the head (soft-capping, scaling):
# for those the loss goes through the model's own forward, which knows how.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _head_and_body(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if head is None or body is None or body is model:
        return None, None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None, None
    return head, body


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def summed_token_loss(model, batch: Batch, chunk_tokens: int = 2048) -> torch.Tensor:
    """Sum of cross-entropy over the batch's label tokens (the caller divides by the step's count)."""
    head, body = _head_and_body(model)
    targets = batch.targets
    if head is None:
        if "prefix_ids" in batch.inputs:
            raise ValueError("shared-prefix batches need a model with a separate body and output head")
        logits = model(**batch.inputs, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    hidden = forward_hidden(body, batch.inputs)
    labelled = targets != IGNORE
    hidden, targets = hidden[labelled], targets[labelled]
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, hidden_chunk, target_chunk, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hidden_chunk, target_chunk)
    return total
