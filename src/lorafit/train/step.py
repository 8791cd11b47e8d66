"""One optimizer step, as the training loop runs it and bench/sides.py measures it.

`choose_collate` picks, once per model, the cheapest exact layout for a micro-batch's forward calls;
`train_step` runs a step's calls (forward, token-weighted backward, clip, optimizer step);
`weights_are_finite` is the check the loop makes after every step taken. The loop
(`lorafit.train.loop.train`) adds what a run needs around them: the schedule, stopping or skipping a
non-finite step, logging, evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafit.train.batching import (
    MIN_SHARED_PREFIX,
    Batch,
    collate_pieces,
    collate_shared_prefix,
    shared_prefix_length,
)
from lorafit.train.distributed import (
    Ranks,
    collectives_inside,
    global_label_tokens,
    reduce_step,
)
from lorafit.train.forward import packing_is_exact, prefix_sharing_is_exact
from lorafit.train.fsdp import equal_calls
from lorafit.train.gradients import StepGradients
from lorafit.train.loss import summed_token_loss
from lorafit.train.output_head import check_output_head


def choose_collate(model, vocab_size: int, pad_id: int, row_tokens: int, gradient_checkpointing: bool,
                   echo: Callable[[str], None] = print, shared_prefix: bool = True) -> Callable[[list], list[Batch]]:
    """The cheapest exact layout for each micro-batch, as a list of forward calls ("pieces").

    A prompt prefix shared by all rows computed once; else examples of at least `row_tokens` tokens
    alone and the shorter ones packed (padded when this model cannot keep packed examples apart).
    Probes the model (`check_output_head`, `packing_is_exact`, `prefix_sharing_is_exact`) once, here, and says
    what it chose.
    `shared_prefix=False`: never share a prefix (FSDP2, where it would make the ranks' forward calls differ).
    """
    label_only = check_output_head(model)
    packed = packing_is_exact(model, vocab_size)
    # Gradient checkpointing in transformers turns the key/value cache off, which the prefix path needs.
    shared = shared_prefix and not gradient_checkpointing and prefix_sharing_is_exact(model, vocab_size)
    echo(f"batches: examples of ≥ {row_tokens} tokens run alone, shorter ones "
         + ("packed (no padding, examples kept apart)" if packed else "padded to the longest")
         + (", a prompt prefix shared by all rows computed once" if shared else "")
         + ("" if label_only else f"; the loss runs {type(model).__name__} whole (logits at every position): lorafit "
            "cannot reproduce its logits from its body and output head"))
    return layout_collate(pad_id, row_tokens, packed=packed, shared_prefix=shared)


def layout_collate(pad_id: int, row_tokens: int, *, packed: bool, shared_prefix: bool) -> Callable[[list], list[Batch]]:
    """The collate function of one layout (what `choose_collate` returns after probing; the memory planner
    runs it on the examples it plans for)."""

    def collate(examples: list) -> list[Batch]:
        if shared_prefix and len(examples) > 1:
            prefix = shared_prefix_length(examples)
            suffix_lengths = [len(e.input_ids) - prefix for e in examples]
            padding = len(examples) * max(suffix_lengths) - sum(suffix_lengths)
            if prefix >= MIN_SHARED_PREFIX and (len(examples) - 1) * prefix > padding:
                return [collate_shared_prefix(examples, pad_id, prefix)]
        return collate_pieces(examples, pad_id, row_tokens, packed)

    return collate


@dataclass(frozen=True)
class StepResult:
    """One optimizer step as `train_step` ran it."""

    loss: float  # mean cross-entropy over the step's label tokens
    grad_norm: float  # of the trainable parameters' gradients, before clipping
    real_tokens: int  # non-padding tokens
    label_tokens: int
    applied: bool  # False: the loss or the gradient norm was NaN/Inf, and the optimizer did not step


def train_step(model, micro_batches: list[Batch], parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               max_grad_norm: float, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
               body: torch.nn.Module | None = None, ranks: Ranks | None = None,
               gradients: StepGradients | None = None) -> StepResult:
    """One optimizer step over a step's micro-batches, given as collated forward calls (all accumulated).

    Each call's summed loss is divided by the label tokens of the whole step before its backward, so
    every label token weighs the same however the examples were split into calls and micro-batches.
    Then the gradients are clipped to `max_grad_norm` and, only if the loss and the gradient norm are
    finite, the optimizer and the scheduler (when given) step; the gradients are cleared either way.
    What to do about a non-finite step, and checking the weights after a step (`weights_are_finite`),
    is the caller's. `body`: a torch.compile'd model body for the loss to run instead of the model's own.
    `ranks`: under torchrun, this process's share of the step; the label tokens, the gradients and the
    totals are summed over ranks (lorafit.train.distributed), so every rank steps as one process would;
    with a sharded base (lorafit.train.fsdp) the ranks' pieces are first padded to the same count.
    `gradients`: gradient tensors made once for the whole run (lorafit.train.gradients), lent to the
    parameters for the step so that it allocates none (the loop passes them); without, autograd allocates
    them in each step.
    """
    device = next(model.parameters()).device
    pieces = [piece.to(device) for piece in micro_batches]
    sharded = ranks is not None and ranks.sharded_base
    if sharded:  # FSDP2: every rank makes the same forward calls
        pieces = equal_calls(pieces, device)
    label_tokens = global_label_tokens(sum(piece.label_tokens for piece in pieces), ranks, device)
    if label_tokens == 0:
        raise ValueError("train_step: the micro-batches hold no label tokens to train on")

    if gradients is not None:
        gradients.lend()
    # FSDP2 all-gathers each layer's weights in forward and backward: a lost rank fails there
    with collectives_inside("a step (FSDP's all-gathers)") if sharded else contextlib.nullcontext():
        loss_sum = accumulate_gradients(model, pieces, label_tokens, body=body)
    if gradients is not None:
        gradients.drop_unreached()
    real_tokens = sum(piece.real_tokens for piece in pieces)
    if ranks is None:
        loss_sum = loss_sum.item()
    else:
        loss_sum, real_tokens = reduce_step(parameters, [loss_sum.item(), real_tokens], ranks)
        real_tokens = round(real_tokens)
    step_loss = loss_sum / label_tokens
    grad_norm, applied = clip_and_step(parameters, optimizer, max_grad_norm, scheduler, loss=step_loss)
    return StepResult(step_loss, grad_norm.item(), real_tokens, label_tokens, applied)


def clip_and_step(parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer, max_grad_norm: float,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *, loss: float | None = None
                  ) -> tuple[torch.Tensor, bool]:
    """Clip the gradients to `max_grad_norm`, then the optimizer (and scheduler) step unless the step's `loss` or
    the gradient norm is NaN/Inf; the gradients are cleared either way. Returns (the gradient norm before
    clipping, whether the step was taken). Without `loss` nothing is checked: the memory planner runs this on
    fake tensors, which hold no values to check."""
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    applied = loss is None or (math.isfinite(loss) and math.isfinite(grad_norm.item()))
    if applied:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied


def accumulate_gradients(model, pieces: list[Batch], label_tokens: int, *, body: torch.nn.Module | None = None
                         ) -> torch.Tensor:
    """Forward and backward of each piece, its summed loss divided by the step's `label_tokens`; the summed
    loss (a detached 0-d tensor: one host sync per step, by the caller). The memory planner runs this too."""
    device = next(model.parameters()).device
    base_dtype = getattr(model, "dtype", torch.float32)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for piece in pieces:
        with _autocast(device, base_dtype):
            loss = summed_token_loss(model, piece, body=body)
        (loss / label_tokens).backward()  # every label token weighs the same across the step
        loss_sum += loss.detach()
    return loss_sum


def weights_are_finite(parameters: list[torch.Tensor]) -> bool:
    """Whether no trainable weight is NaN/Inf: a NaN or an Inf anywhere makes its tensor's sum non-finite.

    One sum per tensor and one check (~4 ms per step for 420 adapter tensors on 2 CPU cores, <0.5% of a step).
    """
    with torch.no_grad():
        return bool(torch.isfinite(torch.stack([p.sum() for p in parameters])).all())


def _autocast(device: torch.device, base_dtype: torch.dtype = torch.float32):
    """bf16 autocast on CUDA (adapters stay fp32), except for a bf16 base; nothing on CPU.

    A bf16 base already computes in bf16; autocasting it anyway changes nothing but keeps a copy of every
    weight for backward. An fp32 or fp16 base is autocast (fp16 alone would need loss scaling), and that
    copy is the price: the memory planner counts it (13.5 GB for llama-7B).
    """
    if device.type == "cuda" and base_dtype != torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
