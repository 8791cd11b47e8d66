"""`lorafit train --batch-size auto`: the largest batch size whose plan fits the memory left after loading.

The plan is for this run's own data: for each candidate batch size, the epoch's micro-batches are laid out
as the loop will (same seed, same collate) and the one with the largest forward call is planned. The
model is already loaded, so what must fit is the step (adapter, gradients, AdamW states, activations,
temporaries and the allocator's allowance) in the memory available now, less a MARGIN. On CUDA one real
forward and backward of that micro-batch confirms it (no optimizer step: the adapter is not changed), and
an out-of-memory halves the batch until it fits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafit.data.prepared import example_lengths
from lorafit.errors import LorafitError
from lorafit.planner.plan import Planner
from lorafit.planner.runtime import mem_available, resident_bytes
from lorafit.train.batching import plan_batches

MARGIN = 0.10  # of the available memory, kept free for what the plan does not see (other processes, growth)
MAX_AUTO_BATCH = 256
MAX_BATCH = 1024  # the most `lorafit estimate`'s search tries


def available_now(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return mem_available()


def _largest_call(examples: list, collate: Callable) -> int:
    pieces = collate(examples)
    return max(p.inputs["input_ids"].numel() + (p.inputs["prefix_ids"].numel() if "prefix_ids" in p.inputs else 0)
               for p in pieces)


def worst_micro_batch(examples: list, batch_size: int, seed: int, collate: Callable) -> list:
    """The first epoch's micro-batch with the largest forward call, as the loop will lay it out."""
    lengths = example_lengths(examples)
    plan = plan_batches(lengths, batch_size, seed, 0)
    # cheap filter first: the micro-batches holding the most tokens or the longest example
    candidates = sorted(plan, key=lambda b: (sum(lengths[i] for i in b), max(lengths[i] for i in b)))[-4:]
    candidates += [max(plan, key=lambda b: max(lengths[i] for i in b))]
    chosen = max(candidates, key=lambda b: _largest_call([examples[i] for i in b], collate))
    return [examples[i] for i in chosen]


def choose_batch_size(planner: Planner, examples: list, seed: int, device: torch.device,
                      echo: Callable[[str], None] = print) -> int:
    """The largest batch size (≤ MAX_AUTO_BATCH and the number of examples) whose step fits; says why."""
    from lorafit.train.step import layout_collate

    setup = planner.setup
    collate = layout_collate(0, setup.row_tokens, packed=planner.packed,
                             shared_prefix=planner.shared_prefix and not setup.gradient_checkpointing)
    budget = int(available_now(device) * (1 - MARGIN))
    ceiling = max(1, min(MAX_AUTO_BATCH, len(examples)))

    def need(batch: int) -> int:
        plan = planner.plan_examples(worst_micro_batch(examples, batch, seed, collate))
        return plan.trainable_bytes + plan.step_bytes

    if need(1) > budget:
        raise LorafitError(f"--batch-size auto: even batch 1 needs {need(1) / 2**30:.2f} GiB for the step and "
                           f"{budget / 2**30:.2f} GiB is free (after a {MARGIN:.0%} margin); try "
                           "--gradient-checkpointing, --quantize nf4 or a shorter --max-length")
    good, bad = 1, None
    while good < ceiling:
        trial = min(good * 2, ceiling)
        if need(trial) > budget:
            bad = trial
            break
        good = trial
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if need(middle) <= budget else (good, middle)
    cap = " (the most it tries)" if good == ceiling and good == MAX_AUTO_BATCH else (
        " (every example in one micro-batch)" if good == ceiling else "")
    echo(f"batch size auto: {good}{cap} — its largest micro-batch's step is planned at {need(good) / 2**30:.2f} GiB, "
         f"within the {budget / 2**30:.2f} GiB free now less a {MARGIN:.0%} margin"
         + (f"; batch {bad} would need {need(bad) / 2**30:.2f} GiB" if bad is not None else "")
         + f" (this process holds {resident_bytes() / 2**30:.2f} GiB already)")
    return good


def confirm_on_cuda(model, examples: list, batch_size: int, seed: int, collate: Callable,
                    echo: Callable[[str], None] = print) -> int:
    """One real forward and backward of the worst micro-batch; halve the batch on out-of-memory until it runs."""
    from lorafit.train.step import accumulate_gradients

    while True:
        micro = worst_micro_batch(examples, batch_size, seed, collate)
        pieces = [piece.to(next(model.parameters()).device) for piece in collate(micro)]
        try:
            accumulate_gradients(model, pieces, sum(piece.label_tokens for piece in pieces))
            model.zero_grad(set_to_none=True)
            return batch_size
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise LorafitError("--batch-size auto: batch 1 runs out of GPU memory; try --gradient-checkpointing, "
                                   "--quantize nf4 or a shorter --max-length") from None
            batch_size //= 2
            echo(f"batch size auto: the probe step ran out of GPU memory; trying {batch_size}")


def auto_batch_size(model, adapter, examples: list, *, dtype: str, gradient_checkpointing: bool, row_tokens: int,
                    seed: int, trust_remote_code: bool = False, echo: Callable[[str], None] = print) -> int:
    """`--batch-size auto` for a loaded `model` (no adapter yet) and the method config `adapter` it will get:
    the planner's choice for these tokenised `examples`, on CUDA confirmed by one real step."""
    from lorafit.core.adapters import attach, unload
    from lorafit.models.dtypes import parse_dtype
    from lorafit.models.quantize import quantization_of
    from lorafit.planner.plan import Setup
    from lorafit.planner.runtime import layout_of
    from lorafit.train.step import layout_collate

    device = next(model.parameters()).device
    setup = Setup(adapter, parse_dtype(dtype), quantization_of(model), gradient_checkpointing, row_tokens,
                  device.type)
    planner = Planner(model.config, setup, layout=layout_of(model.config, trust_remote_code),
                      trust_remote_code=trust_remote_code)
    batch = choose_batch_size(planner, examples, seed, device, echo)
    if device.type == "cuda" and torch.cuda.is_available():
        collate = layout_collate(0, row_tokens, packed=planner.packed,
                                 shared_prefix=planner.shared_prefix and not gradient_checkpointing)
        attach(model, adapter)
        try:
            batch = confirm_on_cuda(model, examples, batch, seed, collate, echo)
        finally:
            unload(model)
    return batch


def largest_fitting_batch(planner, workload, memory: int) -> tuple[int | None, str]:
    """The largest batch size whose plan fits `memory` (doubling, then halving the gap), and a line saying so."""
    first = planner.plan(workload(1))
    if first.total > memory:
        return None, (f"largest batch size that fits: none — batch 1 needs {gib(first.total)}; try "
                      "--gradient-checkpointing, --quantize nf4, a shorter --max-length or more memory")
    good, size, bad, since = 1, first.total, None, 1
    while bad is None and good < MAX_BATCH:
        trial = min(good * 2, MAX_BATCH)
        total = planner.plan(workload(trial)).total
        if total > memory:
            bad = trial
        elif total == size and trial >= 4:  # the peak no longer grows with the batch
            return trial, (f"largest batch size that fits: any — the peak stays {gib(total)} from batch {since} on "
                           f"(examples of ≥ {planner.setup.row_tokens} tokens run one at a time, so a larger batch "
                           "costs time, not memory)")
        else:
            since = since if total == size else trial
            good, size = trial, total
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if planner.plan(workload(middle)).total <= memory:
            good = middle
        else:
            bad = middle
    limit = "" if bad is not None else f" (searched up to {MAX_BATCH})"
    return good, f"largest batch size that fits: {good}{limit}"


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
