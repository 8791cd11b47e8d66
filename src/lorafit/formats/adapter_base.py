"""Which base model an adapter folder needs, and refusing any other, so an adapter never runs on the wrong model.

An adapter made by lorafit records the base it was trained on (lorafit.models.identity, in the safetensors
metadata). Without --model that base is used, and with --model a different base is refused. Adapters from peft
fall back to their `base_model_name_or_path` when it is a local folder; anything else needs --model. An adapter
trained on a 4/8-bit base also records that quantization, which loading it again repeats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lorafit.errors import LorafitError
from lorafit.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from lorafit.models.identity import DEFAULT_MODEL, METADATA_KEY, loadable_spec


def resolve_adapter_folder(adapter: str) -> Path:
    """The adapter folder --adapter names: an adapter folder, a run folder (its adapter/) or a checkpoint."""
    path = Path(adapter)
    if not path.exists():
        raise LorafitError(f"--adapter {path}: no such folder")
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / "adapter" / CONFIG_NAME).is_file():
        path = path / "adapter"  # a run folder, as --output named it
    return path


def read_adapter_record(adapter_dir: Path) -> tuple[dict | None, str | None]:
    """(lorafit's identity record, peft's base_model_name_or_path) of an adapter folder; each may be None."""
    from safetensors import SafetensorError, safe_open

    record = None
    weights = adapter_dir / WEIGHTS_NAME
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as handle:
                text = (handle.metadata() or {}).get(METADATA_KEY)
        except (SafetensorError, OSError, ValueError) as err:
            raise LorafitError(f"{weights} is not a readable safetensors file (truncated or corrupted?): {err}") from None
        if text:
            try:
                record = json.loads(text)
            except (ValueError, RecursionError):
                raise LorafitError(f"{weights}: its {METADATA_KEY} metadata is damaged") from None
            if not isinstance(record, dict) or not isinstance(record.get("model"), str):
                raise LorafitError(f"{weights}: its {METADATA_KEY} metadata is damaged")
    peft_base = None
    try:
        raw = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
        peft_base = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        pass  # load_adapter reports a bad adapter_config.json with its own message
    return record, peft_base if isinstance(peft_base, str) and peft_base else None


def choose_base_model(model: Optional[str], adapter_dir: Optional[Path], echo=print) -> tuple[Optional[str], Optional[dict]]:
    """(what to load: None for the embedded model, else a path; the adapter's lorafit record or None)."""
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
    named = f" ({peft_base!r} in its {CONFIG_NAME}, not a local folder)" if peft_base else ""
    raise LorafitError(f"{adapter_dir} does not say which local base model it was made for{named}; pass --model "
                       f"(--model {DEFAULT_MODEL} for the embedded SmolLM2-135M-Instruct)")


def check_base_model(record: Optional[dict], model, adapter_dir: Path, given_model: Optional[str]) -> None:
    """Refuse a base model other than the one the adapter records."""
    from lorafit.models.identity import mismatch

    if record is None or not isinstance(record.get("fingerprint"), dict):
        return
    differs = mismatch(record["fingerprint"], model)
    if differs:
        loaded = f"--model {given_model}" if given_model else "the model loaded"
        raise LorafitError(f"{adapter_dir} was made for {record['model']}, and {loaded} is another model ({differs}); "
                           "pass --model with the base it was trained on")


def choose_quantization(quantize: Optional[str], double_quant: bool, record: Optional[dict],
                        adapter_dir: Optional[Path], echo=print):
    """The QuantizeSettings to load the base with: the flags when given, else what the adapter records."""
    from lorafit.models.options import quantize_settings
    from lorafit.models.quantize import QuantizeSettings

    recorded = QuantizeSettings.from_record((record or {}).get("quantize"))
    if quantize is not None or double_quant:
        return quantize_settings(quantize, double_quant)
    if recorded is not None:
        echo(f"quantize: {recorded.describe()} (the base quantization recorded in {adapter_dir}; "
             "--quantize none loads the float base)")
    return recorded
