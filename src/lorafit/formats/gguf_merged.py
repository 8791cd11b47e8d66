"""The merged model (W + s·B·A folded in) as one standalone GGUF file that llama.cpp and Ollama run.

Two sources. When the base came from a GGUF (the embedded default does), that file is the template: its
keys -- architecture, hyperparameters, tokenizer, chat template -- are carried over as they are, every
tensor the adapter did not change is copied byte for byte (keeping its quantization: nothing is
re-quantized), and only the merged tensors are written, in --outtype. For a transformers folder of a
family llama.cpp runs (gguf_families) the keys llama.cpp needs are written from config.json and the
tokenizer from tokenizer.json (gguf_tokenizer), and every tensor in --outtype.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from lorafit.errors import LorafitError
from lorafit.formats.gguf_families import add_hyperparameters, check_computable
from lorafit.formats.gguf_file import FILE_TYPES, MARKER_KEY, encode, marker, write_gguf
from lorafit.formats.gguf_layout import Layout, layout_of
from lorafit.formats.gguf_tokenizer import add_tokenizer

# Keys the writer sets itself, or that describe the file rather than the model.
_NOT_CARRIED = ("GGUF.", "general.architecture", MARKER_KEY)


def gguf_tensors(state: dict[str, torch.Tensor], layout: Layout, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """transformers tensors -> {GGUF name: float32 array in llama.cpp's layout}; only `names` when given."""
    out = {}
    for hf_name, tensor in state.items():
        if names is not None and hf_name not in names:
            continue
        if hf_name == "lm_head.weight" and layout.tie_word_embeddings:
            continue  # llama.cpp reads the output projection from token_embd.weight
        name = layout.gguf_name(hf_name)
        out[name] = layout.to_gguf(name, tensor.detach().float().cpu().numpy())
    return out


def carry_over(writer: gguf.GGUFWriter, source: gguf.GGUFReader, source_path: Path, merged: dict[str, np.ndarray],
               outtype: str, marker: str) -> dict[str, str]:
    """Fill `writer` from `source`, with the `merged` tensors replacing theirs; {tensor: type written}."""
    for key, field in source.fields.items():
        if key.startswith(_NOT_CARRIED):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type)
    writer.add_string(MARKER_KEY, marker)

    present = {tensor.name: tensor for tensor in source.tensors}
    added = added_biases(set(merged) - set(present), present)
    missing = sorted(set(merged) - set(present) - set(added))
    if missing:
        raise LorafitError(f"{source_path} has no tensor {missing[0]}, which the merge changed, and lorafit adds only "
                           "the biases of weights it has: export a merged transformers folder instead (lorafit merge)")
    written = {}
    for tensor in source.tensors:
        if tensor.name in merged:
            values = merged[tensor.name]
            shape = tuple(int(n) for n in reversed(tensor.shape))  # the source's ggml order, as numpy holds it
            if values.shape != shape:
                raise LorafitError(f"{source_path}: {tensor.name} is {shape} and the merged model's is {values.shape}: "
                                   "the adapter's base is not this GGUF")
            data, options = encode(tensor.name, values, outtype)
            writer.add_tensor(tensor.name, data, **options)
            written[tensor.name] = (options.get("raw_dtype") or _type_of(data)).name
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            written[tensor.name] = tensor.tensor_type.name
    for name in added:  # after the source's own, in the source's order of their weights
        data, options = encode(name, merged[name], outtype)
        writer.add_tensor(name, data, **options)
        written[name] = (options.get("raw_dtype") or _type_of(data)).name
    return written


def added_biases(names: set[str], present: dict) -> list[str]:
    """The `names` that are biases of weights the source has (BitFit's --add-missing-bias adds them: llama.cpp reads
    such a bias where its architecture has one, and refuses a file holding a tensor it does not read)."""
    order = list(present)
    found = [name for name in names if name.endswith(".bias") and name.removesuffix(".bias") + ".weight" in present]
    return sorted(found, key=lambda name: order.index(name.removesuffix(".bias") + ".weight"))


def _type_of(data: np.ndarray) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType.F16 if data.dtype == np.float16 else gguf.GGMLQuantizationType.F32


def from_transformers(writer: gguf.GGUFWriter, model, tokenizer, folder: Path, layout: Layout, outtype: str,
                      marker: str) -> dict[str, str]:
    """Fill `writer` with a transformers model: llama.cpp's keys for its family, the tokenizer, every tensor."""
    config = model.config
    add_hyperparameters(writer, config, layout.family, folder.name)
    writer.add_file_type(FILE_TYPES[outtype])
    add_tokenizer(writer, folder, tokenizer, config.vocab_size)
    writer.add_string(MARKER_KEY, marker)
    written = {}
    for name, values in gguf_tensors(model.state_dict(), layout).items():
        data, options = encode(name, values, outtype)
        writer.add_tensor(name, data, **options)
        written[name] = (options.get("raw_dtype") or _type_of(data)).name
    return written


def export_merged(model, tokenizer, adapter_paths: list[str], output: Path, *, source: gguf.GGUFReader | None,
                  source_path: Path | None, model_folder: Path, outtype: str, adapter_dir: Path, echo=print) -> Path:
    """Write the merged `model` as one GGUF file: carried over from its base's GGUF `source` when there is one
    (only the tensors of `adapter_paths` written anew), else built from the transformers `model_folder`."""
    layout = layout_of(model.config)
    facts = marker(format="gguf", adapter=str(adapter_dir.resolve()), outtype=outtype)
    written: dict = {}
    if source is not None:
        changed = {name for name in model.state_dict() if any(name.startswith(path + ".") for path in adapter_paths)}
        tensors = gguf_tensors(model.state_dict(), layout, changed)
        write_gguf(output, layout.architecture, lambda writer: written.update(
            carry_over(writer, source, source_path, tensors, outtype, facts)))
        kept = sorted({kind for name, kind in written.items() if name not in tensors})
        echo(f"wrote {output}: {len(tensors)} merged tensors in {outtype}; the other {len(written) - len(tensors)} "
             f"as they are in {source_path} ({', '.join(kept)}), with its keys and tokenizer; "
             f"{output.stat().st_size / 2**20:.1f} MiB")
        if any(kind not in ("F32", "F16", "BF16") for kind in kept):
            echo("the base is quantized: the merged tensors are not re-quantized to its type, which would round "
                 "small updates away; `--format gguf-lora` keeps the base file as it is and is smaller")
    else:
        check_computable(model.config, layout.family, model_folder / "config.json")
        write_gguf(output, layout.architecture, lambda writer: written.update(
            from_transformers(writer, model, tokenizer, model_folder, layout, outtype, facts)))
        echo(f"wrote {output}: {len(written)} tensors in {outtype} (1-D ones f32), keys and tokenizer from "
             f"{model_folder}; {output.stat().st_size / 2**20:.1f} MiB")
        note = layout.family.note and layout.family.note(model.config)
        if note:
            echo(f"note: {note}")
    echo(f"run it: llama-cli -m {output}")
    return output
