"""Profile one lorafit training step (torch.profiler) and print where the time goes.

    .venv/bin/python bench/profile_step.py                       # r=8 q,v, built-in date task, batch 8
    .venv/bin/python bench/profile_step.py --data varlen --batch 4  # the 4th batch of the variable-length set
    .venv/bin/python bench/profile_step.py --batch 6 --saved-tensors  # what the forward keeps for backward
    .venv/bin/python bench/profile_step.py --precision bf16         # the base in bf16 (or nf4)

Warm-up steps on the same batch first (allocator, thread pool), then one profiled step. Prints the top operators by
self CPU time and by total CPU time (the latter shows which high-level calls contain the cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from sides import ALL16, QV8, LorafitSide, PeftSide, load_base  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from workloads import DATASETS, batch_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATASETS), default="date")
    parser.add_argument("--config", choices=["qv8", "all16"], default="qv8")
    parser.add_argument("--side", choices=["lorafit", "peft"], default="lorafit")
    parser.add_argument("--batch", type=int, default=1, help="index in the plan of the profiled batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--precision", choices=["fp32", "bf16", "nf4"], default="fp32",
                        help="the frozen base's precision (bench/precision.py's loader)")
    parser.add_argument("--saved-tensors", action="store_true",
                        help="instead of timing: the bytes autograd keeps for backward, by shape and producing op")
    args = parser.parse_args()

    if args.precision == "fp32":
        model, tokenizer = load_base()
    else:
        from precision import load

        model, tokenizer = load(args.precision)
    examples = DATASETS[args.data](tokenizer)
    plan = batch_plan(examples)
    workload = QV8 if args.config == "qv8" else ALL16
    side = (LorafitSide if args.side == "lorafit" else PeftSide)(model, tokenizer, workload)
    batch = [examples[i] for i in plan[args.batch]]
    for _ in range(args.warmup):  # on the profiled batch itself: same shapes, nothing left to allocate first
        side.step(batch)
    if args.saved_tensors:
        print_saved_tensors(side, batch, args.rows)
        return
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        info = side.step(batch)
    seconds = time.perf_counter() - started
    print(f"{args.side} {workload.name} on {args.data} batch {args.batch}: {seconds:.2f} s under the profiler, "
          f"{info['real_tokens']} real tokens, {info['computed_tokens']} computed, {info['label_tokens']} labelled")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(averages.table(sort_by="cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))


def print_saved_tensors(side, batch: list, rows: int) -> None:
    """What the step's forward keeps for backward (parameters excluded), as the step's peak holds it.

    Each storage is counted once, at the end of the forward call that saved it, before backward frees it.
    """
    from lorafit.train.loss import summed_token_loss

    weights = {t.untyped_storage().data_ptr() for t in [*side.model.parameters(), *side.model.buffers()]}
    pieces = side.collate(batch)
    for piece in pieces if isinstance(pieces, list) else [pieces]:
        kept: dict[int, tuple[int, tuple, str]] = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                made_by = type(tensor.grad_fn).__name__ if tensor.grad_fn is not None else "leaf"
                kept[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape), made_by)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = summed_token_loss(side.model, piece)
        by_kind: dict[tuple, int] = {}
        for size, shape, made_by in kept.values():
            by_kind[(shape, made_by)] = by_kind.get((shape, made_by), 0) + size
        shapes = {k: tuple(v.shape) for k, v in piece.inputs.items()}
        print(f"forward call {shapes}: {sum(by_kind.values()) / 2**20:.1f} MiB kept for backward")
        for (shape, made_by), size in sorted(by_kind.items(), key=lambda item: -item[1])[:rows]:
            print(f"  {size / 2**20:8.1f} MiB  {list(shape)}  made by {made_by}")
        loss.backward()


if __name__ == "__main__":
    main()
