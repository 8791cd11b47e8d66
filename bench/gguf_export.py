"""The fine-tuned default model in llama.cpp itself, exported by `lorafit export` (issue 18).

    .venv/bin/python bench/gguf_export.py               # trains the default job first (~3 min), then ~5 min
    .venv/bin/python bench/gguf_export.py --run RUN     # an existing `lorafit train` run on the embedded model

Exports the run's adapter as a GGUF adapter (f32, f16, bf16) applied by llama.cpp to the embedded Q4_1
SmolLM2 GGUF, and as merged GGUFs (f16, q8_0, f32 merged tensors; the others carried over from the Q4_1
file), then scores the built-in task's 100 held-out prompts in llama.cpp (llama-cpp-python, the test
extra: chat template rendered by transformers, tokenized by llama.cpp, greedy, up to 32 tokens) next to
lorafit's own figure for the same adapter (the run's metrics.json). Writes bench/RESULTS-gguf.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import lorafit, machine_line, today  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a `lorafit train` run folder on the embedded model")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from lorafit.data.tasks import BUILTIN, date_task_splits
    from lorafit.models.gguf_cache import default_model_path
    from lorafit.models.loading import resolve_model_folder
    from tests.formats import llama_cpp_oracle as oracle

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    run = args.run
    if run is None:
        run = work / "run"
        lorafit("train", "--output", str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    seed = yaml.safe_load((run / "config.yaml").read_text())["seed"]
    _, held_out = date_task_splits(BUILTIN.train_examples, BUILTIN.held_out_examples, seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(None))
    base = default_model_path()

    rows = []

    def score(label: str, model: Path, lora: Path | None = None, size_of: Path | None = None) -> None:
        started = time.perf_counter()
        result = oracle.exact_match(oracle.load(model, lora_path=lora), tokenizer, held_out)
        rows.append({"setting": label, "exact_match": result["exact_match"],
                     "tokenized_differently": result["tokenized_differently"],
                     "file_mib": round((size_of or model).stat().st_size / 2**20, 2),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)

    score("base Q4_1 GGUF alone (no adapter)", base)
    for outtype in ("f32", "f16", "bf16"):
        adapter = work / f"adapter-{outtype}.gguf"
        lorafit("export", "--adapter", str(run), "--outtype", outtype, "--output", str(adapter))
        score(f"base Q4_1 GGUF + `--format gguf-lora --outtype {outtype}`", base, adapter, size_of=adapter)
    for outtype in ("f16", "q8_0", "f32"):
        merged = work / f"merged-{outtype}.gguf"
        lorafit("export", "--adapter", str(run), "--format", "gguf", "--outtype", outtype, "--output", str(merged))
        score(f"merged `--format gguf --outtype {outtype}` (other tensors Q4_1 as in the base)", merged)

    when = today()
    header = f"{when} · {machine_line()} · run: `{run}`"
    lines = [
        "# The fine-tuned default model in llama.cpp (bench/gguf_export.py, issue 18)", "", header, "",
        f"lorafit's own figure for this adapter (the run's metrics.json, bf16 base on this CPU): exact match "
        f"{metrics['after']['exact_match']:.1%} (before training {metrics['before']['exact_match']:.1%}).", "",
        "| in llama.cpp (llama-cpp-python 0.3.36) | exact match (100 held-out) | prompts tokenized differently "
        "from lorafit | file MiB | seconds |", "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['exact_match']:.1%} | {row['tokenized_differently']} | "
                     f"{row['file_mib']} | {row['seconds']} |")
    lines += ["", "Command: `.venv/bin/python bench/gguf_export.py" + (f" --run {args.run}`" if args.run else "`"), ""]
    (HERE / "RESULTS-gguf.md").write_text("\n".join(lines), encoding="utf-8")
    (HERE / "RESULTS-gguf.json").write_text(json.dumps({"when": when, "machine": machine_line(), "run": str(run),
                                                        "lorafit": metrics["after"], "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
