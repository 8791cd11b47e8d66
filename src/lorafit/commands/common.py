"""What several commands share: a base model with an optional adapter on top, and the right base for it.

An adapter made by lorafit records the base model it was trained on (lorafit.identity). Without
--model that base is used, and with --model a different base is refused, so an adapter is never
silently evaluated, merged or served on another model. Adapters from peft fall back to their
`base_model_name_or_path` when it is a local folder; anything else needs --model.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import yaml

from lorafit.errors import LorafitError

ADAPTER_CONFIG = "adapter_config.json"


def print_settings(config, to_stderr: bool = False) -> None:
    """Every command shows the settings it runs with before it loads anything slow."""
    text = "settings:\n" + yaml.safe_dump(asdict(config), sort_keys=False).rstrip()
    print(text, file=sys.stderr if to_stderr else sys.stdout)


def resolve_adapter_folder(adapter: str) -> Path:
    """The adapter folder --adapter names: an adapter folder, a run folder (its adapter/) or a checkpoint."""
    path = Path(adapter)
    if not path.exists():
        raise LorafitError(f"--adapter {path}: no such folder")
    if path.is_dir() and not (path / ADAPTER_CONFIG).is_file() and (path / "adapter" / ADAPTER_CONFIG).is_file():
        path = path / "adapter"  # a run folder, as --output named it
    if (path / "trainer_state.json").is_file() and not (path / "training_state.safetensors").is_file():
        raise LorafitError(
            f"{path} is a training checkpoint of lorafit 0.1, whose adapter files hold the raw training state "
            f"(wrong for PiSSA and fused-slice adapters); use the run's adapter, {path.parent.parent / 'adapter'}"
        )
    return path


def choose_base_model(model: Optional[str], adapter_dir: Optional[Path], echo=print) -> tuple[Optional[str], Optional[dict]]:
    """(what to load: None for the embedded model, else a path; the adapter's lorafit record or None)."""
    from lorafit.identity import DEFAULT_MODEL, loadable_spec, read_adapter_record

    if adapter_dir is None:
        return (None if model in (None, DEFAULT_MODEL) else model), None
    record, peft_base = read_adapter_record(adapter_dir)
    if model is not None:
        return (None if model == DEFAULT_MODEL else model), record
    if record is not None:
        spec = loadable_spec(record["model"])
        if spec is not None and not Path(spec).exists():
            raise LorafitError(f"{adapter_dir} was made for the base model {spec}, which is not there; pass --model "
                               "with that model")
        echo(f"model: {record['model']} (the base recorded in {adapter_dir})")
        return spec, record
    if peft_base is not None and Path(peft_base).is_dir():
        echo(f"model: {peft_base} (the adapter's base_model_name_or_path)")
        return peft_base, None
    named = f" ({peft_base!r} in its {ADAPTER_CONFIG}, not a local folder)" if peft_base else ""
    raise LorafitError(f"{adapter_dir} does not say which local base model it was made for{named}; pass --model "
                       f"(--model {DEFAULT_MODEL} for the embedded SmolLM2-135M-Instruct)")


def check_base_model(record: Optional[dict], model, adapter_dir: Path, given_model: Optional[str]) -> None:
    """Refuse a base model other than the one the adapter records."""
    from lorafit.identity import mismatch

    if record is None or not isinstance(record.get("fingerprint"), dict):
        return
    differs = mismatch(record["fingerprint"], model)
    if differs:
        loaded = f"--model {given_model}" if given_model else "the model loaded"
        raise LorafitError(f"{adapter_dir} was made for {record['model']}, and {loaded} is another model ({differs}); "
                           "pass --model with the base it was trained on")


def load_model_with_adapter(model: Optional[str], adapter: Optional[str], *, dtype: Optional[str] = None,
                            quantize: Optional[str] = None, double_quant: bool = False,
                            allow_pickle: bool = False, trust_remote_code: bool = False, echo=print):
    """(model, tokenizer, adapter folder or None) with the adapter, if any, attached; in eval mode."""
    from lorafit.io import load_adapter
    from lorafit.models import load_model_and_tokenizer

    adapter_dir = resolve_adapter_folder(adapter) if adapter is not None else None
    spec, record = choose_base_model(model, adapter_dir, echo)
    quantization = choose_quantization(quantize, double_quant, record, adapter_dir, echo)
    if dtype is None and quantization is not None and quantization.compute_dtype is not None:
        dtype = str(quantization.compute_dtype).removeprefix("torch.")  # quantized as in training
        echo(f"dtype: {dtype} (what the adapter's quantized base computed in; --dtype overrides)")
    base, tokenizer = load_model_and_tokenizer(spec, dtype=choose_dtype(dtype, echo), allow_pickle=allow_pickle,
                                               trust_remote_code=trust_remote_code, quantize=quantization)
    report_quantization(base, echo)
    if adapter_dir is not None:
        check_base_model(record, base, adapter_dir, model)
        load_adapter(base, adapter_dir, allow_pickle=allow_pickle)
    return base.eval(), tokenizer, adapter_dir


def choose_dtype(dtype: Optional[str], echo=print) -> str:
    """--dtype, or the default for this machine (lorafit.models.default_dtype), saying which and why."""
    if dtype is not None:
        return dtype
    import torch

    from lorafit.models import default_dtype, describe_default_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    echo(describe_default_dtype(device))
    return str(default_dtype(device)).removeprefix("torch.")


def choose_quantization(quantize: Optional[str], double_quant: bool, record: Optional[dict],
                        adapter_dir: Optional[Path], echo=print):
    """The QuantizeSettings to load the base with: the flags when given, else what the adapter records."""
    from lorafit.commands.model_options import quantize_settings
    from lorafit.quantize import QuantizeSettings

    recorded = QuantizeSettings.from_record((record or {}).get("quantize"))
    if quantize is not None or double_quant:
        return quantize_settings(quantize, double_quant)
    if recorded is not None:
        echo(f"quantize: {recorded.describe()} (the base quantization recorded in {adapter_dir}; "
             "--quantize none loads the float base)")
    return recorded


def report_quantization(model, echo=print) -> Optional[dict]:
    """Print what a quantized load did; its record (None for a float model)."""
    from lorafit.quantize import quantize_report

    report = quantize_report(model)
    if report is None:
        return None
    echo(report.summary())
    return report.to_record()
