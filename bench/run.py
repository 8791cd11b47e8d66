"""lorafit against peft + transformers, side by side in one run; writes bench/RESULTS.md (issue 6).

    .venv/bin/python bench/run.py            # the full bench (~20 min on the 2-core CPU machine)
    .venv/bin/python bench/run.py --quick    # smoke test: a few steps of everything (~4 min)

Sections, in order: sgemm peak; peak RSS of each (workload, side) in a child process; training (built-in task r=8 q,v with the 50-step loss-curve check,
built-in task r=16 all-linear, variable-length set r=8 q,v), each step on lorafit then on peft;
inference (merged, unmerged, 8 adapters per
batch). See bench/README.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import SGEMM_SIZE, Series, machine_line, sgemm_gflops, today  # noqa: E402
from inference import compare_inference  # noqa: E402
from report import inference_rows, markdown, training_rows  # noqa: E402
from sides import load_tokenizer  # noqa: E402
from training import (  # noqa: E402
    compare_training,
    measure_memory,
    summarise_training,
    training_specs,
)
from workloads import DATASETS  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps of everything (a smoke test)")
    parser.add_argument("--only", nargs="+", choices=["training", "memory", "inference"],
                        default=["training", "memory", "inference"], help="sections to run")
    parser.add_argument("--results", type=Path, default=None,
                        help="the Markdown report to write (default bench/RESULTS.md; bench/RESULTS-quick.md "
                             "with --quick or --only, so a partial run never overwrites the real figures)")
    args = parser.parse_args()
    if args.results is None:  # only a full run of every section replaces the real figures
        partial = args.quick or len(set(args.only)) < 3
        args.results = HERE / ("RESULTS-quick.md" if partial else "RESULTS.md")
    started = time.perf_counter()
    command = ".venv/bin/python bench/run.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    torch.manual_seed(0)

    machine = machine_line()
    log(f"{today()}  {machine}")
    sgemm = Series(sgemm_gflops(5))
    log(f"sgemm {SGEMM_SIZE}³ fp32: {sgemm.text('{:.0f}')} GFLOP/s")

    tokenizer = load_tokenizer()
    examples = {name: build(tokenizer) for name, build in DATASETS.items()}
    for name, items in examples.items():
        lengths = sorted(len(e.input_ids) for e in items)
        log(f"data {name}: {len(items)} examples, {lengths[0]}–{lengths[-1]} tokens, median {lengths[len(lengths) // 2]}")

    specs = training_specs(args.quick)
    raw: dict = {"machine": machine, "date": today(), "command": command, "training": {}, "memory": {}}
    memory: dict = {}
    if "memory" in args.only:  # first, while this process is small (children inherit ru_maxrss)
        for spec in specs:
            memory[spec.key] = {}
            for side in ("lorafit", "peft"):
                log(f"memory {spec.key} {side} (own process)...")
                memory[spec.key][side] = measure_memory(spec.key, side, args.quick)
                log(f"  peak RSS {memory[spec.key][side]['peak_rss_mib']:.0f} MiB "
                    f"(ru_maxrss {memory[spec.key][side]['ru_maxrss_mib']:.0f} MiB)")
        raw["memory"] = memory
    summaries = {}
    if "training" in args.only:
        for spec in specs:
            log(f"training {spec.key}: {spec.title}")
            result = compare_training(spec, examples[spec.data], sgemm, log)
            raw["training"][spec.key] = result
            summaries[spec.key] = summarise_training(result)
    inference = None
    if "inference" in args.only:
        log("inference: building 8 models...")
        # 12 rounds: with 6, the unmerged prefill median (within ~1% of its goal) moved 1.5% between runs
        inference = compare_inference(examples["varlen"], tokenizer.pad_token_id, 2 if args.quick else 12,
                                      sgemm, lambda: sgemm_gflops(1)[0], log)
        raw["inference"] = inference

    rows = training_rows({s.key: s.title for s in specs}, summaries, memory)
    if inference is not None:
        rows += inference_rows(inference)
    wall = (time.perf_counter() - started) / 60
    header = {"date": today(), "command": command, "machine": machine, "sgemm": sgemm.text("{:.0f}"),
              "sgemm_size": SGEMM_SIZE, "sgemm_count": len(sgemm.samples), "wall_minutes": wall}
    text = markdown(rows, header, _notes(args.quick, specs, inference))
    args.results.write_text(text, encoding="utf-8")
    raw["sgemm_gflops"] = sgemm.samples
    args.results.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=_jsonable), encoding="utf-8")
    log("\n" + text)
    log(f"written: {args.results} and {args.results.with_suffix('.json')} ({wall:.1f} min)")


def _jsonable(value):
    if isinstance(value, Series):
        return value.samples
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def _notes(quick: bool, specs, inference) -> list[str]:
    steps = ", ".join(f"{s.key}: {s.warmup} warm-up + {s.measured} measured steps per side" for s in specs)
    notes = [
        ("QUICK MODE (smoke test): too few steps for the figures to mean anything. " if quick else "")
        + f"Steps: {steps}. Warm-up on the variable-length set uses the plan's cheapest batch; measured "
        "batches follow the loop's plan (`plan_batches`, seed 0, epoch 0), the same for both sides, and the "
        "side that goes first alternates from step to step.",
        "lorafit side: `attach`, the batch layout lorafit's loop picks (shared prompt prefix computed once, "
        "else each example of ≥ 128 tokens as its own forward call and the shorter ones packed in rows of "
        "≤ 128 tokens), `summed_token_loss` (head on labelled positions in chunks, the gradient to the hidden "
        "states computed in the same pass), loss / label tokens, backward, clip 1.0, AdamW (lr 2e-4, "
        "no weight decay). peft side: `get_peft_model`, rows right-padded to the longest, "
        "`model(input_ids, attention_mask, labels).loss` (full logits), backward, clip 1.0, AdamW (same). "
        "fp32, CPU, the same threads; collation is inside the timed step on both sides.",
        "Tokens/s counts real (non-padding) tokens; the ratio is per step (same batch on both sides). "
        "Useful FLOPs (BENCHMARKS.md rule 4): 4·N_body·T + 4·N_head·T_labelled + 6·N_lora·T with "
        "N_body = 106,168,320 (the 210 linear layers), N_head = 28,311,552 (tied output head); attention "
        "scores are not counted. With a shared prompt prefix lorafit runs fewer positions than T, so its "
        "useful FLOP/s can exceed what the hardware executes; 'executed' in the notes counts the positions "
        "each side actually ran (peft: padding and every head position included).",
        "Memory: peak RSS (VmHWM; ru_maxrss agrees because the children start before this process grows) "
        "at the end of a child process that loads the model, adapts it and runs the warm-up batch plus the "
        "largest measured batches; 'above the loaded model' subtracts the RSS just before the first step, "
        "after every weight has been faulted in (the safetensors are mmapped).",
        "Variable-length set: bench/varlen.py, generated with seed 0 (count, times tables, squares, "
        "numbers in words, numbered repetitions, echo), target lengths log-uniform in 16–1024 tokens, "
        "~88% of tokens are response; examples over 1024 tokens are dropped.",
    ]
    if inference is not None:
        checks = "; ".join(f"{k}: {'—' if v is None else f'{v:.1e}'}" for k, v in inference["checks"].items())
        notes.append("Inference: r=16 all-linear adapters with random B, eval mode, no grad; prefill = one "
                     "forward of 8×128 real tokens without cache, decode = greedy `generate` of 32 new tokens for "
                     "8 prompts of 32 tokens; 1 warm-up + "
                     f"{len(next(iter(inference['times']['prefill'].values())))} measured rounds, the order "
                     "reversed every other round. Output agreement, max \\|Δ logits\\| on the prefill: "
                     + checks + ".")
        if inference["missing"]:
            notes.append("Not supported yet by lorafit: " + ", ".join(inference["missing"]) + ".")
    return notes


if __name__ == "__main__":
    main()
