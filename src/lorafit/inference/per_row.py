"""Mixed-adapter serving: row i of a batch runs through LoRA adapter names[i], in one forward.

Multi-tenant inference (one base model, many users' adapters) without a Python loop over adapters:
in every LoRA layer the distinct adapters' A and s·B are stacked (zero-padded to the largest rank; a
zero row adds nothing) and gathered per row, so the cost is one batched matmul pair. Without autograd
the gathered stacks are kept on the layer until an adapter's weights change (decoding reuses them for
every new token).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lorafit.core.adapters import state_of, wrappers
from lorafit.core.registry import method_of
from lorafit.errors import LorafitError
from lorafit.methods.lora.layer import LoraLinear

_CACHE = "_row_adapter_cache"  # on each LoraLinear while serving: (key, stacked Aᵀ, stacked (s·B)ᵀ)


class RowAdapters:
    """The per-row adapter names a LoraLinear adds while `adapter_per_row` is active."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)

    def add_updates(self, layer: LoraLinear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if len(self.names) != x.shape[0]:
            raise LorafitError(f"adapter_per_row names {len(self.names)} adapters for a batch of {x.shape[0]} rows")
        if torch.is_grad_enabled():
            rows_a, rows_b = _gather(layer, self.names, x.device)
        else:
            rows_a, rows_b = _cached(layer, self.names, x.device)
        rows_x = x.reshape(x.shape[0], -1, layer.in_features).to(rows_a.dtype)
        hidden = torch.bmm(rows_x, rows_a)
        if out.dtype == rows_b.dtype and not torch.is_grad_enabled() and out.is_contiguous():
            return out.view(out.shape[0], -1, layer.out_features).baddbmm_(hidden, rows_b).view(out.shape)
        return out + torch.bmm(hidden, rows_b).reshape(out.shape).to(out.dtype)


def _gather(layer: LoraLinear, names: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: Aᵀ (in × r) and (s·B)ᵀ (r × out) of that row's adapter, ready for bmm."""
    distinct = list(dict.fromkeys(names))
    rank = max((layer.lora_A[n].shape[0] for n in distinct if n in layer.lora_A), default=1)
    reference = next(iter(layer.lora_A.values()))
    stacked_a = reference.new_zeros(len(distinct), rank, layer.in_features)
    stacked_b = reference.new_zeros(len(distinct), layer.out_features, rank)
    for index, name in enumerate(distinct):
        if name in layer.lora_A:
            r = layer.lora_A[name].shape[0]
            stacked_a[index, :r] = layer.lora_A[name]
            stacked_b[index, :, :r] = layer.lora_B[name] * layer.specs[name].scaling
    rows = torch.tensor([distinct.index(n) for n in names], device=device)
    return stacked_a[rows].transpose(1, 2), stacked_b[rows].transpose(1, 2)


def _cached(layer: LoraLinear, names: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    involved = [t for n in dict.fromkeys(names) if n in layer.lora_A for t in (layer.lora_A[n], layer.lora_B[n])]
    key = (tuple(names), str(device), tuple((id(t), t._version) for t in involved))
    cached = getattr(layer, _CACHE, None)
    if cached is None or cached[0] != key:
        rows_a, rows_b = _gather(layer, names, device)
        cached = (key, rows_a.contiguous(), rows_b.contiguous())
        setattr(layer, _CACHE, cached)
    return cached[1], cached[2]


@contextmanager
def adapter_per_row(model: nn.Module, names: list[str]) -> Iterator[nn.Module]:
    """Serve a batch whose row i uses LoRA adapter names[i] (multi-tenant inference, one forward).

    Plain LoRA adapters on linear layers, unmerged; the batch size must be len(names).
    """
    state = state_of(model)
    for name in names:
        config = state.config(name)
        method = method_of(config)
        why_not = method.per_row(config) if method.per_row else "adapter_per_row serves plain LoRA adapters only"
        if why_not:
            raise LorafitError(f"adapter {name!r}: {why_not}")
    found = list(wrappers(model))
    for path, wrapper in found:
        if not isinstance(wrapper, LoraLinear):
            raise LorafitError(f"{path} is a {type(wrapper).__name__}: adapter_per_row serves LoRA on linear layers only")
        if wrapper.merged_adapters:
            raise LorafitError(f"adapters are merged into {path}; unmerge before serving them per row")
    serving = RowAdapters(names)
    for _, wrapper in found:
        wrapper.row_adapters = serving
    try:
        yield model
    finally:
        for _, wrapper in found:
            wrapper.row_adapters = None
            wrapper.__dict__.pop(_CACHE, None)
