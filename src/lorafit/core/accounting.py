"""Parameter accounting: what is trainable, what the adapters add. Works on meta-device models too."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorafit.core.base_layer import quantized_layer_types
from lorafit.core.wrapper import AdapterWrapper


@dataclass(frozen=True)
class ParameterCount:
    """Counts of a model's parameters (shared/tied tensors counted once)."""

    trainable: int
    total: int
    adapter: int

    @property
    def base(self) -> int:
        return self.total - self.adapter

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable, total and adapter parameter counts; numel only, so no weight needs to exist.

    A 4/8-bit weight counts as the out × in values it stands for (bitsandbytes packs two 4-bit values per
    byte into a flat tensor), so a quantized model has as many parameters as the float one.
    """
    adapter_ids = set()
    for module in model.modules():
        if isinstance(module, AdapterWrapper):
            for dict_name in module.adapter_parameter_dicts:
                adapter_ids.update(id(p) for p in getattr(module, dict_name).values())
    quantized = quantized_layer_types()
    logical = {id(layer.weight): layer.in_features * layer.out_features for layer in model.modules()
               if quantized and isinstance(layer, quantized)}
    trainable = total = adapter = 0
    for parameter in model.parameters():  # yields each shared tensor once
        count = logical.get(id(parameter), parameter.numel())
        total += count
        trainable += count if parameter.requires_grad else 0
        adapter += count if id(parameter) in adapter_ids else 0
    return ParameterCount(trainable=trainable, total=total, adapter=adapter)


def _percent(value: float) -> str:
    return f"{value:.1f}%" if value >= 10 else f"{value:.2g}%"


def report(model: nn.Module) -> str:
    """One line, e.g. 'trainable 460,800 / 134,975,808 (0.34%) · base 134,515,008 · adapter 460,800'."""
    count = trainable_parameters(model)
    return (
        f"trainable {count.trainable:,} / {count.total:,} ({_percent(count.trainable_percent)})"
        f" · base {count.base:,} · adapter {count.adapter:,}"
    )
