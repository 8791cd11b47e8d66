"""`lorafit export`: take the fine-tuned model home, as GGUF for llama.cpp, Ollama and LM Studio.

`--format gguf-lora` writes the adapter alone, which llama.cpp applies on top of the user's GGUF base
(`llama-cli -m base.gguf --lora adapter.gguf`; Ollama's `ADAPTER`): the base keeps its own quantization.
`--format gguf` writes the merged model as one standalone file: when the base came from a GGUF (the
embedded default does) its keys, tokenizer and every unchanged tensor are carried over as they are;
for a transformers folder of a family llama.cpp runs (lorafit.formats.gguf_families: Llama, Mistral, Qwen2/3,
Gemma 1-3, Phi-3, Granite, OLMo 2, Command-R, GLM-4, GPT-2, GPT-NeoX, Falcon) they are written from config.json
and tokenizer.json.
Nothing but gguf-py is used: no llama.cpp checkout, no compiler, no subprocess (lorafit.formats.gguf_*).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lorafit.cli.common import AdapterFolder, print_settings
from lorafit.errors import LorafitError
from lorafit.models.options import ModelFileOptions

# Measured (bench/gguf_export.py, bench/RESULTS.md): an f16 adapter answers the built-in task in llama.cpp as
# the f32 one does, at half the size.
DEFAULT_ADAPTER_OUTTYPE = "f16"
DEFAULT_MERGED_OUTTYPE = "f16"
ADAPTER_OUTTYPES = ("f32", "f16", "bf16")


@dataclass(kw_only=True)
class ExportConfig(ModelFileOptions):
    """Export an adapter as a GGUF LoRA for llama.cpp / Ollama, or the merged model as one GGUF file."""

    adapter: AdapterFolder
    output: str
    """The .gguf file to write."""
    format: Literal["gguf-lora", "gguf"] = "gguf-lora"
    """gguf-lora: the adapter alone, applied by llama.cpp on your GGUF base (--lora); gguf: the merged model."""
    outtype: Optional[Literal["f32", "f16", "bf16", "q8_0"]] = None
    """Type of the written tensors (1-D ones stay f32). Default f16. gguf-lora: f32, f16 or bf16; gguf: the
    merged tensors (a base GGUF's unchanged tensors keep their own type)."""
    overwrite: bool = False
    """Replace an earlier `lorafit export` file (only a GGUF that lorafit wrote)."""


def run(config: ExportConfig, echo=print, given=None) -> Path:
    from lorafit.formats.adapter_base import choose_base_model, resolve_adapter_folder
    from lorafit.formats.gguf_file import check_output, read_gguf
    from lorafit.formats.gguf_layout import layout_of_gguf
    from lorafit.models.gguf_cache import source_gguf
    from lorafit.models.identity import model_spec
    from lorafit.models.loading import resolve_model_folder

    print_settings(config)
    output = Path(config.output)
    if config.format == "gguf-lora" and config.outtype not in (None, *ADAPTER_OUTTYPES):
        raise LorafitError(f"--outtype {config.outtype} is for merged models; a GGUF adapter is written "
                           f"{', '.join(ADAPTER_OUTTYPES)} (its r-wide tensors do not fill q8_0's 32-value blocks)")
    adapter_dir = resolve_adapter_folder(config.adapter)
    spec, record = choose_base_model(config.model, adapter_dir, echo)
    base_gguf = source_gguf(spec)
    check_output(output, config.overwrite, {"the base model": base_gguf})
    if config.format == "gguf-lora":
        from lorafit.formats.gguf_lora import export_adapter

        # a GGUF of the same model in another quantization is the usual reason to name another base
        other = (record["model"] if record is not None and config.model is not None
                 and model_spec(config.model) != record["model"] else None)
        return export_adapter(adapter_dir, output, base_gguf=base_gguf,
                              model_folder=resolve_model_folder(spec) if base_gguf is None else None,
                              outtype=config.outtype or DEFAULT_ADAPTER_OUTTYPE, note_other_base=other,
                              allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code, echo=echo)

    from lorafit.formats.gguf_merged import export_merged
    from lorafit.inference.merge import merge_adapter

    source = read_gguf(base_gguf) if base_gguf is not None else None
    if source is not None:
        layout_of_gguf(source, base_gguf)  # an architecture the exporter does not know: said before loading
    merged = merge_adapter(adapter_dir, spec, record, given_model=config.model, dtype="float32",
                           allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code, echo=echo)
    return export_merged(merged.model, merged.tokenizer, merged.adapter_paths, output, source=source,
                         source_path=base_gguf, model_folder=resolve_model_folder(spec),
                         outtype=config.outtype or DEFAULT_MERGED_OUTTYPE, adapter_dir=adapter_dir, echo=echo)
