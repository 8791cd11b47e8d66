"""The frozen base in fewer bits against peft (issue 15): bf16 and nf4, like for like and default vs default.

    .venv/bin/python bench/precision.py              # writes bench/RESULTS-precision.md (+ .json), ~25 min on 2 cores
    .venv/bin/python bench/precision.py --quick      # a smoke test (RESULTS-precision-quick.md)
    .venv/bin/python bench/precision.py --skip-large # without the 1.7B-parameter rows

Throughput: in one process, lorafit and peft each on their own copy of the base, the same batches of the
built-in task in the same order, alternating which side goes first; lorafit's step is the loop's own
(`train_step`), peft's the documented standard (sides.py). Pairs: lorafit nf4 vs peft nf4 (both on the
same bitsandbytes NF4 model, from lorafit's loader: byte for byte transformers' BitsAndBytesConfig load,
without its load-time peak, which favours peft's memory figure), lorafit bf16 vs peft bf16 (peft upcasts its adapters to fp32, as lorafit does), and lorafit's
default on this machine vs peft's default (fp32). Peak RSS: each (side, precision) in its own process.
The large model: SmolLM2-1.7B's published shape with seeded random weights, built one decoder layer at
a time (each quantized as soon as it exists for nf4), batch 4 × 128 tokens trained on every token,
3 steps after one warm-up step, each configuration in its own process.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import SEED, Series, high_water_rss_mib, machine_line, today  # noqa: E402
from sides import ALL16, QV8, LorafitSide, PeftSide, load_tokenizer  # noqa: E402
from workloads import DATASETS, batch_plan  # noqa: E402

WORKLOADS = {"qv8": QV8, "all16": ALL16}
LARGE_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True)
LARGE_BATCH, LARGE_LENGTH, LARGE_STEPS = 4, 128, 3


def lorafit_default_precision() -> str:
    """What `lorafit train` runs the base in here without --dtype (its own rule)."""
    from lorafit.models.dtypes import default_dtype

    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[default_dtype(torch.device("cpu"))]


def load(precision: str):
    """The embedded model in fp32, bf16, or nf4 (bitsandbytes, fp32 compute) and its tokenizer."""
    from lorafit.models.loading import load_model_and_tokenizer
    from lorafit.models.quantize import QuantizeSettings

    if precision == "nf4":
        return load_model_and_tokenizer(None, device="cpu", quantize=QuantizeSettings("nf4"))
    return load_model_and_tokenizer(None, device="cpu", dtype={"fp32": "float32", "bf16": "bfloat16"}[precision])


def matmul_peaks(reps: int = 5, size: int = 2048) -> dict:
    """GFLOP/s of size³ matmuls in fp32 and bf16, median (min–max), sampled alternately."""
    fp32, bf16 = Series(), Series()
    tensors = {dtype: (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
               for dtype in (torch.float32, torch.bfloat16)}
    for dtype, (a, b) in tensors.items():
        torch.matmul(a, b)  # warm-up
    for _ in range(reps):
        for dtype, series in ((torch.float32, fp32), (torch.bfloat16, bf16)):
            a, b = tensors[dtype]
            started = time.perf_counter()
            torch.matmul(a, b)
            series.add(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return {"fp32": fp32, "bf16": bf16}


def compare(workload_key: str, lorafit_precision: str, peft_precision: str, steps: int, log) -> dict:
    """Alternate the two sides over the same `steps` batches (the first is a warm-up)."""
    workload = WORKLOADS[workload_key]
    lorafit_model, tokenizer = load(lorafit_precision)
    peft_model, _ = load(peft_precision)
    examples = DATASETS["date"](tokenizer)
    ours = LorafitSide(lorafit_model, tokenizer, workload)
    theirs = PeftSide(peft_model, tokenizer, workload, start_from=ours.adapter_tensors())
    records = []
    for index, indices in enumerate(batch_plan(examples)[:steps]):
        batch = [examples[i] for i in indices]
        record = {"warmup": index == 0}
        for side in (ours, theirs) if index % 2 == 0 else (theirs, ours):
            started = time.perf_counter()
            info = side.step(batch)
            record[side.name] = {**info, "seconds": time.perf_counter() - started}
        records.append(record)
        a, b = record["lorafit"], record["peft"]
        log(f"  {workload_key} lorafit {lorafit_precision} vs peft {peft_precision}, step {index + 1}/{steps}: "
            f"{a['seconds']:.2f} s vs {b['seconds']:.2f} s ({b['seconds'] / a['seconds']:.2f}x), "
            f"loss {a['loss']:.5f} / {b['loss']:.5f}")
    measured = [r for r in records if not r["warmup"]]
    ratio, ours_tps, theirs_tps = Series(), Series(), Series()
    for record in measured:
        a, b = record["lorafit"], record["peft"]
        ratio.add(b["seconds"] / a["seconds"])
        ours_tps.add(a["real_tokens"] / a["seconds"])
        theirs_tps.add(b["real_tokens"] / b["seconds"])
    return {"workload": workload_key, "lorafit": lorafit_precision, "peft": peft_precision, "steps": records,
            "ratio": ratio.samples, "lorafit_tps": ours_tps.samples, "peft_tps": theirs_tps.samples,
            "loss_delta": max(abs(r["lorafit"]["loss"] - r["peft"]["loss"]) for r in records)}


# -- children: one configuration per process, for its own peak RSS ------------------------------------------


def memory_child(side_name: str, precision: str, workload_key: str, steps: int) -> dict:
    model, tokenizer = load(precision)
    examples = DATASETS["date"](tokenizer)
    side = (LorafitSide if side_name == "lorafit" else PeftSide)(model, tokenizer, WORKLOADS[workload_key])
    loaded = high_water_rss_mib()
    for indices in batch_plan(examples)[:steps]:
        side.step([examples[i] for i in indices])
    return {"side": side_name, "precision": precision, "workload": workload_key, "steps": steps,
            "peak_after_load_mib": loaded, "peak_rss_mib": high_water_rss_mib()}


def large_model(precision: str):
    """SmolLM2-1.7B's shape, seeded random weights, built layer by layer (nf4: each quantized at once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafit.models.loading import resolve_model_folder
    from lorafit.models.quantize import (
        QuantizeSettings,
        keep_weights_as_trained,
        quantize_model,
    )

    config = AutoConfig.from_pretrained(resolve_model_folder(None), local_files_only=True)
    for key, value in LARGE_SHAPE.items():
        setattr(config, key, value)
    generator = torch.Generator().manual_seed(SEED)

    def randomise(module):
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0.0, 0.02, generator=generator)
                else:
                    parameter.fill_(1.0)

    layers = config.num_hidden_layers
    config.num_hidden_layers = 1
    model = AutoModelForCausalLM.from_config(config)  # embeddings, norm, head, rotary: 1 layer to start
    randomise(model)
    layer_class = type(model.model.layers[0])
    config.num_hidden_layers = layers
    model.config.num_hidden_layers = layers
    built = []
    for index in range(layers):
        layer = model.model.layers[0] if index == 0 else layer_class(config, layer_idx=index)
        if index:
            randomise(layer)
        if precision == "nf4":
            quantize_model(layer, QuantizeSettings("nf4"))
        built.append(layer)
    model.model.layers = torch.nn.ModuleList(built)
    model.tie_weights()
    keep_weights_as_trained(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def large_child(side_name: str, precision: str) -> dict:
    import lorafit
    from lorafit.data.tokenizing import TokenizedExample

    tokenizer = load_tokenizer()
    started = time.perf_counter()
    model = large_model(precision)
    build_seconds = time.perf_counter() - started
    parameters = lorafit.trainable_parameters(model).total  # 4-bit weights counted as the values they hold
    side = (LorafitSide if side_name == "lorafit" else PeftSide)(model, tokenizer, QV8)
    generator = torch.Generator().manual_seed(SEED)
    seconds = []
    for step in range(LARGE_STEPS + 1):
        rows = torch.randint(0, LARGE_SHAPE["vocab_size"], (LARGE_BATCH, LARGE_LENGTH), generator=generator).tolist()
        batch = [TokenizedExample(ids, list(ids)) for ids in rows]  # every token trained: the text setting
        started = time.perf_counter()
        info = side.step(batch)
        seconds.append(time.perf_counter() - started)
    return {"side": side_name, "precision": precision, "parameters": parameters, "build_seconds": build_seconds, "seconds": seconds, "loss": info["loss"], "peak_rss_mib": high_water_rss_mib()}


def child(arguments: list[str], timeout: float) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *arguments], capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child {arguments} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


# -- the report ------------------------------------------------------------------------------------------------


def _series(values: list[float], fmt: str) -> str:
    return Series(list(values)).text(fmt)


def report(raw: dict) -> str:
    peaks = raw["matmul"]
    lines = [
        "# lorafit vs peft with the base in fewer bits (bench/precision.py, issue 15)", "",
        f"{raw['date']} · {raw['machine']} · `{raw['command']}` · {raw['minutes']:.1f} min", "",
        f"2048³ matmul: fp32 {peaks['fp32']} GFLOP/s, bf16 {peaks['bf16']} GFLOP/s (median (min–max) of 5 each, "
        "alternating). lorafit's default base dtype here: "
        f"**{raw['default']}** (`lorafit.models.dtypes.default_dtype`).", "",
        "## Throughput and loss, side by side (built-in task, batch 8, the loop's plan)", "",
        "| workload | lorafit | peft | tokens/s lorafit | tokens/s peft | ratio (median (min–max)) | max \\|Δ loss\\| | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in raw["pairs"]:
        lines.append(f"| {WORKLOADS[pair['workload']].name} | {pair['lorafit']} | {pair['peft']} | "
                     f"{_series(pair['lorafit_tps'], '{:.0f}')} | {_series(pair['peft_tps'], '{:.0f}')} | "
                     f"{_series(pair['ratio'], '{:.2f}')}× | {pair['loss_delta']:.1e} | {len(pair['steps'])} |")
    lines += ["", "## Peak RSS, each configuration in its own process (built-in task, r=8 q,v)", "",
              "| side | precision | peak after loading | peak after the steps |", "|---|---|---|---|"]
    for item in raw["memory"]:
        lines.append(f"| {item['side']} | {item['precision']} | {item['peak_after_load_mib']:,.0f} MiB | "
                     f"{item['peak_rss_mib']:,.0f} MiB |")
    if raw.get("large"):
        lines += ["", f"## SmolLM2-1.7B's shape (seeded random weights), LoRA r=8 q,v, batch {LARGE_BATCH} × "
                  f"{LARGE_LENGTH}, {LARGE_STEPS} steps after a warm-up", "",
                  "| side | precision | s/step (median (min–max)) | build | peak RSS |", "|---|---|---|---|---|"]
        for item in raw["large"]:
            redone = f" (rerun {item['redone']})" if item.get("redone") else ""
            lines.append(f"| {item['side']} | {item['precision']}{redone} | {_series(item['seconds'][1:], '{:.1f}')} | "
                         f"{item['build_seconds']:.0f} s | {item['peak_rss_mib']:,.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--redo-large", nargs="+", metavar="SIDE:PRECISION",
                        help="rerun only these large-model rows (e.g. lorafit:fp32) into the existing RESULTS-precision")
    parser.add_argument("--memory-child", nargs=4, metavar=("SIDE", "PRECISION", "WORKLOAD", "STEPS"))
    parser.add_argument("--large-child", nargs=2, metavar=("SIDE", "PRECISION"))
    args = parser.parse_args()
    torch.manual_seed(SEED)
    if args.memory_child:
        side, precision, workload, steps = args.memory_child
        print(json.dumps(memory_child(side, precision, workload, int(steps))))
        return
    if args.large_child:
        print(json.dumps(large_child(*args.large_child)))
        return

    def log(message: str) -> None:
        print(message, flush=True)

    if args.redo_large:  # after a change to one side: its rows again, everything else as measured before
        raw = json.loads((HERE / "RESULTS-precision.json").read_text())
        for spec in args.redo_large:
            side, precision = spec.split(":")
            item = child(["--large-child", side, precision], 3000)
            item["redone"] = today()
            raw["large"] = [item if (old["side"], old["precision"]) == (side, precision) else old for old in raw["large"]]
            log(f"1.7B {side} {precision}: {item['seconds']} s/step, {item['peak_rss_mib']:.0f} MiB")
        raw["command"] += " + " + " ".join(sys.argv[1:])
        (HERE / "RESULTS-precision.json").write_text(json.dumps(raw, indent=1) + "\n")
        (HERE / "RESULTS-precision.md").write_text(report(raw))
        return

    started = time.perf_counter()
    default = lorafit_default_precision()
    raw = {"date": today(), "machine": machine_line(), "default": default,
           "command": ".venv/bin/python bench/precision.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])}
    log(f"{raw['date']}  {raw['machine']}; lorafit's default here: {default}")
    memory_steps = 1 if args.quick else 4
    raw["memory"] = []  # first, while this process is small
    for side, precision in (("lorafit", "fp32"), ("peft", "fp32"), ("lorafit", "bf16"), ("peft", "bf16"),
                            ("lorafit", "nf4"), ("peft", "nf4")):
        raw["memory"].append(child(["--memory-child", side, precision, "qv8", str(memory_steps)], 1200))
        log(f"memory {side} {precision}: {raw['memory'][-1]['peak_rss_mib']:.0f} MiB")
    raw["large"] = []
    if not args.skip_large and not args.quick:
        for side, precision in (("lorafit", "fp32"), ("peft", "fp32"), ("lorafit", "nf4"), ("peft", "nf4")):
            raw["large"].append(child(["--large-child", side, precision], 3000))
            item = raw["large"][-1]
            log(f"1.7B {side} {precision}: {item['seconds']} s/step, {item['peak_rss_mib']:.0f} MiB")
    peaks = matmul_peaks()
    raw["matmul"] = {name: series.text("{:.0f}") for name, series in peaks.items()}
    log(f"matmul 2048³: fp32 {raw['matmul']['fp32']}, bf16 {raw['matmul']['bf16']} GFLOP/s")
    short, curve = (3, 4) if args.quick else (9, 30)
    raw["pairs"] = []
    for workload in ("qv8", "all16"):
        for ours, theirs in (("nf4", "nf4"), ("bf16", "bf16"), (default, "fp32")):
            steps = curve if (workload, ours) == ("qv8", "nf4") else short
            raw["pairs"].append(compare(workload, ours, theirs, steps, log))
    raw["minutes"] = (time.perf_counter() - started) / 60
    name = "RESULTS-precision-quick" if args.quick else "RESULTS-precision"
    (HERE / f"{name}.json").write_text(json.dumps(raw, indent=1) + "\n")
    (HERE / f"{name}.md").write_text(report(raw))
    log(report(raw))


if __name__ == "__main__":
    main()
