"""Training throughput, efficiency, loss curve and peak memory: lorafit against peft, step by step.

In-process comparison: two copies of the base model, one adapted by lorafit, one by peft starting from
lorafit's initial adapter weights; each micro-batch of the plan runs on both, alternating which goes
first (A B, B A, ...), and one sgemm sample is taken after every pair, so the peak is measured under the same load as the
steps. Memory: each (workload, side) runs again in a child process of its own
(`python bench/training.py --memory-child KEY SIDE`), which prints its peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    Series,
    current_rss_mib,
    high_water_rss_mib,
    matmul_parameters,
    peak_rss_mib,
    sgemm_gflops,
)
from sides import ALL16, QV8, LorafitSide, PeftSide, Workload, load_base  # noqa: E402
from workloads import DATASETS, batch_plan, padded_size  # noqa: E402


@dataclass(frozen=True)
class TrainingSpec:
    key: str
    title: str
    data: str  # a key of data.DATASETS
    workload: Workload
    measured: int  # timed steps per side
    warmup: int = 1
    warmup_smallest: bool = False  # warm up on the plan's cheapest batch (long-sequence sets: saves minutes)
    loss_curve: bool = False  # compare per-step losses over warmup + measured steps
    memory_steps: int = 3  # steps a memory child runs after its warm-up: the largest measured batches


def training_specs(quick: bool) -> list[TrainingSpec]:
    return [
        TrainingSpec("date-qv8", "built-in task, LoRA r=8 q,v, batch 8", "date", QV8,
                     measured=3 if quick else 49, loss_curve=True, memory_steps=1 if quick else 3),
        TrainingSpec("date-all16", "built-in task, LoRA r=16 all-linear, batch 8", "date", ALL16,
                     measured=2 if quick else 8, memory_steps=1 if quick else 3),
        TrainingSpec("varlen-qv8", "variable-length set (20–1024 tokens), LoRA r=8 q,v, batch 8", "varlen", QV8,
                     measured=1 if quick else 5, warmup_smallest=True, memory_steps=1),
    ]


def spec_by_key(key: str, quick: bool) -> TrainingSpec:
    return next(s for s in training_specs(quick) if s.key == key)


def select_batches(spec: TrainingSpec, examples: list) -> tuple[list[list[int]], list[list[int]]]:
    """(warm-up batches, measured batches) from the loop's plan; deterministic, so children see the same."""
    plan = batch_plan(examples)
    if spec.warmup_smallest:
        order = sorted(range(len(plan)), key=lambda i: padded_size(examples, plan[i]))
        warm = order[: spec.warmup]
        rest = [i for i in range(len(plan)) if i not in warm]
        return [plan[i] for i in warm], [plan[i] for i in rest[: spec.measured]]
    return plan[: spec.warmup], plan[spec.warmup : spec.warmup + spec.measured]


def memory_batches(spec: TrainingSpec, examples: list) -> list[list[int]]:
    """What a memory child runs: the warm-up batches, then the largest measured batches (the run's peak)."""
    warm, measured = select_batches(spec, examples)
    largest = sorted(measured, key=lambda b: padded_size(examples, b), reverse=True)[: spec.memory_steps]
    return warm + largest


def _sides(spec: TrainingSpec):
    lorafit_model, tokenizer = load_base()
    peft_model, _ = load_base()
    counts = matmul_parameters(lorafit_model)
    lorafit_side = LorafitSide(lorafit_model, tokenizer, spec.workload)
    peft_side = PeftSide(peft_model, tokenizer, spec.workload, start_from=lorafit_side.adapter_tensors())
    if lorafit_side.trainable_count() != peft_side.trainable_count():
        raise RuntimeError(f"{spec.key}: lorafit trains {lorafit_side.trainable_count()} parameters, "
                           f"peft {peft_side.trainable_count()}: not the same adapter")
    return lorafit_side, peft_side, counts


def compare_training(spec: TrainingSpec, examples: list, sgemm: Series, log=print) -> dict:
    """Run the spec's batches on both sides alternately; per-step times, tokens, losses and FLOPs."""
    lorafit_side, peft_side, counts = _sides(spec)
    counts = dataclasses.replace(counts, lora=lorafit_side.trainable_count())
    warm, measured = select_batches(spec, examples)
    steps = []
    for index, indices in enumerate(warm + measured):
        batch = [examples[i] for i in indices]
        record = {"warmup": index < len(warm), "padded_size": padded_size(examples, indices)}
        # A B, then B A: neither side always runs right after the sgemm sample or the other side
        for side in (lorafit_side, peft_side) if index % 2 == 0 else (peft_side, lorafit_side):
            started = time.perf_counter()
            info = side.step(batch)
            seconds = time.perf_counter() - started
            head_tokens = info["label_tokens"] if side is lorafit_side else info["computed_tokens"]
            executed = (4 * counts.body * info["computed_tokens"] + 4 * counts.head * head_tokens
                        + 6 * counts.lora * info["computed_tokens"])
            record[side.name] = {**info, "seconds": seconds,
                                 "useful_flops": counts.useful_flops(info["real_tokens"], info["label_tokens"],
                                                                     [len(e.input_ids) for e in batch]),
                                 "executed_flops": executed}
        record["sgemm_gflops"] = sgemm_gflops(1)[0]
        sgemm.add(record["sgemm_gflops"])
        steps.append(record)
        a, b = record["lorafit"], record["peft"]
        log(f"  {spec.key} step {index + 1}/{len(warm) + len(measured)}{' (warm-up)' if record['warmup'] else ''}: "
            f"lorafit {a['seconds']:.2f} s, peft {b['seconds']:.2f} s ({b['seconds'] / a['seconds']:.2f}x), "
            f"{a['real_tokens']} tokens, loss {a['loss']:.5f} / {b['loss']:.5f}")
    del lorafit_side, peft_side
    gc.collect()
    return {"key": spec.key, "title": spec.title, "lora_parameters": counts.lora, "counts": counts.__dict__,
            "steps": steps, "loss_curve": spec.loss_curve}


def summarise_training(result: dict) -> dict:
    """Medians and spreads of what the table shows, from the per-step records."""
    measured = [s for s in result["steps"] if not s["warmup"]]
    out = {"lorafit_tps": Series(), "peft_tps": Series(), "ratio": Series(), "lorafit_eff": Series(),
           "peft_eff": Series(), "lorafit_exec": Series(), "peft_exec": Series()}
    for step in measured:
        a, b, peak = step["lorafit"], step["peft"], step["sgemm_gflops"] * 1e9
        out["lorafit_tps"].add(a["real_tokens"] / a["seconds"])
        out["peft_tps"].add(b["real_tokens"] / b["seconds"])
        out["ratio"].add(b["seconds"] / a["seconds"])  # same tokens both sides: time ratio = throughput ratio
        out["lorafit_eff"].add(a["useful_flops"] / a["seconds"] / peak)
        out["peft_eff"].add(b["useful_flops"] / b["seconds"] / peak)
        out["lorafit_exec"].add(a["executed_flops"] / a["seconds"] / peak)
        out["peft_exec"].add(b["executed_flops"] / b["seconds"] / peak)
    tokens = sum(s["lorafit"]["real_tokens"] for s in measured)
    out["aggregate_ratio"] = sum(s["peft"]["seconds"] for s in measured) / sum(s["lorafit"]["seconds"] for s in measured)
    out["tokens"] = tokens
    out["padding"] = 1 - tokens / sum(s["peft"]["computed_tokens"] for s in measured)
    if result["loss_curve"]:
        out["loss_delta"] = max(abs(s["lorafit"]["loss"] - s["peft"]["loss"]) for s in result["steps"])
        out["loss_steps"] = len(result["steps"])
    return out


# --- memory: one child process per (workload, side) ----------------------------------------------------


def memory_child(key: str, side_name: str, quick: bool) -> dict:
    spec = spec_by_key(key, quick)
    model, tokenizer = load_base()
    examples = DATASETS[spec.data](tokenizer)
    side = (LorafitSide if side_name == "lorafit" else PeftSide)(model, tokenizer, spec.workload)
    with torch.no_grad():  # fault every weight in (safetensors are mmapped): the same baseline for both sides
        for parameter in model.parameters():
            parameter.sum()
    gc.collect()
    loaded = {"rss_before_steps_mib": current_rss_mib(), "peak_before_steps_mib": high_water_rss_mib()}
    batches = memory_batches(spec, examples)
    for indices in batches:
        side.step([examples[i] for i in indices])
    return {"key": key, "side": side_name, "steps": len(batches), **loaded, "peak_rss_mib": high_water_rss_mib(),
            "ru_maxrss_mib": peak_rss_mib(), "largest_padded_size": max(padded_size(examples, b) for b in batches)}


def measure_memory(key: str, side_name: str, quick: bool, timeout: float = 1200) -> dict:
    """Run memory_child in a fresh interpreter, so its peak RSS is this configuration's alone."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", key, side_name]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory child {key}/{side_name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="a memory child (used by bench/run.py)")
    parser.add_argument("--memory-child", nargs=2, metavar=("SPEC", "SIDE"), required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(memory_child(args.memory_child[0], args.memory_child[1], args.quick)))


if __name__ == "__main__":
    main()
