"""`lorafit merge`: W <- W + s·B·A, saved as a plain transformers folder (no adapter, no lorafit needed).

The merge itself is lorafit.inference.merge (the base loaded as the adapter was trained on it, a quantized
one merged into float), the folder lorafit.formats.merged_folder (`lorafit-merge.json` beside the model files;
`--overwrite` replaces only such a folder; the base model's folder, the adapter's, and any folder holding them
are refused outright).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lorafit.cli.common import AdapterFolder, print_settings
from lorafit.inference.merge import MergeInto
from lorafit.models.options import ModelLoadOptions


@dataclass(kw_only=True)
class MergeConfig(ModelLoadOptions):
    """Merge an adapter into its base model and save the result for AutoModelForCausalLM.from_pretrained."""

    adapter: AdapterFolder
    output: str
    """Folder for the merged model."""
    overwrite: bool = False
    """Replace an earlier `lorafit merge` output (only a folder it wrote, holding only its files)."""
    merge_into: Optional[MergeInto] = None
    """For an adapter trained on a quantized base: merge into the dequantized base it was trained against
    (default), the original float weights, or re-quantize the result (lossy; needs --force-requantize)."""
    force_requantize: bool = False
    """Accept that --merge-into quantized rounds away small updates (peft#2321)."""


def run(config: MergeConfig, echo=print, given=None) -> Path:
    from lorafit.formats.adapter_base import choose_base_model, resolve_adapter_folder
    from lorafit.formats.merged_folder import check_output, save_merged_folder
    from lorafit.inference.merge import merge_adapter
    from lorafit.models.loading import resolve_model_folder

    print_settings(config)
    output = Path(config.output)
    adapter_dir = resolve_adapter_folder(config.adapter)
    spec, record = choose_base_model(config.model, adapter_dir, echo)
    protected = {"the base model's folder": resolve_model_folder(spec), "the adapter folder": adapter_dir}
    if spec is not None:
        protected["the base model"] = Path(spec)
    check_output(output, config.overwrite, protected)
    merged = merge_adapter(adapter_dir, spec, record, given_model=config.model, dtype=config.dtype,
                           quantize=config.quantize, double_quant=config.double_quant, merge_into=config.merge_into,
                           force_requantize=config.force_requantize, allow_pickle=config.allow_pickle,
                           trust_remote_code=config.trust_remote_code, echo=echo)
    facts = {"adapter": str(adapter_dir.resolve()), "base_model": record["model"] if record else str(spec or "default"),
             "dtype": str(merged.model.dtype).removeprefix("torch.")}
    if merged.quantization is not None:
        facts.update(trained_on=merged.quantization.to_record(), merged_into=merged.into)
    save_merged_folder(output, merged.model, merged.tokenizer, facts)
    echo(f"merged model saved to {output}")
    return output
