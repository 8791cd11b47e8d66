"""Loading a model into 4/8 bits (or another dtype than its files') without holding its file weights.

transformers maps the whole safetensors file and keeps every page it touched resident until the load
ends: loading the embedded 135M model as NF4 peaked at 1,245 MiB of RSS (516 MiB of it the mapped fp32
file), and in bf16 at 1,160 MiB, both more than training it in fp32 from the mapped file (measured,
this machine). Here the model is built with empty (meta) parameters and filled one tensor at a time,
each read through its own short `safe_open` (so its file pages are released at once) and quantized or
cast before the next is read: the peak is the converted model plus one file tensor. The quantized bytes
are bitsandbytes' own, the same as transformers' load and `lorafit.quantize_model` give (tested).
When the files already hold the dtype asked for, transformers' zero-copy mapping is the better load.

Only for folders whose tensor names are the model's own parameter names (lorafit's converted GGUF cache,
and checkpoints saved by transformers for the same class); anything else returns None and the caller
uses transformers' loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.core.module_tree import replace_module
from lorafit.heap import release_freed_memory
from lorafit.models.quantize import (
    QuantizeSettings,
    bitsandbytes_config,
    keep_weights_as_trained,
    layers_to_quantize,
    quantized_linear,
)


def _tensor_files(folder: Path) -> dict[str, Path] | None:
    """{tensor name: the safetensors file holding it}, or None when the folder has no safetensors."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _file_shape(files: dict[str, Path], name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(files[name]), framework="pt") as handle:
        return tuple(handle.get_slice(name).get_shape())


def _read(files: dict[str, Path], name: str, dtype: torch.dtype | None) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(files[name]), framework="pt") as handle:  # closed at once: its pages go with it
        tensor = handle.get_tensor(name)
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def file_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the folder's first floating-point tensor (None: no safetensors, or none float)."""
    from safetensors import safe_open

    files = _tensor_files(folder)
    for name, path in (files or {}).items():
        with safe_open(str(path), framework="pt") as handle:
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
                handle.get_slice(name).get_dtype())
        if dtype is not None:
            return dtype
    return None


def load_tensor_by_tensor(folder: Path, config, settings: QuantizeSettings | None, dtype: torch.dtype,
                          device: torch.device, trust_remote_code: bool = False) -> nn.Module | None:
    """The causal LM of `folder` in `dtype`, its linear layers quantized as they are read when `settings`
    says so; None if this way cannot (then the caller uses transformers' loader)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    files = _tensor_files(folder)
    if files is None:
        return None
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # a tied head shares the embedding (from_config on meta leaves it separate)
    names = [name for name, _ in model.named_parameters()]  # a tied weight once
    buffers = {name for name, _ in model.named_buffers()}
    if not set(names) <= set(files) or set(files) - set(names) - buffers:
        # other tensor names (a renamed or converted checkpoint) or extra ones: transformers maps and reports them
        return None
    if any(_file_shape(files, name) != tuple(parameter.shape) for name, parameter in model.named_parameters()):
        return None  # shapes config.json does not describe: transformers' loader says which, in its report
    candidates = layers_to_quantize(model, settings, device)[0] if settings is not None else []
    quantized = {path for path, _ in candidates}
    for path, module in candidates:
        weight = _read(files, f"{path}.weight", dtype)
        bias = _read(files, f"{path}.bias", dtype) if module.bias is not None else None
        layer = quantized_linear(weight, bias, settings, device, transposed=isinstance(module, Conv1D))
        replace_module(model, path, layer)
        del weight, bias
    for name in names:
        module_path, _, tensor_name = name.rpartition(".")
        if module_path in quantized:
            continue
        module = model.get_submodule(module_path) if module_path else model
        value = _read(files, name, dtype).to(device)
        setattr(module, tensor_name, nn.Parameter(value, requires_grad=value.is_floating_point()))
    for name, buffer in list(model.named_buffers()):
        if name in files and buffer is not None:  # persistent buffers the checkpoint holds
            module_path, _, buffer_name = name.rpartition(".")
            module = model.get_submodule(module_path) if module_path else model
            module.register_buffer(buffer_name, _read(files, name, None).to(buffer.dtype), persistent=True)
    model.tie_weights()
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    if device.type != "cpu":
        model.to(device)  # the buffers; the bitsandbytes layers are there already
    _describe_as_loaded(model, folder, settings, dtype)
    if settings is not None:
        keep_weights_as_trained(model)
    release_freed_memory()
    return model.eval()


def _describe_as_loaded(model: nn.Module, folder: Path, settings: QuantizeSettings | None, dtype: torch.dtype) -> None:
    """What from_pretrained would have set: where it came from, its generation settings, its quantization
    (so a saved copy of the quantized model loads back as such)."""
    from transformers import GenerationConfig

    model.name_or_path = str(folder)
    model.config._name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    if settings is not None:
        model.config.quantization_config = bitsandbytes_config(settings, dtype)
