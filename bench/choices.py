"""Measured choices for `lorafit train`'s defaults: gradient checkpointing and torch.compile (issue 6).

    .venv/bin/python bench/choices.py             # writes bench/RESULTS-choices.md (~6 min on 2 cores)
    .venv/bin/python bench/choices.py --steps 4   # a quicker, rougher look

Each variant runs in its own process (so its peak RSS is its own) on the same batches of the built-in
task (LoRA r=8 on q, v, batch 8, the loop's plan): the loop's default layout in eager mode; the same
with transformers' gradient checkpointing (which turns the key/value cache off, so the shared-prefix
layout gives way to packed rows); and the body under `torch.compile`, first with an empty compile cache
(what a user's first run pays), then with the cache that run filled. A default run is 100 steps, so a
variant is worth keeping when first step + 99 × median step beats the default's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {
    "default": "the loop's default (shared prefix once, else long examples alone and short ones packed), eager",
    "checkpointing": "transformers' gradient checkpointing (non-reentrant); packed rows instead of the shared prefix",
    "compile-cold": "`lorafit train --compile`: `torch.compile` of the model body (inductor), empty compile cache",
    "compile-warm": "the same, inductor's on-disk cache filled by the cold run",
}


def run_variant(variant: str, steps: int) -> dict:
    """Inside a child: load, adapt, run `steps` + 1 steps of the built-in task, report times and peak RSS."""
    import torch
    from common import high_water_rss_mib
    from sides import QV8, LorafitSide, load_base
    from workloads import DATASETS, batch_plan

    from lorafit.train import setup
    from lorafit.train.step import choose_collate

    model, tokenizer = load_base()
    examples = DATASETS["date"](tokenizer)
    plan = batch_plan(examples)
    side = LorafitSide(model, tokenizer, QV8)
    if variant == "checkpointing":
        setup.set_activation_checkpointing(model, True)
        side.collate = choose_collate(model, model.config.vocab_size, tokenizer.pad_token_id, row_tokens=128,
                                      gradient_checkpointing=True, echo=lambda _: None)
    elif variant.startswith("compile"):
        side.body = setup.compiled_body(model, "inductor", torch.device("cpu"), echo=lambda _: None)
    seconds, losses = [], []
    for indices in plan[: steps + 1]:
        started = time.perf_counter()
        info = side.step([examples[i] for i in indices])
        seconds.append(time.perf_counter() - started)
        losses.append(info["loss"])
    return {"variant": variant, "seconds": seconds, "losses": losses, "peak_rss_mib": high_water_rss_mib()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps after the first")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS-choices.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.steps)))
        return

    from common import machine_line, today

    started = time.perf_counter()
    results = {}
    compile_cache = tempfile.mkdtemp(prefix="lorafit-inductor-")  # empty: the first compile starts cold
    for variant in VARIANTS:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": compile_cache}
        child = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(args.steps)],
                               capture_output=True, text=True, check=True, env=env)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant}: first {r['seconds'][0]:.1f} s, median {_median(r['seconds'][1:]):.2f} s, "
              f"peak {r['peak_rss_mib']:.0f} MiB", flush=True)

    shutil.rmtree(compile_cache, ignore_errors=True)
    base = results["default"]
    base_run = base["seconds"][0] + 99 * _median(base["seconds"][1:])
    lines = [
        "# Measured choices: gradient checkpointing and torch.compile",
        "",
        f"- date: {today()}",
        f"- command: `.venv/bin/python bench/choices.py --steps {args.steps}`",
        f"- machine: {machine_line()}",
        f"- wall time: {(time.perf_counter() - started) / 60:.1f} min",
        "",
        "Built-in task, LoRA r=8 on q_proj, v_proj, batch 8, fp32 CPU; the same batches for every variant, "
        f"each in its own process; 1 first step + {args.steps} measured steps.",
        "",
        "| variant | first step | median step (min–max) | all steps measured | 100-step run (first + 99 × median) | "
        "vs default | peak RSS | max \\|Δ loss\\| vs default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, description in VARIANTS.items():
        r = results[variant]
        rest = r["seconds"][1:]
        run_seconds = r["seconds"][0] + 99 * _median(rest)
        delta = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        lines.append(f"| {variant}: {description} | {r['seconds'][0]:.1f} s | {_median(rest):.2f} s "
                     f"({min(rest):.2f}–{max(rest):.2f}) | {sum(r['seconds']):.0f} s | {run_seconds:.0f} s | "
                     f"{run_seconds / base_run:.2f}× | "
                     f"{r['peak_rss_mib']:.0f} MiB ({r['peak_rss_mib'] / base['peak_rss_mib']:.2f}×) | {delta:.1e} |")
    lines += ["", "A step far above the median under `torch.compile` is a recompilation for a new batch shape "
              "(the 100-step projection does not include further ones). 'cold' compiles into an empty inductor "
              "cache (a user's first run); 'warm' runs next with that cache filled. Per-step seconds and losses: "
              f"`{args.results.with_suffix('.json').name}`."]
    args.results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.results.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
