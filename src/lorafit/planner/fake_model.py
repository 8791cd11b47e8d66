"""The model a plan is for, built from its config with fake tensors: every shape and dtype, no memory.

`FakeTensorMode` (PyTorch's tensors without data, what torch.compile traces with) lets the planner build a
7B model on a laptop in seconds and run lorafit's own training step on it. bitsandbytes' layers cannot be
built with fake tensors, so a quantized layer is a stand-in (`QuantizedStandIn`) holding the same bytes
and allocating in its forward and backward what bitsandbytes' CPU path allocates (measured against it in
tests/planner).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, PretrainedConfig

from lorafit.core.module_tree import replace_module
from lorafit.errors import LorafitError
from lorafit.models.quantize import (
    BLOCK_SIZE,
    QuantizeSettings,
    layers_to_quantize,
)

# bitsandbytes' double quantization: the block scales quantized to 8 bits in blocks of 256
NESTED_BLOCK = 256


def fake_mode() -> FakeTensorMode:
    """A mode in which real inputs (token ids, targets) mix with the fake model."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def build_fake_model(config: PretrainedConfig, dtype: torch.dtype, mode: FakeTensorMode, *,
                     trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `config` in `dtype`, its parameters fake CPU tensors, frozen."""
    with mode:
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as err:
            raise LorafitError(f"cannot build a {config.model_type} model from this config to plan for: "
                               f"{str(err).splitlines()[0]}") from err
    model.requires_grad_(False)
    return model


class _DequantizedMatmul(torch.autograd.Function):
    """y = x Wᵀ (+ b) where W is dequantized for the call and dropped after, as bitsandbytes' CPU path does:
    a dense (out, in) copy of the weight in the compute dtype exists during the matmul, in forward and again
    in backward; 4-bit keeps nothing for backward, int8 keeps its input (bitsandbytes' MatMul8bitFp)."""

    @staticmethod
    def forward(ctx, x, layer):
        weight = x.new_empty(layer.out_features, layer.in_features)
        ctx.layer = layer
        if layer.settings.kind == "int8":
            ctx.save_for_backward(x)
        return F.linear(x, weight, layer.bias)

    @staticmethod
    def backward(ctx, grad_output):
        layer = ctx.layer
        weight = grad_output.new_empty(layer.out_features, layer.in_features)
        return grad_output @ weight, None


class QuantizedStandIn(nn.Module):
    """A frozen bitsandbytes 4-bit or 8-bit linear layer as the planner sees it: its stored bytes, its
    forward's allocations (`_DequantizedMatmul`)."""

    def __init__(self, module: nn.Module, settings: QuantizeSettings, compute_dtype: torch.dtype) -> None:
        super().__init__()
        transposed = type(module).__name__ == "Conv1D"
        out_features, in_features = module.weight.shape[::-1] if transposed else module.weight.shape
        self.in_features, self.out_features, self.settings = in_features, out_features, settings
        count = in_features * out_features
        device = module.weight.device
        if settings.kind == "int8":  # int8 rows, one fp32 scale per row
            self.register_buffer("packed", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        else:  # two 4-bit values per byte, one absmax per block of 64 (8-bit + nested fp32 with double quant)
            self.register_buffer("packed", torch.empty((count + 1) // 2, 1, dtype=torch.uint8, device=device))
            blocks = -(-count // BLOCK_SIZE)
            if settings.double_quant:
                self.register_buffer("scales", torch.empty(blocks, dtype=torch.uint8, device=device))
                self.register_buffer("nested_scales", torch.empty(-(-blocks // NESTED_BLOCK), dtype=torch.float32,
                                                                  device=device))
            else:
                self.register_buffer("scales", torch.empty(blocks, dtype=torch.float32, device=device))
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().to(compute_dtype),
                                                                  requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x):
        return _DequantizedMatmul.apply(x.to(self.compute_dtype), self)


def quantize_fake_model(model: nn.Module, settings: QuantizeSettings, compute_dtype: torch.dtype,
                        mode: FakeTensorMode) -> tuple[list[str], list[str]]:
    """Replace the layers lorafit would quantize (the same choice: `layers_to_quantize`) by stand-ins;
    returns (quantized paths, paths kept float). Call before attaching an adapter (attach wraps the stand-in)."""
    chosen, kept = layers_to_quantize(model, settings, torch.device("cpu"))
    with mode:
        for path, module in chosen:
            replace_module(model, path, QuantizedStandIn(module, settings, compute_dtype))
    return [path for path, _ in chosen], kept
