"""An adapter folded into its base: W <- W + ΔW, giving a plain model that costs what the base costs.

The base is loaded as the adapter was trained on it. An adapter trained on a 4/8-bit base merges into float
weights: by default the dequantized base it was trained against ("dequantized"), or the original float
weights ("original"); re-quantizing the merged weights ("quantized") loses small updates and needs
`force_requantize`. `lorafit merge` saves the result as a transformers folder, `lorafit export --format gguf`
as one GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lorafit.errors import LorafitError

# Measured on the built-in task (bench/quantized_merge.py, bench/RESULTS.md): merging into the
# dequantized base reproduces the adapter on its quantized base; see the README's "Quantized base".
DEFAULT_MERGE_INTO = "dequantized"
MergeInto = Literal["dequantized", "original", "quantized"]


@dataclass
class Merged:
    """An adapter folded into its base: the plain model, its tokenizer, and how it was made."""

    model: object
    tokenizer: object
    adapter_paths: list
    """The modules the adapter changed (their weights now hold W + ΔW)."""
    quantization: object
    into: Optional[str]


def merge_adapter(adapter_dir: Path, spec: Optional[str], record: Optional[dict], *, given_model: Optional[str] = None,
                  dtype: Optional[str] = None, quantize: Optional[str] = None, double_quant: bool = False,
                  merge_into: Optional[str] = None, force_requantize: bool = False, allow_pickle: bool = False,
                  trust_remote_code: bool = False, echo=print) -> Merged:
    """Load the base `spec` (formats.adapter_base.choose_base_model's choice, with the adapter's `record`) as the
    adapter was trained on it, attach the adapter, and fold it in. `dtype`: what the merged model is saved in
    (default float32); `given_model`: what the user named, for the message when it is another base."""
    from lorafit.core.adapters import merge_and_unload, state_of
    from lorafit.formats.adapter_base import check_base_model, choose_quantization
    from lorafit.formats.peft import load_adapter
    from lorafit.models.dtypes import parse_dtype
    from lorafit.models.loading import load_model_and_tokenizer
    from lorafit.models.quantize import dequantize_model, report_quantization

    quantization = choose_quantization(quantize, double_quant, record, adapter_dir, echo)
    into = merge_target(quantization, merge_into, force_requantize, echo)
    load_dtype = dtype
    if into in ("dequantized", "quantized") and quantization.compute_dtype is not None:
        load_dtype = str(quantization.compute_dtype).removeprefix("torch.")  # quantized exactly as in training
    model, tokenizer = load_model_and_tokenizer(spec, dtype=load_dtype, allow_pickle=allow_pickle,
                                                trust_remote_code=trust_remote_code,
                                                quantize=None if into == "original" else quantization)
    report_quantization(model, echo)
    check_base_model(record, model, adapter_dir, given_model)
    load_adapter(model, adapter_dir, allow_pickle=allow_pickle)
    paths = [path for paths in state_of(model).module_paths.values() for path in paths]
    if into == "dequantized":  # the trained-against weights, in the dtype the merged model is saved in
        save_dtype = parse_dtype(dtype)
        dequantize_model(model, dtype=save_dtype)
        model.to(save_dtype)
    merged = merge_and_unload(model.eval(), requantize=into == "quantized")
    return Merged(merged, tokenizer, paths, quantization, into)


def merge_target(quantization, merge_into: Optional[str], force_requantize: bool, echo=print) -> Optional[str]:
    """What the adapter merges into: None for a float base; for a quantized one, `merge_into` (checked)."""
    if quantization is None:
        if merge_into is not None or force_requantize:
            raise LorafitError("--merge-into and --force-requantize apply to an adapter trained on a quantized base "
                               "(this one records none; give --quantize if it was)")
        return None
    into = merge_into or DEFAULT_MERGE_INTO
    if into == "quantized" and not force_requantize:
        raise LorafitError("--merge-into quantized re-quantizes W + ΔW, and the rounding to 4/8 bits swallows most "
                           "of a small update (peft#2321): pass --force-requantize to accept that, or merge into "
                           "float (--merge-into dequantized or original)")
    if force_requantize and into != "quantized":
        raise LorafitError("--force-requantize applies to --merge-into quantized")
    why = {"dequantized": "the weights the adapter was trained against, in float",
           "original": "the original float weights",
           "quantized": "re-quantized: small updates are lost"}[into]
    echo(f"merge into: {into} ({why})")
    return into
