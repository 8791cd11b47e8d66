"""`lorafit estimate`: how much memory a training run needs, and which batch size fits, before it runs.

The model is built from its config with fake tensors (no weights read, a 7B config plans in seconds) and
lorafit's own training step runs on it with every tensor counted (lorafit.planner). Prints the parts,
the verdict for the device's memory and the largest batch size that fits; `--table` plans batch sizes ×
lengths for someone choosing a machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from lorafit.cli.common import print_settings
from lorafit.core.registry import check_ranges, option_owners, spellings
from lorafit.errors import LorafitError
from lorafit.methods import DEFAULT_METHOD
from lorafit.models.options import DoubleQuant, ModelDtype, ModelSourceOptions, Quantize, quantize_settings

# the batch sizes the table tries
TABLE_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass(kw_only=True)
class EstimateConfig(ModelSourceOptions):
    """Plan a training run's memory from the model's config: the parts, whether it fits, the largest batch."""

    model_config: Optional[str] = None
    """A model's config.json instead of a model folder (nothing but the shapes is read)."""
    method: Literal[(*spellings(), "full")] = DEFAULT_METHOD
    """Adapter method, or 'full' (every weight trained, for comparison)."""
    targets: Optional[list[str]] = None
    """Modules to adapt, as `lorafit train --targets` (default: the architecture's usual choice)."""
    r: int = 8
    """LoRA/DoRA rank."""
    quantize: Quantize = None
    double_quant: DoubleQuant = False
    dtype: Optional[ModelDtype] = None
    """dtype of the frozen base (default: what `lorafit train` picks on this machine; on CUDA fp32 weights with
    bf16 autocast)."""
    batch_size: Optional[int] = None
    """Examples per micro-batch (default: plan the largest that fits)."""
    max_length: int = 512
    """Tokens per example (the plan assumes every example is this long)."""
    prompt_length: int = 0
    """Tokens of each example without a label (its prompt): the loss runs the head only on labelled ones."""
    shared_prefix: int = 0
    """Tokens every example starts with (a system prompt), which the loop computes once per micro-batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward, as `lorafit train --gradient-checkpointing`."""
    row_tokens: int = 128
    """As `lorafit train --row-tokens`: examples this long run alone, shorter ones are packed into rows."""
    device: Optional[Literal["cpu", "cuda"]] = None
    """Plan for this device (default: cuda when there is one)."""
    device_memory: Optional[str] = None
    """Memory to fit in, e.g. 32GiB, 24GB, 8000MiB (default: this machine's available memory, or the GPU's)."""
    table: bool = False
    """Plan every batch size (1-32) × length (128 up to --max-length) and print the totals in GiB."""


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str, flag: str = "--device-memory") -> int:
    """Bytes in '32GiB', '24 GB', '8000MiB', '1.5TiB' (a plain number is bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise LorafitError(f"{flag} {text!r}: give a size such as 32GiB, 24GB or 8000MiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise LorafitError(f"{flag} {text!r}: must be more than 0")
    return size


def _check(config: EstimateConfig, given: set[str]) -> None:
    if "r" in given and config.method not in option_owners()["r"]:
        owners = "/".join(m.upper() for m in option_owners()["r"])
        raise LorafitError(f"--r is a {owners} setting; --method {config.method} does not use it")
    if config.table and config.batch_size is not None:
        raise LorafitError("--table plans batch sizes 1-32 itself; --batch-size does not apply to it")
    if config.model and config.model_config:
        raise LorafitError("give --model or --model-config, not both")
    check_ranges(config)
    if config.batch_size is not None and config.batch_size < 1:
        raise LorafitError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.max_length < 2:
        raise LorafitError(f"--max-length must be >= 2, got {config.max_length}")
    if config.row_tokens < 1:
        raise LorafitError(f"--row-tokens must be >= 1, got {config.row_tokens}")
    if config.method == "full" and (config.quantize not in (None, "none") or config.targets):
        raise LorafitError("--method full trains every weight: --quantize and --targets do not apply")
    if config.device_memory is not None:
        parse_memory(config.device_memory)


def adapter_for(config: EstimateConfig):
    """The method config `lorafit train` would attach with these flags (its defaults for the rest)."""
    if config.method == "full":
        return None
    from lorafit.core.registry import config_from_options
    from lorafit.core.selection import parse_targets

    return config_from_options(config.method, parse_targets(config.targets), {"r": config.r})


def run(config: EstimateConfig, echo=print, given=None) -> dict:
    _check(config, set(given or ()))
    quantize = quantize_settings(config.quantize, config.double_quant)
    print_settings(config)
    import torch

    from lorafit.models.dtypes import parse_dtype
    from lorafit.models.loading import load_config, resolve_model_folder
    from lorafit.planner.auto_batch import gib, largest_fitting_batch
    from lorafit.planner.plan import Planner, Setup, Workload
    from lorafit.planner.runtime import available_memory, measure_runtime

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = config.model_config or resolve_model_folder(None if config.model in (None, "default") else config.model)
    model_config = load_config(source, trust_remote_code=config.trust_remote_code)
    dtype = parse_dtype(config.dtype or _default_dtype(device))
    if quantize is not None:
        from dataclasses import replace

        quantize = replace(quantize, compute_dtype=dtype)
    setup = Setup(adapter_for(config), dtype, quantize, config.gradient_checkpointing, config.row_tokens, device)
    runtime = measure_runtime(device, None if config.model_config else source, quantized=quantize is not None,
                              config=model_config, trust_remote_code=config.trust_remote_code)
    planner = Planner(model_config, setup, runtime=(runtime.total, runtime.note), layout=runtime.layout,
                      trust_remote_code=config.trust_remote_code)
    memory, memory_words = ((parse_memory(config.device_memory), "--device-memory") if config.device_memory
                            else available_memory(device))

    def workload(batch: int, length: int | None = None) -> Workload:
        return Workload(batch, length or config.max_length, config.prompt_length, config.shared_prefix)

    planner.check(workload(config.batch_size or 1))
    rank = f" r={config.r}" if config.method in option_owners()["r"] else ""
    base = quantize.describe() if quantize else str(dtype).removeprefix("torch.")
    what = (f"{type(planner.model).__name__} ({model_config.model_type}) from {source}; {config.method}{rank}, "
            f"base in {base}, {config.max_length} tokens per example, on {device}")
    echo(f"plan for {what}")
    result: dict = {"device": device, "device_memory": memory}
    if config.table:
        result["table"] = _table(planner, workload, config.max_length, memory, echo)
        return result
    batch = config.batch_size or 1
    plan = planner.plan(workload(batch))
    echo(format_plan(plan, batch, config.max_length))
    fits = plan.total <= memory
    echo(f"verdict: {'fits' if fits else 'does NOT fit'} in {gib(memory)} ({memory_words}): "
         f"{'spare' if fits else 'short by'} {gib(abs(memory - plan.total))}")
    result.update(total=plan.total, fits=fits, batch_size=batch)
    largest, why = largest_fitting_batch(planner, workload, memory)
    echo(why)
    result["largest_batch_size"] = largest
    return result


def _default_dtype(device: str) -> str:
    import torch

    from lorafit.models.dtypes import default_dtype

    return str(default_dtype(torch.device(device))).removeprefix("torch.")


def format_plan(plan, batch: int, length: int) -> str:
    """The parts, one per line, in MiB, and the total."""
    from lorafit.planner.auto_batch import gib

    lines = [f"batch {batch} × {length} tokens:"]
    for what, size in plan.parts():
        lines.append(f"  {what:<74} {size / 2**20:>11,.1f} MiB")
    if plan.step.per_layer:
        per_layer = max(plan.step.per_layer)
        lines.append(f"    (of the activations: {per_layer / 2**20:,.2f} MiB per decoder layer × "
                     f"{len(plan.step.per_layer)} layers; the loss's own buffers peak at "
                     f"{plan.step.loss_peak / 2**20:,.1f} MiB)")
    lines.append(f"  {'total':<74} {plan.total / 2**20:>11,.1f} MiB ({gib(plan.total)})")
    return "\n".join(lines)


def _table(planner, workload, max_length: int, memory: int, echo) -> list[dict]:
    from lorafit.planner.auto_batch import gib

    lengths = sorted({n for n in (128, 256, 512, 1024, 2048, 4096, 8192) if n < max_length} | {max_length})
    if planner.max_length:
        lengths = [n for n in lengths if n <= planner.max_length]
    rows = []
    echo(f"total GiB by length (rows) and batch size (columns); * does not fit in {gib(memory)}")
    echo("  length " + "".join(f"{b:>9}" for b in TABLE_BATCHES))
    for length in lengths:
        cells = []
        for batch in TABLE_BATCHES:
            total = planner.plan(workload(batch, length)).total
            rows.append({"length": length, "batch_size": batch, "total": total})
            cells.append(f"{total / 2**30:>8.2f}{'*' if total > memory else ' '}")
        echo(f"  {length:>6} " + "".join(cells))
    return rows
