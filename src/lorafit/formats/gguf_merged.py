"""The merged model (W + s·B·A folded in) as one standalone GGUF file that llama.cpp and Ollama run.

Two sources. When the base came from a GGUF (the embedded default does), that file is the template: its
keys -- architecture, hyperparameters, tokenizer, chat template -- are carried over as they are, every
tensor the adapter did not change is copied byte for byte (keeping its quantization: nothing is
re-quantized), and only the merged tensors are written, in --outtype. For a transformers folder of the
Llama family the keys llama.cpp needs are written from config.json and the tokenizer (tokenizer_keys),
and every tensor in --outtype.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from lorafit.errors import LorafitError
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
        out[name] = layout.to_gguf_rows(name, tensor.detach().float().cpu().numpy())
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
    missing = sorted(set(merged) - set(present))
    if missing:
        raise LorafitError(f"{source_path} has no tensor {missing[0]}, which the merge changed (a bias BitFit added?); "
                           "it cannot be carried over into this file: keep the adapter unmerged")
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
    return written


def _type_of(data: np.ndarray) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType.F16 if data.dtype == np.float16 else gguf.GGMLQuantizationType.F32


def from_transformers(writer: gguf.GGUFWriter, model, tokenizer, folder: Path, layout: Layout, outtype: str,
                      marker: str) -> dict[str, str]:
    """Fill `writer` with a Llama-family transformers model: llama.cpp's keys, the tokenizer, every tensor."""
    config = model.config
    add_llama_keys(writer, config, folder, outtype)
    add_tokenizer(writer, folder, tokenizer, config.vocab_size)
    writer.add_string(MARKER_KEY, marker)
    written = {}
    for name, values in gguf_tensors(model.state_dict(), layout).items():
        data, options = encode(name, values, outtype)
        writer.add_tensor(name, data, **options)
        written[name] = (options.get("raw_dtype") or _type_of(data)).name
    return written


def add_llama_keys(writer: gguf.GGUFWriter, config, folder: Path, outtype: str) -> None:
    """The hyperparameters llama.cpp's `llama` architecture reads, from a transformers config."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear"):
        raise LorafitError(f"{folder / 'config.json'}: rope type {rope_type!r}; GGUF export writes the default and "
                           "linear rotary embeddings only: export the adapter (--format gguf-lora) instead")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads

    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[outtype])


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
        write_gguf(output, layout.architecture, lambda writer: written.update(
            from_transformers(writer, model, tokenizer, model_folder, layout, outtype, facts)))
        echo(f"wrote {output}: {len(written)} tensors in {outtype} (1-D ones f32), keys and tokenizer from "
             f"{model_folder}; {output.stat().st_size / 2**20:.1f} MiB")
    echo(f"run it: llama-cli -m {output}")
    return output
