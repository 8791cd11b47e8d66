"""`lorafit train --nproc 2` with --strategy ddp and fsdp side by side: resident memory per process, step time,
and that both train the same curve.

Each process's resident set (VmRSS) is sampled every 0.2 s from /proc, over the whole run (which includes
loading the whole base, before FSDP2 shards it) and over the training steps alone (from the first line of the
step log on). On 2 CPU cores each process gets one thread; the step times are gloo's on loopback, not a GPU
cluster's. Writes bench/RESULTS-distributed.md.

    python bench/distributed_memory.py [--steps 8] [--dtype float32] [--no-gradient-checkpointing]

With checkpointing (the default here) both strategies run the same batch layout; without it ddp shares the
built-in task's prompt prefix, which fsdp never does, and the activations then differ too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line, today

HERE = Path(__file__).resolve().parent
TAG = "LORAFIT_BENCH_DISTRIBUTED"


def rank_processes(tag: str) -> dict[int, int]:
    """{rank: pid} of the training processes carrying this run's tag in their environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            variables = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0")
                             if b"=" in item)
        except OSError:
            continue
        if variables.get(TAG.encode()) == tag.encode() and b"RANK" in variables and b"LOCAL_RANK" in variables:
            found[int(variables[b"RANK"])] = int(entry.name)
    return found


def resident_mib(pid: int) -> dict | None:
    """{"anon": the process's own memory, "file": pages of mapped files (the weights safetensors maps; shared
    between processes and counted in each one's VmRSS)} in MiB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    values = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in lines if line.startswith(("RssAnon", "RssFile"))}
    return {"anon": values["RssAnon"], "file": values["RssFile"]} if len(values) == 2 else None


def run(strategy: str, args, folder: Path) -> dict:
    output = folder / strategy
    command = [sys.executable, "-m", "lorafit", "train", "--nproc", "2", "--strategy", strategy,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
               "--eval-examples", "0", "--dropout", str(args.dropout), "--output", str(output)]
    command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    env = {**os.environ, TAG: strategy, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    whole, training = {}, {}  # (rank, kind) -> the largest MiB seen
    while launcher.poll() is None:
        stepping = (output / "log.jsonl").is_file() and (output / "log.jsonl").stat().st_size > 0
        for rank, pid in rank_processes(strategy).items():
            for kind, value in (resident_mib(pid) or {}).items():
                whole[rank, kind] = max(whole.get((rank, kind), 0.0), value)
                if stepping:
                    training[rank, kind] = max(training.get((rank, kind), 0.0), value)
        time.sleep(0.2)
    text = launcher.stdout.read()
    if launcher.returncode != 0:
        raise SystemExit(f"{strategy}: lorafit train failed:\n{text[-3000:]}")
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return {"strategy": strategy, "seconds": time.monotonic() - started,
            "peak_anon_mib": [round(whole[r, "anon"]) for r in (0, 1)],
            "training_anon_mib": [round(training[r, "anon"]) for r in (0, 1)],
            "training_file_mib": [round(training[r, "file"]) for r in (0, 1)],
            "step_seconds": statistics.median(entry["seconds"] for entry in log[1:] or log),
            "losses": [entry["loss"] for entry in log]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dropout", type=float, default=0.0)  # dropout masks follow the layout: curves differ
    # on: both strategies run the same batch layout (ddp shares the task's prompt prefix otherwise; fsdp never)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = [run(strategy, args, Path(folder)) for strategy in ("ddp", "fsdp")]
    ddp, fsdp = results
    largest = max(abs(a - b) for a, b in zip(ddp["losses"], fsdp["losses"]))
    lines = [f"# `lorafit train --nproc 2`: ddp vs fsdp ({today()})", "",
             f"Machine: {machine_line()} (each process: 1 thread)", "",
             f"Command: `python bench/distributed_memory.py --steps {args.steps} --batch-size {args.batch_size} "
             f"--dtype {args.dtype} --dropout {args.dropout}"
             + (" --gradient-checkpointing" if args.gradient_checkpointing else " --no-gradient-checkpointing")
             + "` (the embedded SmolLM2-135M-Instruct, the built-in "
             "task, LoRA r=8 on q,v)", "",
             "Per process (rank 0, rank 1), the largest seen: its own memory (RssAnon) over the whole run and during "
             "the steps, and the mapped weight-file pages (RssFile: page cache shared by the processes, in each "
             "one's VmRSS).", "",
             "| strategy | own MiB, whole run | own MiB, steps | mapped file MiB, steps | median step s | run s |",
             "|---|---|---|---|---|---|"]
    for result in results:
        cells = [", ".join(map(str, result[key])) for key in ("peak_anon_mib", "training_anon_mib",
                                                               "training_file_mib")]
        lines.append(f"| {result['strategy']} | {' | '.join(cells)} | {result['step_seconds']:.3f} | "
                     f"{result['seconds']:.0f} |")
    lines += ["", f"Loss curves: largest difference between ddp and fsdp over {len(ddp['losses'])} steps: "
              f"{largest:.2e}.", ""]
    (HERE / "RESULTS-distributed.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
