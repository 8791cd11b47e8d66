"""Which float weights an adapter trained on a 4-bit base should be merged into (issue 15).

    .venv/bin/python bench/quantized_merge.py                 # trains one (~5 min), then ~8 min of evaluation
    .venv/bin/python bench/quantized_merge.py --run RUN       # an existing `lorafit train --quantize nf4` run

An adapter trained on an NF4 base learned ΔW against the dequantized weights Q(W), not against W. Merged
into Q(W) it gives exactly the model it was trained as; merged into the original W it gives W + ΔW,
which differs from what it was trained as by the quantization error W − Q(W). This measures both on the
built-in task's held-out split (loss, greedy exact match), next to the adapter on its quantized base,
every figure from `lorafit eval --json` in its own process with lorafit's defaults (the merged folders
are saved in float32, `lorafit merge`'s default); writes bench/RESULTS-quantized-merge.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import lorafit, machine_line, today  # noqa: E402


def evaluate(*arguments: str) -> dict:
    return json.loads(lorafit("eval", "--json", *arguments).strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished `lorafit train --quantize nf4` run (default: train one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorafit-qmerge-"))
    run = args.run
    if run is None:
        run = work / "run"
        print(f"training {run} (lorafit train --quantize nf4)...", flush=True)
        lorafit("train", "--quantize", "nf4", "--output", str(run))
    rows = [("adapter on its NF4 base (what training measured)", evaluate("--adapter", str(run)))]
    for into in ("dequantized", "original"):
        merged = work / f"merged-{into}"
        print(f"merging into {into}...", flush=True)
        lorafit("merge", "--adapter", str(run), "--merge-into", into, "--output", str(merged))
        rows.append((f"merged into the {'dequantized NF4' if into == 'dequantized' else 'original float'} weights "
                     f"(`--merge-into {into}`)", evaluate("--model", str(merged))))
    rows.append(("the float base alone, no adapter", evaluate()))
    lines = ["# Merging an adapter trained on an NF4 base (bench/quantized_merge.py, issue 15)", "",
             f"{today()} · {machine_line()} · run: `{run}`", "",
             "| model | held-out loss | exact match (100) |", "|---|---|---|"]
    for title, metrics in rows:
        lines.append(f"| {title} | {metrics['loss']:.4f} | {metrics['exact_match']:.1%} |")
    text = "\n".join(lines) + "\n"
    (HERE / "RESULTS-quantized-merge.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
