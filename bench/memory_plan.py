"""The memory planner against the real thing: `lorafit estimate`'s figure vs the measured peak of lorafit's step.

For each setting, lorafit's own training step (setup_training's optimizer and layout, train_step) runs on the
default model (SmolLM2-135M) in a process of its own: the peak resident memory (VmHWM) over `STEPS` steps,
above the process's memory before the tokenizer and model load. Six steps, not one or three: glibc's heap keeps
growing for a few steps (its free holes are split by small allocations and reused imperfectly), mostly from the
first step to the second, then by a percent or two at random steps (measured over 12-30 steps: IA3 632 → 652 MiB,
checkpointing 429 → 451 MiB), and a training run is many steps. The planner plans the same setting from the
model's config in another fresh process, as `lorafit estimate` runs; its total less the runtime part the measured
process held before loading (Python, torch, transformers) is the comparable figure.

    python bench/memory_plan.py                 # all settings -> bench/RESULTS-memory-plan.md / .json
    python bench/memory_plan.py --quick         # the first three
    python bench/memory_plan.py --validation    # the CI test's six -> bench/RESULTS-memory-plan-validation.md
    python bench/memory_plan.py --replan        # the stored measurements of RESULTS-memory-plan.json, planned
                                                # again by the current planner (after its allowances change)
    python bench/memory_plan.py --fit           # the CPU heap shares fitted to RESULTS-memory-plan.json's rows
                                                # outside the validation six (planner/plan.py's CPU_HEAP_SHARES)
    python bench/memory_plan.py --measure B L DTYPE QUANTIZE CHECKPOINTING METHOD TARGETS R   # one measurement (JSON)
    python bench/memory_plan.py --estimate B L DTYPE QUANTIZE CHECKPOINTING METHOD TARGETS R  # one plan (JSON)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 2**20
STEPS = 6  # steps per measured process (see the docstring)

# (batch, length, dtype, quantize, gradient checkpointing, method, targets ("default": the method's usual), r)
SETTINGS = [
    (8, 64, "bfloat16", "none", False, "lora", "q_proj,v_proj", 8),
    (2, 256, "bfloat16", "none", False, "lora", "q_proj,v_proj", 8),
    (1, 512, "float32", "none", False, "lora", "q_proj,v_proj", 8),
    (8, 128, "bfloat16", "nf4", False, "lora", "q_proj,v_proj", 8),
    (4, 256, "bfloat16", "none", True, "lora", "q_proj,v_proj", 8),
    (2, 256, "bfloat16", "none", False, "lora", "all-linear", 16),
    (2, 256, "bfloat16", "none", False, "dora", "q_proj,v_proj", 8),
    (4, 256, "bfloat16", "none", False, "ia3", "default", 8),
    (16, 96, "float32", "none", False, "lora", "q_proj,v_proj", 8),
    (4, 512, "bfloat16", "none", False, "lora", "all-linear", 8),
    (1, 1024, "float32", "none", False, "lora", "q_proj,v_proj", 8),
    (8, 256, "bfloat16", "nf4", True, "lora", "q_proj,k_proj,v_proj,o_proj", 8),
    (2, 512, "bfloat16", "none", True, "lora", "q_proj,v_proj", 8),
    (8, 128, "float32", "none", True, "lora", "all-linear", 8),
    (4, 256, "bfloat16", "nf4", False, "lora", "all-linear", 8),
    (2, 512, "bfloat16", "nf4", False, "lora", "q_proj,v_proj", 16),
]

# The CI test (tests/planner): batch, length, method, r/targets, checkpointing and nf4 each varied; the CPU
# allocator allowance (planner/plan.py) is fitted to the other rows, so these are out of sample.
VALIDATION = [SETTINGS[i] for i in (0, 3, 4, 5, 6, 7)]


def adapter(method: str, targets: str, r: int):
    """The adapter `lorafit train --method M --targets T --r R` attaches (its defaults for the rest: LoRA
    dropout 0.05, ...), for the measured run and the plan alike."""
    import lorafit.methods  # noqa: F401  (the built-in methods' registry lines)
    from lorafit.core.registry import config_from_options
    from lorafit.core.selection import parse_targets

    return config_from_options(method, parse_targets(None if targets == "default" else [targets]), {"r": r})


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _examples(batch: int, length: int, count: int):
    import torch

    from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample

    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(count):
        ids = torch.randint(3, 40000, (length,), generator=generator).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2:]))
    return examples


def measure(batch: int, length: int, dtype: str, quantize: str, checkpointing: bool, method: str, targets: str,
            r: int, mark=None) -> dict:
    """`STEPS` steps of lorafit's loop step on the default model; peak RSS above the memory before loading (and
    after each step, to show the heap's growth from step to step). `mark(k)`, when given, is called before (odd k)
    and after (even k) each step (bench/heap_replay.py marks its allocation log with it)."""
    import torch

    import lorafit
    from lorafit.models.loading import load_model_and_tokenizer
    from lorafit.models.quantize import QuantizeSettings
    from lorafit.train.attention import use_fp32_attention
    from lorafit.train.loop import LoopSettings
    from lorafit.train.setup import set_activation_checkpointing, setup_training
    from lorafit.train.step import train_step

    chosen = adapter(method, targets, r)  # before the baseline: it imports the command's modules (tyro, ...)
    baseline = _status("VmRSS")
    settings = QuantizeSettings(quantize) if quantize != "none" else None
    model, tokenizer = load_model_and_tokenizer(None, dtype=dtype, device="cpu", quantize=settings)
    torch.manual_seed(0)
    lorafit.attach(model, chosen)
    loop = LoopSettings(steps=3, batch_size=batch, gradient_checkpointing=checkpointing)
    run = setup_training(model, loop, Path(tempfile.mkdtemp()), pad_id=tokenizer.pad_token_id,
                         vocab_size=model.config.vocab_size, echo=lambda _: None)
    if checkpointing:
        set_activation_checkpointing(model, True)
    use_fp32_attention(model)
    model.train()
    loaded = _status("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # the peak (VmHWM) starts again from now: the load's own peak is not the step's
    examples = _examples(batch, length, STEPS * batch)
    started = time.perf_counter()
    by_step = []
    for step in range(STEPS):
        if mark:
            mark(2 * step + 1)
        train_step(model, run.collate(examples[step * batch:(step + 1) * batch]), run.parameters, run.optimizer, 1.0,
                   gradients=run.gradients)
        if mark:
            mark(2 * step + 2)
        by_step.append(_status("VmHWM") - baseline)
    return {"loaded": loaded - baseline, "peak": by_step[-1], "peak_by_step": by_step,
            "seconds_per_step": (time.perf_counter() - started) / STEPS}


def planner_for(setting: tuple):
    """The Planner `lorafit estimate` builds for this setting on the default model, and its measured runtime."""
    import torch

    from lorafit.models.loading import load_config, resolve_model_folder
    from lorafit.models.quantize import QuantizeSettings
    from lorafit.planner.plan import Planner, Setup
    from lorafit.planner.runtime import measure_runtime

    batch, length, dtype, quantize, checkpointing, method, targets, r = setting
    folder = resolve_model_folder(None)
    config = load_config(folder)
    runtime = measure_runtime("cpu", folder, quantized=quantize != "none", config=config)
    torch_dtype = getattr(torch, dtype)
    quantized = QuantizeSettings(quantize, compute_dtype=torch_dtype) if quantize != "none" else None
    setup = Setup(adapter(method, targets, r), torch_dtype, quantized, checkpointing, 128, "cpu")
    return Planner(config, setup, runtime=(runtime.total, runtime.note), layout=runtime.layout), runtime


def estimate(setting: tuple) -> dict:
    """What `lorafit estimate` plans for this setting, in this (fresh) process: its total, less the part of the
    runtime the measured run's baseline already holds (Python, torch, transformers)."""
    from lorafit.planner.plan import Workload

    batch, length = setting[0], setting[1]
    planner, runtime = planner_for(setting)
    plan = planner.plan(Workload(batch, length, prompt_length=length // 2))
    return {"estimated": plan.total - runtime.process, "tensor_peak": plan.step.peak, "weights": plan.weight_bytes,
            "tokenizer": runtime.tokenizer, "bitsandbytes": runtime.bitsandbytes, "architecture": runtime.architecture,
            "allocator": plan.allocator, "allocator_note": plan.allocator_note, "heap_bases": plan.heap_bases,
            "without_allocator": plan.total - runtime.process - plan.allocator}


def _subprocess(mode: str, setting: tuple) -> dict:
    batch, length, dtype, quantize, checkpointing, method, targets, r = setting
    command = [sys.executable, str(Path(__file__).resolve()), mode, str(batch), str(length), dtype, quantize,
               str(int(checkpointing)), method, targets, str(r)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(settings: list[tuple], repeats: int = 3) -> list[dict]:
    """Each setting measured `repeats` times, each in a process of its own, and estimated in another (as
    `lorafit estimate` runs). The measured figure is the median: identical runs' peak RSS differs by a few
    percent (glibc's heap; up to ±9% with NF4 and checkpointing), and one run is one draw of that."""
    rows = []
    for setting in settings:
        runs = [_subprocess("--measure", setting) for _ in range(repeats)]
        peaks = sorted(run["peak"] for run in runs)
        measured = statistics.median(peaks)
        planned = _subprocess("--estimate", setting)
        rows.append({"setting": list(setting), "measured": measured, "measured_runs": peaks, **planned,
                     "error": planned["estimated"] / measured - 1, "loaded": statistics.median(r["loaded"] for r in runs),
                     "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs)})
        print(_row(rows[-1]), flush=True)
    return rows


def replan(rows: list[dict]) -> list[dict]:
    """The stored rows' measurements against what the current planner estimates for them (each in a fresh
    process): for checking a change of the planner's allowances without measuring again."""
    replanned = []
    for row in rows:
        planned = _subprocess("--estimate", tuple(row["setting"]))
        replanned.append({**row, **planned, "error": planned["estimated"] / row["measured"] - 1})
        print(_row(replanned[-1]), flush=True)
    return replanned


def fit(rows: list[dict]) -> dict[str, float]:
    """The CPU heap shares (planner/plan.py's CPU_HEAP_SHARES) that best fit `rows` outside VALIDATION.

    Each row's estimate is its plan without the allocator part plus Σ share × basis (the row's heap_bases);
    the shares minimise the sum of squared relative errors against the measured medians (least squares),
    rounded to two decimals as plan.py states them.
    """
    import torch

    validation = [list(setting) for setting in VALIDATION]
    fitted = [row for row in rows if row["setting"] not in validation]
    names = sorted({name for row in fitted for name in row["heap_bases"]})
    design = torch.tensor([[row["heap_bases"].get(name, 0) / row["measured"] for name in names] for row in fitted],
                          dtype=torch.float64)
    target = torch.tensor([1 - row["without_allocator"] / row["measured"] for row in fitted], dtype=torch.float64)
    shares = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    return {name: round(float(share), 2) for name, share in zip(names, shares)}


def _row(row: dict) -> str:
    batch, length, dtype, quantize, checkpointing, method, targets, r = row["setting"]
    rank = f" r={r}" if method in ("lora", "dora") else ""
    what = f"{batch} × {length}, {dtype}{', ' + quantize if quantize != 'none' else ''}" \
           f"{', checkpointing' if checkpointing else ''}, {method} on {targets}{rank}"
    runs = row.get("measured_runs") or [row["measured"]]
    spread = f"{runs[0] / MiB:,.0f}–{runs[-1] / MiB:,.0f}" if len(runs) > 1 else "–"
    return (f"| {what} | {row['estimated'] / MiB:,.0f} | {row['measured'] / MiB:,.0f} | {spread} | {row['error']:+.1%} | "
            f"{row['tensor_peak'] / MiB:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--validation", action="store_true", help="only the CI test's settings (VALIDATION)")
    parser.add_argument("--replan", action="store_true", help="re-plan RESULTS-memory-plan.json's measured rows")
    parser.add_argument("--fit", action="store_true", help="the CPU heap shares that fit RESULTS-memory-plan.json's "
                        "rows outside the validation six (for planner/plan.py's CPU_HEAP_SHARES)")
    parser.add_argument("--repeats", type=int, default=3, help="measured processes per setting (median)")
    parser.add_argument("--measure", nargs=8)
    parser.add_argument("--estimate", nargs=8)
    args = parser.parse_args()
    for given, run in ((args.measure, measure), (args.estimate, None)):
        if given:
            batch, length, dtype, quantize, checkpointing, method, targets, r = given
            setting = (int(batch), int(length), dtype, quantize, checkpointing == "1", method, targets, int(r))
            print(json.dumps(run(*setting) if run else estimate(setting)))
            return
    if args.fit:
        stored = json.loads((HERE / "RESULTS-memory-plan.json").read_text())["rows"]
        shares = fit(stored)
        print("CPU_HEAP_SHARES =", json.dumps(shares))
        for row in stored:
            planned = row["without_allocator"] + sum(shares[k] * v for k, v in row["heap_bases"].items())
            held_out = " (validation: not fitted)" if tuple(row["setting"]) in VALIDATION else ""
            print(f"{_row({**row, 'estimated': planned, 'error': planned / row['measured'] - 1})}{held_out}")
        return
    machine = f"{platform.processor() or platform.machine()}, {platform.platform()}"
    flag = next((f" --{name}" for name in ("quick", "validation", "replan") if getattr(args, name)), "")
    command = "python bench/memory_plan.py" + flag
    name = "RESULTS-memory-plan" + flag.replace(" --", "-")
    if args.replan:
        stored = json.loads((HERE / "RESULTS-memory-plan.json").read_text())
        rows = replan(stored["rows"])
        measured_words = (f"the measurements of `{stored['command']}` (RESULTS-memory-plan.json, {stored['machine']}) "
                          "kept, each setting planned again by the current planner")
    else:
        settings = SETTINGS[:3] if args.quick else VALIDATION if args.validation else SETTINGS
        rows = compare(settings, args.repeats)
        measured_words = "measured now"
    lines = [f"# The memory planner vs lorafit's measured step ({time.strftime('%Y-%m-%d')})", "",
             f"`{command}` on {machine}; {measured_words}. Measured: peak RSS over {STEPS} steps of lorafit's step on the "
             f"default model (SmolLM2-135M), above the process before loading, the median of {args.repeats} processes "
             "(their range beside it); estimated: `lorafit estimate`'s total for the same "
             "setting (in a fresh process, as the command runs), less the part of its measured runtime that the measured "
             "process already held before loading (Python, torch, transformers). Half of each example is prompt (no "
             "labels).", "",
             "| setting | estimated MiB | measured MiB (median) | measured runs MiB | error | tensors at the step's peak MiB |",
             "|---|---|---|---|---|---|"]
    lines += [_row(row) for row in rows]
    (HERE / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (HERE / f"{name}.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
