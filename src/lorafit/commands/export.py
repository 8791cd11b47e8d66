"""`lorafit export`: take the fine-tuned model home, as GGUF for llama.cpp, Ollama and LM Studio.

`--format gguf-lora` writes the adapter alone, which llama.cpp applies on top of the user's GGUF base
(`llama-cli -m base.gguf --lora adapter.gguf`; Ollama's `ADAPTER`): the base keeps its own quantization.
`--format gguf` writes the merged model as one standalone file: when the base came from a GGUF (the
embedded default does) its keys, tokenizer and every unchanged tensor are carried over as they are;
for a transformers folder of the Llama family they are written from config.json and tokenizer.json.
Nothing but gguf-py is used: no llama.cpp checkout, no compiler, no subprocess (lorafit.export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lorafit.commands.common import print_settings
from lorafit.commands.model_options import AllowPickle, ModelPath, TrustRemoteCode
from lorafit.errors import LorafitError

# Measured (bench/gguf_export.py, bench/RESULTS.md): an f16 adapter answers the built-in task in llama.cpp as
# the f32 one does, at half the size.
DEFAULT_ADAPTER_OUTTYPE = "f16"
DEFAULT_MERGED_OUTTYPE = "f16"
ADAPTER_OUTTYPES = ("f32", "f16", "bf16")


@dataclass
class ExportConfig:
    """Export an adapter as a GGUF LoRA for llama.cpp / Ollama, or the merged model as one GGUF file."""

    adapter: str
    """Adapter folder (lorafit or peft), a lorafit run folder (its adapter/) or a checkpoint of one."""
    output: str
    """The .gguf file to write."""
    format: Literal["gguf-lora", "gguf"] = "gguf-lora"
    """gguf-lora: the adapter alone, applied by llama.cpp on your GGUF base (--lora); gguf: the merged model."""
    outtype: Optional[Literal["f32", "f16", "bf16", "q8_0"]] = None
    """Type of the written tensors (1-D ones stay f32). Default f16. gguf-lora: f32, f16 or bf16; gguf: the
    merged tensors (a base GGUF's unchanged tensors keep their own type)."""
    model: ModelPath = None
    overwrite: bool = False
    """Replace an earlier `lorafit export` file (only a GGUF that lorafit wrote)."""
    allow_pickle: AllowPickle = False
    trust_remote_code: TrustRemoteCode = False


def run(config: ExportConfig, echo=print, given=None) -> Path:
    from lorafit.commands.common import choose_base_model, resolve_adapter_folder
    from lorafit.export.gguf_file import check_output

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
        return _export_adapter(config, output, adapter_dir, spec, record, base_gguf, echo)
    return _export_merged(config, output, adapter_dir, spec, record, base_gguf, echo)


def source_gguf(spec: Optional[str]) -> Optional[Path]:
    """The GGUF file the base model comes from: the embedded default's, a .gguf --model, or the one a cached
    conversion folder records (when it is still there); None for a plain transformers folder."""
    from lorafit.gguf_model import conversion_source, default_model_path

    if spec is None:
        return default_model_path()
    path = Path(spec)
    return path if path.suffix.lower() == ".gguf" else conversion_source(path)


def _read_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # numpy, struct and value errors: gguf-py has no error type of its own
        raise LorafitError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def _export_adapter(config: ExportConfig, output: Path, adapter_dir: Path, spec, record, base_gguf, echo) -> Path:
    import gguf

    from lorafit.export.gguf_file import marker, write_gguf
    from lorafit.export.gguf_lora import (
        add_lora_tensors,
        check_against_base,
        common_alpha,
        lora_pairs,
    )
    from lorafit.export.layout import layout_of, layout_of_gguf
    from lorafit.identity import model_spec
    from lorafit.io import KEY_PREFIX, WEIGHTS_NAME, read_adapter
    from lorafit.models import load_config, resolve_model_folder

    raw, adapter_config, tensors = read_adapter(adapter_dir, allow_pickle=config.allow_pickle)
    pairs = lora_pairs(raw, adapter_config, tensors, adapter_dir / WEIGHTS_NAME, KEY_PREFIX)
    if base_gguf is not None:
        base = _read_gguf(base_gguf)
        layout = layout_of_gguf(base, base_gguf)
        check_against_base(pairs, layout, base, base_gguf)
        if record is not None and config.model is not None and model_spec(config.model) != record["model"]:
            # a GGUF of the same model in another quantization is the usual reason; weights are not compared
            echo(f"note: {adapter_dir} was trained on {record['model']}; written for {base_gguf} (its architecture "
                 "and every adapted tensor's shape checked, its weights not compared)")
    else:
        layout = layout_of(load_config(resolve_model_folder(spec), trust_remote_code=config.trust_remote_code))
    alpha = common_alpha(pairs)
    outtype = config.outtype or DEFAULT_ADAPTER_OUTTYPE

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha if alpha is not None else 0.0)
        writer.add_name(f"{adapter_dir.resolve().name} (lorafit adapter)")
        writer.add_string("lorafit.export", marker(format="gguf-lora", adapter=str(adapter_dir.resolve())))
        add_lora_tensors(writer, pairs, layout, outtype, alpha)

    write_gguf(output, layout.architecture, fill)
    ranks = sorted({pair.rank for pair in pairs})
    scale = (f"alpha {alpha:g} (llama.cpp scales by alpha/r)" if alpha is not None
             else "each pair's scale folded into B (alpha 0: per-module ranks or alphas)")
    echo(f"wrote {output}: {len(pairs)} LoRA pairs, r={'/'.join(map(str, ranks))}, {scale}, {outtype}, "
         f"{output.stat().st_size / 2**20:.2f} MiB")
    base_name = base_gguf if base_gguf is not None else "BASE.gguf"
    echo(f"run it: llama-cli -m {base_name} --lora {output}")
    return output


def _export_merged(config: ExportConfig, output: Path, adapter_dir: Path, spec, record, base_gguf, echo) -> Path:
    from lorafit.commands.merge import MergeConfig, merge_adapter
    from lorafit.export.gguf_file import marker, write_gguf
    from lorafit.export.gguf_merged import carry_over, from_transformers, gguf_tensors
    from lorafit.export.layout import layout_of, layout_of_gguf
    from lorafit.models import resolve_model_folder

    outtype = config.outtype or DEFAULT_MERGED_OUTTYPE
    source = _read_gguf(base_gguf) if base_gguf is not None else None
    if source is not None:
        layout_of_gguf(source, base_gguf)  # an architecture the exporter does not know: said before loading
    merge_config = MergeConfig(adapter=config.adapter, output=config.output, model=config.model, dtype="float32",
                               allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    merged = merge_adapter(merge_config, adapter_dir, spec, record, echo)
    model = merged.model
    layout = layout_of(model.config)
    facts = marker(format="gguf", adapter=str(adapter_dir.resolve()), outtype=outtype)

    if source is not None:
        changed = {name for name in model.state_dict()
                   if any(name.startswith(path + ".") for path in merged.adapter_paths)}
        tensors = gguf_tensors(model.state_dict(), layout, changed)
        written = {}
        write_gguf(output, layout.architecture, lambda writer: written.update(
            carry_over(writer, source, base_gguf, tensors, outtype, facts)))
        kept = sorted({kind for name, kind in written.items() if name not in tensors})
        echo(f"wrote {output}: {len(tensors)} merged tensors in {outtype}; the other {len(written) - len(tensors)} "
             f"as they are in {base_gguf} ({', '.join(kept)}), with its keys and tokenizer; "
             f"{output.stat().st_size / 2**20:.1f} MiB")
        if any(kind not in ("F32", "F16", "BF16") for kind in kept):
            echo("the base is quantized: the merged tensors are not re-quantized to its type, which would round "
                 "small updates away; `--format gguf-lora` keeps the base file as it is and is smaller")
    else:
        folder = resolve_model_folder(spec)
        written = {}
        write_gguf(output, layout.architecture, lambda writer: written.update(
            from_transformers(writer, model, merged.tokenizer, folder, layout, outtype, facts)))
        echo(f"wrote {output}: {len(written)} tensors in {outtype} (1-D ones f32), keys and tokenizer from {folder}; "
             f"{output.stat().st_size / 2**20:.1f} MiB")
    echo(f"run it: llama-cli -m {output}")
    return output
