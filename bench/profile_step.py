"""Profile one lorafit training step (torch.profiler) and print where the time goes.

    .venv/bin/python bench/profile_step.py                       # r=8 q,v, built-in date task, batch 8
    .venv/bin/python bench/profile_step.py --data varlen --batch 4  # the 4th batch of the variable-length set

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
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from data import DATASETS, batch_plan  # noqa: E402
from sides import ALL16, QV8, LorafitSide, PeftSide, load_base  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATASETS), default="date")
    parser.add_argument("--config", choices=["qv8", "all16"], default="qv8")
    parser.add_argument("--side", choices=["lorafit", "peft"], default="lorafit")
    parser.add_argument("--batch", type=int, default=1, help="index in the plan of the profiled batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    model, tokenizer = load_base()
    examples = DATASETS[args.data](tokenizer)
    plan = batch_plan(examples)
    workload = QV8 if args.config == "qv8" else ALL16
    side = (LorafitSide if args.side == "lorafit" else PeftSide)(model, tokenizer, workload)
    batch = [examples[i] for i in plan[args.batch]]
    for _ in range(args.warmup):  # on the profiled batch itself: same shapes, nothing left to allocate first
        side.step(batch)
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


if __name__ == "__main__":
    main()
