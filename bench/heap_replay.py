"""Where the CPU heap's excess over the live tensors comes from: a training step's malloc log replayed through glibc.

The planner counts a step's tensors exactly (tests/planner), yet the resident peak of lorafit's step on this CPU is
25-80% above them. This script runs bench/memory_plan.py's measured step for a setting under an LD_PRELOAD tracer
(heaptrace/tracer.c: every malloc, free, realloc and aligned allocation, in order, with its caller), then replays
the log through glibc in a fresh process (heaptrace/replay.c) twice: as it was, and with the allocations made
during the steps by anything but libc10 (PyTorch's CPU tensors) left out. The first reproduces the traced
process's heap; the difference between the two is what the C++ bookkeeping allocated between the tensors
(autograd's nodes, TensorImpls, saved-variable records, small strings) costs in free holes it splits and pins.

    python bench/heap_replay.py                  # bench/memory_plan.py's settings -> bench/RESULTS-heap-replay.md
    python bench/heap_replay.py --settings 0 7   # some of them (indices into memory_plan.SETTINGS)

Needs gcc (the tracer and the replay are compiled into a temporary folder). A diagnostic for the planner's
allowances (lorafit issue 16); lorafit itself does not use it, and CI does not run it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 2**20


def build(folder: Path) -> tuple[Path, Path]:
    tracer, replay = folder / "tracer.so", folder / "replay"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(tracer), str(HERE / "heaptrace" / "tracer.c"),
                    "-lpthread"], check=True)
    subprocess.run(["gcc", "-O2", "-o", str(replay), str(HERE / "heaptrace" / "replay.c")], check=True)
    return tracer, replay


def _traced_child(setting: list) -> None:
    """In the traced process: the measured step, each step bracketed by marks in the log; its maps for the replay."""
    sys.path.insert(0, str(HERE))
    import memory_plan

    tracer = ctypes.CDLL(None)  # the preloaded tracer's heaptrace_mark is in the global namespace
    result = memory_plan.measure(*setting, mark=lambda k: tracer.heaptrace_mark(ctypes.c_uint64(k)))
    Path(os.environ["HEAPTRACE_FILE"] + ".maps").write_text(Path("/proc/self/maps").read_text())
    print(json.dumps(result))


def _c10_range(maps: Path) -> tuple[str, str]:
    for line in maps.read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5].endswith("/libc10.so") and "x" in fields[1]:
            start, end = fields[0].split("-")
            return start, end
    raise RuntimeError("libc10.so is not mapped in the traced process")


def trace_and_replay(setting: tuple, folder: Path, tracer: Path, replay: Path) -> dict:
    log = folder / "heap.log"
    env = dict(os.environ, HEAPTRACE_FILE=str(log), LD_PRELOAD=str(tracer))
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(list(setting))], env=env,
                          capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    start, end = _c10_range(Path(str(log) + ".maps"))
    replays = {}
    for name, extra in (("all", []), ("tensors_only", ["tensors-only"])):
        out = subprocess.run([str(replay), str(log), start, end, *extra], capture_output=True, text=True, check=True)
        steps = json.loads(out.stdout)
        first = steps[0]["heap_at_start_MiB"]
        # the heap's peak over all steps, above its extent when the first step started
        replays[name] = max(step["heap_at_start_MiB"] + step["heap_MiB"] - first for step in steps)
        replays["tensors"] = max(step["tensors_MiB"] for step in steps)
    log.unlink()
    return {"setting": list(setting), "measured_step_MiB": (measured["peak"] - measured["loaded"]) / MiB,
            "replayed_MiB": replays["all"], "replayed_tensors_only_MiB": replays["tensors_only"],
            "tensor_peak_MiB": replays["tensors"]}


def _row(row: dict) -> str:
    batch, length, dtype, quantize, checkpointing, method, targets, r = row["setting"]
    what = (f"{batch} × {length}, {dtype}{', ' + quantize if quantize != 'none' else ''}"
            f"{', checkpointing' if checkpointing else ''}, {method} on {targets}"
            f"{f' r={r}' if method in ('lora', 'dora') else ''}")
    tensors = row["tensor_peak_MiB"]
    excess, alone = row["replayed_MiB"] - tensors, row["replayed_tensors_only_MiB"] - tensors
    return (f"| {what} | {tensors:,.0f} | {row['measured_step_MiB']:,.0f} | {row['replayed_MiB']:,.0f} | "
            f"{excess:+,.0f} ({excess / tensors:+.0%}) | {alone:+,.0f} ({alone / tensors:+.0%}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=int, nargs="*", help="indices into memory_plan.SETTINGS (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _traced_child(json.loads(args.child))
        return
    sys.path.insert(0, str(HERE))
    import memory_plan

    chosen = args.settings if args.settings else range(len(memory_plan.SETTINGS))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tracer, replay = build(Path(folder))
        for index in chosen:
            rows.append(trace_and_replay(memory_plan.SETTINGS[index], Path(folder), tracer, replay))
            print(_row(rows[-1]), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {platform.platform()}"
    command = "python bench/heap_replay.py" + (" --settings " + " ".join(map(str, args.settings)) if args.settings else "")
    lines = [f"# A training step's malloc log replayed through glibc ({time.strftime('%Y-%m-%d')})", "",
             (f"`{command}` on {machine}. For each setting, bench/memory_plan.py's measured step ({memory_plan.STEPS} "
             "steps on the default model) ran under heaptrace/tracer.c; its log was replayed through glibc in a fresh "
             "process (heaptrace/replay.c). Tensors: the peak of live bytes allocated from libc10 (PyTorch's CPU "
             "tensors) above the first step's start; measured: the traced process's peak RSS growth over the steps; "
             "replayed: the heap's peak growth (brk extent + mmapped chunks) in the replay; the excess over the "
             "tensors, with everything replayed and with the steps' non-tensor allocations (C++ bookkeeping) left out."),
             "", "| setting | tensors MiB | measured MiB | replayed MiB | excess, all replayed | excess, tensors alone |",
             "|---|---|---|---|---|---|"]
    lines += [_row(row) for row in rows]
    name = "RESULTS-heap-replay" + ("-some" if args.settings else "")
    (HERE / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (HERE / f"{name}.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
