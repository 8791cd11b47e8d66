"""Data preparation at size (issue 34): lorafit's against the batched fast-tokenizer limit and `datasets.map`.

    .venv/bin/python bench/data.py                    # 100k and 1M records (~15 min on 2 cores, ~2 GB of disk)
    .venv/bin/python bench/data.py --records 100000   # one size

Side by side in one run, on the same alpaca-style JSONL (seeded, words of the model's own vocabulary, so a
record is ~220 tokens with SmolLM2's chat template), each side in its own child process (its peak RSS is
its own, children included):
- limit: the records read and rendered with the chat template (timed apart), then the model's fast
  tokenizer called on batches of 1,000 rendered texts: what any preparation must at least do.
- lorafit: `prepare_source` (data/prepared.py), the path `lorafit train --data` takes: read, normalise,
  render, tokenise, locate trained tokens, write the cache; then a second run that finds the cache.
- datasets.map: `load_dataset("json")` then `map(batched=True, num_proc=2)` rendering and tokenising,
  what LLaMA-Factory and axolotl do (labels not located: less work than the other two sides).
- train start (first size only): `lorafit train --data FILE --steps 1` from the command's start to the
  first step's log line, with a fresh cache and then with the cache warm.
Writes bench/RESULTS-data.md and .json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from common import machine_line, today  # noqa: E402

SEED = 0
TOKENIZE_BATCH = 1000


def log(message: str) -> None:
    print(message, flush=True)


# -- the data -----------------------------------------------------------------------------------------------
def write_alpaca(path: Path, records: int, words: list[str]) -> None:
    """Seeded alpaca records: a 10-20 word instruction, an input on 40% of them, a 60-220 word output.

    Words are drawn with Zipf's law (the k-th most frequent with weight 1/k), as in prose: drawn uniformly
    from ~25,000 words, nearly every word would miss the tokenizer's word cache, which real text does not.
    """
    rng = random.Random(SEED)
    weights = list(itertools.accumulate(1 / rank for rank in range(1, len(words) + 1)))

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(words, cum_weights=weights, k=rng.randint(low, high)))

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(records):
            record = {"instruction": text(10, 20) + "?", "input": text(5, 30) if rng.random() < 0.4 else "",
                      "output": text(60, 220) + "."}
            handle.write(json.dumps(record) + "\n")


def vocabulary_words(tokenizer) -> list[str]:
    """Whole words of the tokenizer's vocabulary (one token each after a space), most frequent first: a byte-pair
    vocabulary adds merges in order of frequency, so the lower a token's id, the more common the word."""
    vocabulary = tokenizer.get_vocab()
    return [token[1:] for token in sorted(vocabulary, key=vocabulary.get)
            if token.startswith("Ġ") and token[1:].isalpha() and 3 <= len(token) <= 10]


def load_tokenizer():
    from lorafit.models.loading import _load_tokenizer, resolve_model_folder

    return _load_tokenizer(resolve_model_folder(None), trust_remote_code=False)


def conversation(record: dict) -> list[dict]:
    user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


# -- the sides, each run in a child process (`bench/data.py --side NAME FILE`) ------------------------------
def side_limit(path: Path) -> dict:
    tokenizer = load_tokenizer()
    started = time.perf_counter()
    with open(path, encoding="utf-8") as handle:
        chats = [conversation(json.loads(line)) for line in handle]
    read = time.perf_counter() - started
    started = time.perf_counter()
    texts = [text for first in range(0, len(chats), TOKENIZE_BATCH)
             for text in tokenizer.apply_chat_template(chats[first:first + TOKENIZE_BATCH], tokenize=False)]
    render = time.perf_counter() - started
    del chats
    started = time.perf_counter()
    tokens = 0
    for first in range(0, len(texts), TOKENIZE_BATCH):
        batch = tokenizer(texts[first:first + TOKENIZE_BATCH], add_special_tokens=False, return_attention_mask=False)
        tokens += sum(len(ids) for ids in batch["input_ids"])
    tokenize = time.perf_counter() - started
    return {"read_s": read, "render_s": render, "tokenize_s": tokenize, "seconds": read + render + tokenize,
            "tokens": tokens}


def side_lorafit(path: Path) -> dict:
    from lorafit.data.prepared import prepare_source
    from lorafit.data.sources import open_source

    tokenizer = load_tokenizer()
    started = time.perf_counter()
    source = open_source(str(path))
    fingerprint = source.fingerprint()
    prepared = prepare_source(tokenizer, source, None, fingerprint, 512, False, echo=lambda _line: None)
    return {"seconds": time.perf_counter() - started, "reused": prepared.reused, "records": len(prepared),
            "tokens": int(len(prepared.tokens)), "cut": int((prepared.outcomes == 1).sum())}


def side_datasets_map(path: Path) -> dict:
    import datasets

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        table = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)

        def tokenize(batch: dict) -> dict:
            chats = [conversation({"instruction": i, "input": x, "output": o})
                     for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])]
            texts = tokenizer.apply_chat_template(chats, tokenize=False)
            return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)

        mapped = table.map(tokenize, batched=True, num_proc=2, remove_columns=table.column_names)
        seconds = time.perf_counter() - started
        tokens = sum(len(ids) for batch in mapped.iter(10_000) for ids in batch["input_ids"])
    return {"seconds": seconds, "tokens": tokens}


def side_training_data(path: Path) -> dict:
    """What training holds of the data: the cached arrays mapped, the default split, the loop's batch plan for an
    epoch, and 500 micro-batches collated as the loop does; the process's own (anonymous) memory at the end."""
    from lorafit.data.prepared import held_out_records, prepare_source
    from lorafit.data.sources import open_source
    from lorafit.train.batching import collate_pieces, plan_batches

    tokenizer = load_tokenizer()
    source = open_source(str(path))
    prepared = prepare_source(tokenizer, source, None, source.fingerprint(), 512, False, echo=lambda _line: None)
    started = time.perf_counter()
    held = held_out_records(len(prepared), 1000, SEED)
    train_set, _ = prepared.select(np.setdiff1d(np.arange(len(prepared)), held), "truncate")
    plan = plan_batches(train_set.lengths.tolist(), 8, SEED, 0)
    tokens = sum(piece.real_tokens for indices in plan[:500]
                 for piece in collate_pieces([train_set[i] for i in indices], tokenizer.pad_token_id, 128, True))
    seconds = time.perf_counter() - started
    status = Path("/proc/self/status").read_text()
    anonymous = int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) / 1024
    return {"seconds": seconds, "tokens": tokens, "batches": len(plan), "anonymous_rss_mib": anonymous}


SIDES = {"limit": side_limit, "lorafit": side_lorafit, "datasets.map": side_datasets_map,
         "training data": side_training_data}


def run_side(name: str, path: Path, env: dict) -> dict:
    """One side in a fresh child process; its result with its peak RSS (its own and its children's)."""
    out = subprocess.run([sys.executable, __file__, "--side", name, str(path)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"side {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(name: str, path: Path) -> None:
    result = SIDES[name](path)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({**result, "peak_rss_mib": max(own, children), "own_rss_mib": own}))


# -- lorafit train up to its first step ----------------------------------------------------------------------
def time_to_first_step(path: Path, env: dict, output: Path) -> dict:
    """Seconds from `lorafit train` starting to its first step's line in the run's step log."""
    log_file = output / "log.jsonl"
    command = [str(ROOT / ".venv/bin/lorafit"), "train", "--data", str(path), "--steps", "1", "--save-every", "0",
               "--output", str(output)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = None
    while process.poll() is None:
        if first_step is None and log_file.is_file() and log_file.stat().st_size:
            first_step = time.perf_counter() - started
        time.sleep(0.05)
    total = time.perf_counter() - started
    output_text = process.stdout.read()
    if process.returncode:
        raise RuntimeError(f"lorafit train failed:\n{output_text[-3000:]}")
    lines = [line for line in output_text.splitlines() if "records (" in line or "held-out" in line]
    return {"first_step_s": first_step, "total_s": total, "lines": lines}


# -- the report -----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--side", nargs=2, metavar=("NAME", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-train", action="store_true", help="leave out the lorafit train start")
    args = parser.parse_args()
    if args.side:
        return child_main(args.side[0], Path(args.side[1]))
    command = ".venv/bin/python bench/data.py" + "".join(f" {a}" for a in sys.argv[1:])
    machine = machine_line()
    log(f"{today()}  {machine}")
    words = vocabulary_words(load_tokenizer())
    results = {"date": today(), "machine": machine, "command": command, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-data-") as scratch:
        scratch = Path(scratch)
        for count in args.records:
            path = scratch / f"alpaca-{count}.jsonl"
            started = time.perf_counter()
            write_alpaca(path, count, words)
            log(f"{count} records: {path.stat().st_size / 1e6:.0f} MB written in {time.perf_counter() - started:.0f} s")
            env = {**os.environ, "LORAFIT_DATA_CACHE": str(scratch / f"cache-{count}")}
            size = {"file_mb": path.stat().st_size / 1e6}
            for name in ("limit", "lorafit", "datasets.map"):
                size[name] = run_side(name, path, env)
                log(f"  {name}: {json.dumps(size[name])}")
            size["lorafit again"] = run_side("lorafit", path, env)
            log(f"  lorafit again: {json.dumps(size['lorafit again'])}")
            size["training data"] = run_side("training data", path, env)
            log(f"  training data: {json.dumps(size['training data'])}")
            if not args.skip_train and count == args.records[0]:
                train_env = {**env, "LORAFIT_DATA_CACHE": str(scratch / f"train-cache-{count}")}
                for run in ("cold", "warm"):
                    size[f"train {run}"] = time_to_first_step(path, train_env, scratch / f"run-{count}-{run}")
                    log(f"  lorafit train ({run} cache): {json.dumps(size[f'train {run}'])}")
            results["sizes"][count] = size
            path.unlink()
    write_report(results)


def write_report(results: dict) -> None:
    (HERE / "RESULTS-data.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Data preparation at size ({results['date']})", "", f"Machine: {results['machine']}", "",
             f"Command: `{results['command']}`", "",
             "Each side in its own child process on the same seeded alpaca JSONL; tokens are the tokenizer's count "
             "of the rendered chats (lorafit's: kept within --max-length 512, plus the EOS it ends each with).", "",
             "| records | file MB | side | seconds | tokens | tokens/s | peak RSS MiB |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for count, size in results["sizes"].items():
        for name in ("limit", "lorafit", "datasets.map", "lorafit again"):
            side = size[name]
            rate = f"{side['tokens'] / side['seconds']:,.0f}" if name != "lorafit again" else "(cache)"
            lines.append(f"| {int(count):,} | {size['file_mb']:.0f} | {name} | {side['seconds']:.1f} | "
                         f"{side['tokens']:,} | {rate} | {side['peak_rss_mib']:.0f} |")
    lines += ["", "What training holds of the data (the cache entry opened, the split, an epoch's batch plan, 500 "
              "micro-batches of 8 collated, their ids read from the cache files):"]
    for count, size in results["sizes"].items():
        side = size["training data"]
        lines.append(f"- {int(count):,} records: {side['batches']:,} batches planned, peak RSS {side['peak_rss_mib']:.0f} "
                     f"MiB, of which anonymous (not file-backed) {side['anonymous_rss_mib']:.0f} MiB")
    lines += ["", "The limit's seconds split as read + render + tokenize:"]
    for count, size in results["sizes"].items():
        limit = size["limit"]
        lines.append(f"- {int(count):,}: {limit['read_s']:.1f} + {limit['render_s']:.1f} + {limit['tokenize_s']:.1f} s")
    for count, size in results["sizes"].items():
        for run in ("cold", "warm"):
            if f"train {run}" in size:
                train = size[f"train {run}"]
                lines.append(f"- `lorafit train --data` ({int(count):,} records, {run} cache): first step "
                             f"{train['first_step_s']:.1f} s after the command started ({train['total_s']:.1f} s in all)")
    (HERE / "RESULTS-data.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
