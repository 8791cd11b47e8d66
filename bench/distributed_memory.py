"""`lorafit train --nproc 2` with --strategy ddp and fsdp side by side: resident memory per process, step time,
and that both train the same curve.

Each process's resident set (VmRSS) is sampled every 0.2 s from /proc, over the whole run (which includes
loading the whole base, before FSDP2 shards it) and over the training steps alone (from the first line of the
step log on). On 2 CPU cores each process gets one thread; the step times are gloo's on loopback, not a GPU
cluster's. Writes bench/RESULTS-distributed.md.

    python bench/distributed_memory.py [--steps 8] [--dtype float32]
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


def resident_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(strategy: str, args, folder: Path) -> dict:
    output = folder / strategy
    command = [sys.executable, "-m", "lorafit.cli", "train", "--nproc", "2", "--strategy", strategy,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
               "--eval-examples", "0", "--output", str(output)]
    env = {**os.environ, TAG: strategy, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    whole, training = {}, {}
    while launcher.poll() is None:
        stepping = (output / "log.jsonl").is_file() and (output / "log.jsonl").stat().st_size > 0
        for rank, pid in rank_processes(strategy).items():
            value = resident_mib(pid)
            if value is not None:
                whole[rank] = max(whole.get(rank, 0.0), value)
                if stepping:
                    training[rank] = max(training.get(rank, 0.0), value)
        time.sleep(0.2)
    text = launcher.stdout.read()
    if launcher.returncode != 0:
        raise SystemExit(f"{strategy}: lorafit train failed:\n{text[-3000:]}")
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return {"strategy": strategy, "seconds": time.monotonic() - started,
            "peak_mib": [round(whole[r], 1) for r in sorted(whole)],
            "training_mib": [round(training[r], 1) for r in sorted(training)],
            "step_seconds": statistics.median(entry["seconds"] for entry in log[1:] or log),
            "losses": [entry["loss"] for entry in log]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = [run(strategy, args, Path(folder)) for strategy in ("ddp", "fsdp")]
    ddp, fsdp = results
    largest = max(abs(a - b) for a, b in zip(ddp["losses"], fsdp["losses"]))
    lines = [f"# `lorafit train --nproc 2`: ddp vs fsdp ({today()})", "",
             f"Machine: {machine_line()} (each process: 1 thread)", "",
             f"Command: `python bench/distributed_memory.py --steps {args.steps} --batch-size {args.batch_size} "
             f"--dtype {args.dtype}` (the embedded SmolLM2-135M-Instruct, the built-in task, LoRA r=8 on q,v)", "",
             "| strategy | resident MiB per process, whole run (rank 0, 1) | during the steps | median step s | "
             "run s |", "|---|---|---|---|---|"]
    for result in results:
        lines.append(f"| {result['strategy']} | {', '.join(map(str, result['peak_mib']))} | "
                     f"{', '.join(map(str, result['training_mib']))} | {result['step_seconds']:.3f} | "
                     f"{result['seconds']:.0f} |")
    lines += ["", f"Loss curves: largest difference between ddp and fsdp over {len(ddp['losses'])} steps: "
              f"{largest:.2e}.", ""]
    (HERE / "RESULTS-distributed.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
