"""Next-token cross-entropy that runs the output head only where a label exists.

The output head is ~21% of SmolLM2's matmul work and its logits (tokens × 49,152 floats) are the
largest activation of a step; a plain `model(labels=...)` spends both on every prompt and padding
position. Here the body runs once, the hidden states at labelled positions are gathered (torchtune's
idea: drop ignored tokens before the vocabulary projection), and the head plus cross-entropy run on
those in chunks.

When the head is frozen (it is, unless an adapter trains it) the chunks go through
`FrozenHeadCrossEntropy`, which computes the gradient with respect to the hidden states in the same
pass: d(CE)/d(logits) = softmax − one-hot, so d(CE)/dh = (softmax − one-hot)·W. It keeps that
gradient (tokens × hidden) and nothing else, so backward costs a multiplication by a scalar instead
of a second and third head matmul (a recomputed forward and the product with W), and no chunk of
logits outlives its loop iteration.

Families that transform their logits after the head (Gemma 2's soft-capping, Granite's and Cohere's
scaling) keep this path: the transform is applied here too (lorafit.train.output_head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafit.data.tokenizing import IGNORE_INDEX
from lorafit.train.batching import Batch
from lorafit.train.forward import forward_hidden
from lorafit.train.output_head import LogitTransform, output_head


def _chunk_loss(head, transform: LogitTransform, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(transform(head(hidden)).float(), targets, reduction="sum")


def _softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of fp32 `logits` rows; overwrites them with softmax − one-hot (the gradient).

    Each row is shifted by its maximum, exponentiated and normalised in place: loss = max + log Σexp − logit[target].
    `log_softmax` followed by `exp` gives the same numbers but writes a second vocabulary-sized tensor and
    runs ~4× slower on CPU (measured on 2 cores, 1024 × 49,152 floats: 145 ms against 35 ms).
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    target_logits = logits[rows, targets]
    row_max = logits.amax(dim=-1, keepdim=True)
    logits.sub_(row_max).exp_()
    row_sum = logits.sum(dim=-1, keepdim=True)
    logits.div_(row_sum)
    logits[rows, targets] -= 1.0
    return (row_max.squeeze(-1) + row_sum.log().squeeze(-1) - target_logits).sum()


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `transform(hidden @ weight.T (+ bias))` whose gradient reaches `hidden` only.

    Forward runs the head chunk by chunk and stores d(loss)/d(hidden); backward scales it by the
    incoming gradient. Exact (the same formula autograd would apply), for a head with no trainable
    parameters. A family's logit transform (soft-capping, scaling) enters by the chain rule: the
    gradient at the head's output is (softmax − one-hot) times the transform's derivative there.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int, transform: LogitTransform = LogitTransform()):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        # One vocabulary-sized fp32 buffer for every chunk: a fresh one per chunk costs its page faults
        # again (~100 MB at a time comes straight from mmap), and the softmax runs in place in it.
        in_buffer = weight.dtype == torch.float32 and hidden.dtype == torch.float32
        buffer = hidden.new_empty(min(chunk_tokens, hidden.shape[0]), weight.shape[0]) if in_buffer else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            if in_buffer:
                logits = buffer[: hidden[chunk].shape[0]]
                if bias is None:
                    torch.mm(hidden[chunk], weight.t(), out=logits)
                else:
                    torch.addmm(bias, hidden[chunk], weight.t(), out=logits)
            else:
                logits = F.linear(hidden[chunk], weight, bias).float()
            derivative = None if transform.identity else transform.apply_(logits)
            total += _softmax_cross_entropy_(logits, targets[chunk])
            # logits now hold softmax − one-hot = d(loss)/d(transformed logits)
            if derivative is not None:
                logits.mul_(derivative)
            grad_hidden[chunk] = (logits.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def _head_is_frozen(head) -> bool:
    return isinstance(head, torch.nn.Linear) and not any(p.requires_grad for p in head.parameters())


def summed_token_loss(model, batch: Batch, chunk_tokens: int = 512, body=None) -> torch.Tensor:
    """Sum of cross-entropy over the batch's label tokens (the caller divides by the step's count).

    body: what runs the model body in place of the model's own (the loop passes a torch.compile'd one).
    """
    split = output_head(model)
    targets = batch.targets
    if split is None:
        if "prefix_ids" in batch.inputs:  # the layout chooser never makes one for such a model
            raise ValueError("shared-prefix batches need a model with a separate body and output head")
        logits = model(**batch.inputs, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    head, transform = split.head, split.transform
    hidden = forward_hidden(split.body if body is None else body, batch.inputs)
    # Positions by index, not a boolean mask: the same gather, and its size is known before it runs
    # (which the memory planner, running this on tensors without data, needs).
    positions = batch.label_positions
    hidden = hidden.flatten(0, -2).index_select(0, positions.to(hidden.device))
    targets = targets.flatten().index_select(0, positions.to(targets.device))
    if positions.numel() == 0:  # a piece without labels (FSDP's padding calls): zero, still through every layer
        return hidden.sum().float()
    if torch.is_grad_enabled() and hidden.requires_grad and _head_is_frozen(head):
        return FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_tokens, transform)
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, transform, hidden_chunk, target_chunk, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, transform, hidden_chunk, target_chunk)
    return total
