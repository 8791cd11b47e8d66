"""The one way lorafit swaps a module inside a model: wrappers in and out (attach, unload), bitsandbytes layers in
(quantize_model, a quantized load), dense layers back (dequantize_model), stand-ins (the memory planner)."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` (dotted, as named_modules gives it) in `model`; returns its parent module."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
    return parent
