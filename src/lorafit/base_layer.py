"""How adapters see the frozen layer they sit beside: the one narrow interface to a base linear layer.

A linear-type adapter (LoRA, DoRA, IA3) needs four things from its base layer and nothing else: its
input and output sizes, its weight as a dense (out, in) matrix (to merge, to take norms, for PiSSA's
SVD), a way to write a merged dense weight back, and its forward. nn.Linear stores W as (out, in);
transformers' Conv1D (GPT-2) stores it transposed. A new kind of base layer (a quantized one, say) is
one more `LinearBase` subclass added to `LINEAR_BASES`; the adapter layers need no change.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class LinearBase:
    """A view of one frozen linear layer (not a module: it owns nothing and is never saved)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @staticmethod
    def layer_type() -> type:
        """The module class this view is for."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        return isinstance(layer, cls.layer_type())

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def stores_transposed(self) -> bool:
        """True when the stored weight is (in, out): peft's `fan_in_fan_out`."""
        return False

    def dense_weight(self) -> torch.Tensor:
        """W as (out, in), in the stored dtype (a view where the layout allows; never modify it)."""
        raise NotImplementedError

    def write_weight(self, dense: torch.Tensor) -> None:
        """Store a new (out, in) weight (cast to the stored dtype), in place."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.dense_weight().device


class TorchLinear(LinearBase):
    """nn.Linear: y = x Wᵀ + b with W (out, in)."""

    @staticmethod
    def layer_type() -> type:
        return nn.Linear

    @property
    def in_features(self) -> int:
        return self.layer.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.layer.weight.shape[0]

    def dense_weight(self) -> torch.Tensor:
        return self.layer.weight

    def write_weight(self, dense: torch.Tensor) -> None:
        self.layer.weight.data.copy_(dense.to(self.layer.weight.dtype))


class TransposedLinear(TorchLinear):
    """transformers' Conv1D (GPT-2): y = x W + b with W stored (in, out)."""

    @staticmethod
    def layer_type() -> type:
        return Conv1D

    @property
    def stores_transposed(self) -> bool:
        return True

    @property
    def in_features(self) -> int:
        return self.layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.layer.weight.shape[1]

    def dense_weight(self) -> torch.Tensor:
        return self.layer.weight.T

    def write_weight(self, dense: torch.Tensor) -> None:
        self.layer.weight.data.copy_(dense.T.to(self.layer.weight.dtype))


# The base linear layers adapters know, most specific first.
LINEAR_BASES: list[type[LinearBase]] = [TransposedLinear, TorchLinear]


def linear_types() -> tuple[type, ...]:
    """The module classes adapters treat as linear layers ("all-linear" selects these)."""
    return tuple(kind.layer_type() for kind in LINEAR_BASES)


def linear_base(layer: nn.Module) -> LinearBase:
    """The view of `layer` as a linear map; TypeError for a layer that is not one."""
    for kind in LINEAR_BASES:
        if kind.accepts(layer):
            return kind(layer)
    raise TypeError(f"{type(layer).__name__} is not a linear layer lorafit knows "
                    f"({', '.join(k.__name__ for k in LINEAR_BASES)})")
