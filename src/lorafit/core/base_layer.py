"""How adapters see the frozen layer they sit beside: the one narrow interface to a base linear layer.

A linear-type adapter (LoRA, DoRA, IA3) needs four things from its base layer and nothing else: its
input and output sizes, its weight as a dense (out, in) matrix (to merge, to take norms, for PiSSA's
SVD), a way to write a merged dense weight back, and its forward. nn.Linear stores W as (out, in);
transformers' Conv1D (GPT-2) stores it transposed; bitsandbytes' 4-bit and 8-bit layers store it
quantized (their dense weight is the dequantized one, exactly what their forward multiplies by). A new
kind of base layer is one more `LinearBase` subclass added to `LINEAR_BASES`; the adapter layers need
no change.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class LinearBase:
    """A view of one frozen linear layer (not a module: it owns nothing and is never saved)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @staticmethod
    def layer_type() -> type | None:
        """The module class this view is for (None: its library is not loaded, so no model has one)."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        """An instance of the class that computes what the class computes. A subclass with a forward of its own
        is probed once per class (`_behaves_linear`): Falcon's FalconLinear is the same product written out,
        Llama 4's MoE router returns (scores, logits), which an adapter cannot add to."""
        kind = cls.layer_type()
        if kind is None or not isinstance(layer, kind):
            return False
        return type(layer).forward is kind.forward or _behaves_linear(layer, cls)

    @property
    def quantized(self) -> bool:
        """True when writing a dense weight back would re-quantize it (and so lose small changes)."""
        return False

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of dense_weight() (what the layer computes in)."""
        return self.dense_weight().dtype

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


def _bitsandbytes():
    """bitsandbytes if something imported it (lorafit.models.quantize does), else None: never imported here."""
    return sys.modules.get("bitsandbytes")


class _QuantizedLinearBase(LinearBase):
    """What bitsandbytes' layers share: nn.Linear's sizes, a non-float stored weight, lossy write-back."""

    @property
    def quantized(self) -> bool:
        return True

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    @property
    def device(self) -> torch.device:
        return self.layer.weight.device


class Linear4bitBase(_QuantizedLinearBase):
    """bitsandbytes' Linear4bit (NF4/FP4, blocks of 64 weights with an absmax scale each; QLoRA)."""

    @staticmethod
    def layer_type() -> type | None:
        bnb = _bitsandbytes()
        return bnb.nn.Linear4bit if bnb else None

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.weight.quant_state.dtype

    def dense_weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight: a new tensor on every call."""
        weight = self.layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("this Linear4bit was repacked for bitsandbytes' CPU inference kernel; "
                               "lorafit.models.quantize.keep_weights_as_trained prevents that")
        return _bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)

    def write_weight(self, dense: torch.Tensor) -> None:
        """Re-quantize `dense` with the layer's settings (lossy: see adapters.merge's requantize)."""
        bnb = _bitsandbytes()
        weight = self.layer.weight
        state = weight.quant_state
        data, new_state = bnb.functional.quantize_4bit(
            dense.to(state.dtype).contiguous(), blocksize=state.blocksize, compress_statistics=state.nested,
            quant_type=state.quant_type, quant_storage=weight.quant_storage)
        weight.data = data
        weight.quant_state = new_state
        self.layer.quant_state = new_state


class Linear8bitBase(_QuantizedLinearBase):
    """bitsandbytes' Linear8bitLt with int8 weights (LLM.int8(): one scale per output row)."""

    @staticmethod
    def layer_type() -> type | None:
        bnb = _bitsandbytes()
        return bnb.nn.Linear8bitLt if bnb else None

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.bias.dtype if self.layer.bias is not None else torch.float32

    def _scales(self) -> torch.Tensor:
        # Before its first forward the layer keeps the row scales on the weight, afterwards in its state.
        scales = getattr(self.layer.weight, "SCB", None)
        return scales if scales is not None else self.layer.state.SCB

    def dense_weight(self) -> torch.Tensor:
        """W = int8 rows × row scale / 127: a new float32 tensor on every call."""
        return _bitsandbytes().functional.int8_vectorwise_dequant(self.layer.weight.data, self._scales())

    def write_weight(self, dense: torch.Tensor) -> None:
        """Re-quantize `dense` to int8 rows (lossy: see adapters.merge's requantize)."""
        rows, scales, _ = _bitsandbytes().functional.int8_vectorwise_quant(dense.to(torch.float16).contiguous())
        layer = self.layer
        layer.weight.data = rows
        if getattr(layer.weight, "SCB", None) is not None:
            layer.weight.CB, layer.weight.SCB = rows, scales
        else:
            layer.state.CB, layer.state.SCB = rows, scales


# The base linear layers adapters know, most specific first (bitsandbytes' layers subclass nn.Linear).
LINEAR_BASES: list[type[LinearBase]] = [Linear4bitBase, Linear8bitBase, TransposedLinear, TorchLinear]


def quantized_layer_types() -> tuple[type, ...]:
    """bitsandbytes' linear layers, or () when bitsandbytes was never imported (then no model has them)."""
    return tuple(kind for kind in (view.layer_type() for view in LINEAR_BASES if issubclass(view, _QuantizedLinearBase))
                 if kind is not None)


def linear_types() -> tuple[type, ...]:
    """The module classes adapters treat as linear layers ("all-linear" selects these)."""
    return tuple(kind for kind in (view.layer_type() for view in LINEAR_BASES) if kind is not None)


_SUBCLASS_IS_LINEAR: dict[type, bool] = {}


def _behaves_linear(layer: nn.Module, view: type[LinearBase]) -> bool:
    """Does this subclass's own forward return one tensor of the layer's output size? (one row of zeros in)"""
    kind = type(layer)
    if kind not in _SUBCLASS_IS_LINEAR:
        base = view(layer)
        weight = base.dense_weight()
        try:
            with torch.no_grad():
                out = layer(torch.zeros(1, base.in_features, dtype=weight.dtype, device=weight.device))
            _SUBCLASS_IS_LINEAR[kind] = isinstance(out, torch.Tensor) and tuple(out.shape) == (1, base.out_features)
        except (TypeError, ValueError, RuntimeError):
            _SUBCLASS_IS_LINEAR[kind] = False
    return _SUBCLASS_IS_LINEAR[kind]


def is_linear(layer: nn.Module) -> bool:
    """Can adapters treat `layer` as a linear layer (one of linear_types(), with its class's own forward)?"""
    return any(kind.accepts(layer) for kind in LINEAR_BASES)


def linear_base(layer: nn.Module) -> LinearBase:
    """The view of `layer` as a linear map; TypeError for a layer that is not one."""
    for kind in LINEAR_BASES:
        if kind.accepts(layer):
            return kind(layer)
    raise TypeError(f"{type(layer).__name__} is not a linear layer lorafit knows "
                    f"({', '.join(k.__name__ for k in LINEAR_BASES)})")
