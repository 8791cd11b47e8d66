"""The training comparison on an accelerator, short enough for a GPU session's few minutes (issue 6).

    .venv/bin/python bench/device_check.py --device cuda                   # ~3–5 min on one GPU
    .venv/bin/python bench/device_check.py --device cpu --steps 1 --varlen-steps 1   # the plumbing, anywhere
    .venv/bin/python bench/device_check.py --export-model .device_model    # config + tokenizer, ~4 MB
    python3 bench/device_check.py --device cuda --random-weights .device_model   # where the GGUF cannot go

The embedded model's weights (a GGUF package, a 540 MB fp32 cache) cannot travel to a GPU machine that
takes 64 MiB and reaches no network. Speed and memory do not depend on the weights' values, so there the
same architecture runs from its config with seeded random weights (`--random-weights`, after
`--export-model` here); the loss-agreement column still compares the two sides exactly.

The same sides as bench/run.py (sides.py: lorafit's own train_step against peft's documented standard, the
same micro-batches from lorafit's plan, fp32 on CPU and bf16 autocast with fp32 adapters on CUDA for both,
AdamW 2e-4, clip 1.0), A B / B A alternation after a
warm-up step, and on CUDA the device synchronised around every timed step. Per workload: real
tokens/s of each side and their ratio (median, min–max over the paired steps), the largest loss
difference over the steps, and on CUDA each side's peak allocated memory during a step above what was
allocated before it (torch.cuda.max_memory_allocated; both models stay loaded, so the figure is the
step's own activations, gradients and optimizer state), and next to lorafit's largest step the memory
planner's count for the same micro-batch (issue 16: `lorafit estimate`'s tensors, without its allowances). Prints a Markdown table and writes JSON to
$OUT/device_check.json when $OUT is set (the device tool's output folder), else bench/RESULTS-device.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import Series, today  # noqa: E402
from sides import ALL16, QV8, LorafitSide, PeftSide, load_base  # noqa: E402
from workloads import DATASETS, batch_plan  # noqa: E402

WORKLOADS = [("date-qv8", "date", QV8), ("date-all16", "date", ALL16), ("varlen-qv8", "varlen", QV8)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(side, batch, device: torch.device) -> dict:
    """One optimizer step; seconds between synchronised start and end, and the step's peak memory."""
    _synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    info = side.step(batch)
    _synchronize(device)
    info["seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        info["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return info


def _random_model_and_tokenizer(folder: Path, device: torch.device):
    """The exported architecture with seeded random weights, and its tokenizer (as load_base pads)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _two_models(device: torch.device, random_weights: Path | None):
    if random_weights is None:
        first, tokenizer = load_base(str(device))
        return first, load_base(str(device))[0], tokenizer
    first, tokenizer = _random_model_and_tokenizer(random_weights, device)
    return first, _random_model_and_tokenizer(random_weights, device)[0], tokenizer


def compare(key: str, data: str, workload, steps: int, device: torch.device, random_weights: Path | None = None,
            log=print) -> dict:
    lorafit_model, peft_model, tokenizer = _two_models(device, random_weights)
    examples = DATASETS[data](tokenizer)
    plan = batch_plan(examples)
    lorafit_side = LorafitSide(lorafit_model, tokenizer, workload)
    peft_side = PeftSide(peft_model, tokenizer, workload, start_from=lorafit_side.adapter_tensors())
    records = []
    for index, indices in enumerate(plan[: steps + 1]):  # the first is the warm-up
        batch = [examples[i] for i in indices]
        record = {}
        for side in (lorafit_side, peft_side) if index % 2 == 0 else (peft_side, lorafit_side):
            record[side.name] = _timed_step(side, batch, device)
        records.append(record)
        a, b = record["lorafit"], record["peft"]
        log(f"  {key} step {index}{' (warm-up)' if index == 0 else ''}: lorafit {a['seconds']:.3f} s, "
            f"peft {b['seconds']:.3f} s ({b['seconds'] / a['seconds']:.2f}x), {a['real_tokens']} tokens, "
            f"loss {a['loss']:.5f} / {b['loss']:.5f}")
    planned = _planned_peak(lorafit_model, workload, examples, plan[1: steps + 1], records[1:], device)
    del lorafit_side, peft_side, lorafit_model, peft_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"key": key, "workload": workload.name, "data": data, "steps": records, "planned": planned}


def _planned_peak(model, workload, examples: list, plan: list, records: list, device: torch.device) -> dict | None:
    """The memory planner (issue 16) for the step with the largest measured CUDA peak: its tensor peak less
    AdamW's states (which exist before every measured step, so the measured figure excludes them)."""
    if device.type != "cuda" or not records:
        return None
    from lorafit.methods.lora.method import LoraConfig
    from lorafit.planner.plan import Planner, Setup

    index = max(range(len(records)), key=lambda i: records[i]["lorafit"]["peak_mib"])
    setup = Setup(LoraConfig(r=workload.r, alpha=workload.alpha, target_modules=workload.targets), torch.float32,
                  row_tokens=128, device="cuda")
    step = Planner(model.config, setup).plan_examples([examples[i] for i in plan[index]])
    planned = (step.step.peak - step.optimizer_states) / 2**20
    measured = records[index]["lorafit"]["peak_mib"]
    return {"step": index + 1, "measured_mib": measured, "planned_tensors_mib": planned,
            "error": planned / measured - 1}


def summary_row(result: dict) -> str:
    measured = result["steps"][1:]
    lorafit_tps, peft_tps, ratio, memory = Series(), Series(), Series(), {"lorafit": Series(), "peft": Series()}
    for step in measured:
        a, b = step["lorafit"], step["peft"]
        lorafit_tps.add(a["real_tokens"] / a["seconds"])
        peft_tps.add(b["real_tokens"] / b["seconds"])
        ratio.add(b["seconds"] / a["seconds"])
        for name in memory:
            if "peak_mib" in step[name]:
                memory[name].add(step[name]["peak_mib"])
    loss_delta = max(abs(s["lorafit"]["loss"] - s["peft"]["loss"]) for s in result["steps"])
    peaks = (f"{max(memory['lorafit'].samples):.0f} / {max(memory['peft'].samples):.0f} MiB "
             f"({max(memory['lorafit'].samples) / max(memory['peft'].samples):.2f}×)"
             if memory["lorafit"].samples else "—")
    planned = result.get("planned")
    plan = (f"{planned['planned_tensors_mib']:.0f} vs {planned['measured_mib']:.0f} MiB ({planned['error']:+.1%})"
            if planned else "—")
    return (f"| {result['key']} ({result['workload']}, {result['data']}) | {lorafit_tps.text('{:.0f}')} | "
            f"{peft_tps.text('{:.0f}')} | {ratio.text('{:.2f}×')} | {peaks} | {loss_delta:.1e} | {len(measured)} | "
            f"{plan} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per built-in-task workload")
    parser.add_argument("--varlen-steps", type=int, default=8, help="measured steps on the variable-length set")
    parser.add_argument("--random-weights", type=Path, default=None,
                        help="a folder from --export-model: its architecture with seeded random weights")
    parser.add_argument("--export-model", type=Path, default=None,
                        help="write the embedded model's config and tokenizer to this folder, then stop")
    args = parser.parse_args()
    if args.export_model is not None:
        model, tokenizer = load_base("cpu")
        model.config.save_pretrained(args.export_model)
        tokenizer.save_pretrained(args.export_model)
        print(f"wrote {args.export_model}: config and tokenizer of {model.config.model_type}")
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/device_check.py: --device cuda but torch.cuda.is_available() is False")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({os.cpu_count()} cores)"
    weights = "seeded random weights" if args.random_weights else "the embedded SmolLM2-135M-Instruct"
    precision = "bf16 autocast, fp32 adapters (both sides)" if device.type == "cuda" else "fp32"
    header = f"{today()}  {machine}, torch {torch.__version__}, {precision}, {weights}"
    print(header, flush=True)
    results = []
    for key, data, workload in WORKLOADS:
        steps = args.varlen_steps if data == "varlen" else args.steps
        results.append(compare(key, data, workload, steps, device, args.random_weights,
                               log=lambda m: print(m, flush=True)))
    table = ["| workload | lorafit tokens/s | peft tokens/s | ratio | peak memory per step, lorafit / peft | "
             "max \\|Δ loss\\| | steps | planner: tensors at lorafit's largest step vs measured |",
             "|---|---|---|---|---|---|---|---|"]
    table += [summary_row(r) for r in results]
    print("\n" + header + "\n\n" + "\n".join(table), flush=True)
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE
    target = folder / ("device_check.json" if os.environ.get("OUT") else "RESULTS-device.json")
    target.write_text(json.dumps({"machine": header, "command": " ".join(sys.argv), "table": table,
                                  "results": results}, indent=1), encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
