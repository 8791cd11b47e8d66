"""A frozen base in fewer bits: bitsandbytes 4-bit (NF4/FP4, QLoRA) or 8-bit (LLM.int8()) linear layers.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores the frozen weights in 4-bit NormalFloat with one
absmax scale per 64 weights (optionally the scales themselves quantized: "double quantization") and
runs the LoRA bypass in float beside them; LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339) keeps
one int8 row per output with a per-row scale. lorafit uses bitsandbytes' own layers and kernels (CPU
and CUDA) and reads them only through `lorafit.core.base_layer` views, so every linear-type method runs on
them unchanged.

bitsandbytes is optional: it is imported only when something is quantized (its import takes seconds).
What stays in float: embeddings, the output head (tied to the embeddings in most small models) and
norms, as in transformers' own bitsandbytes integration, whose quantization is byte-for-byte the same
as `quantize_model` here (tested).
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.core.base_layer import linear_base, quantized_layer_types
from lorafit.core.module_tree import replace_module
from lorafit.errors import LorafitError

QuantizeKind = Literal["nf4", "fp4", "int8"]
KINDS: tuple[str, ...] = ("nf4", "fp4", "int8")
INSTALL_HINT = "pip install bitsandbytes (or pip install 'lorafit[quant]')"
BLOCK_SIZE = 64  # weights per 4-bit absmax block: bitsandbytes' and QLoRA's default
# LLM.int8()'s outlier threshold (the paper's and transformers' default): input columns with a value above it
# multiply in 16-bit, the rest of each input row is rounded to int8 (per-row absmax) for the int8 matmul.
INT8_THRESHOLD = 6.0


@dataclass(frozen=True)
class QuantizeSettings:
    """How the frozen linear layers are stored.

    kind: "nf4" (QLoRA's NormalFloat), "fp4", or "int8" (LLM.int8(): int8 weights, and inputs rounded to
        int8 per row in the forward but for outlier columns, see INT8_THRESHOLD).
    double_quant: also quantize the 4-bit absmax scales (saves ~0.37 bit per weight); 4-bit only.
    compute_dtype: what the 4-bit weights are dequantized to for each matmul; None: the dtype the model
        was loaded in.
    """

    kind: QuantizeKind = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LorafitError(f"unknown quantization {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.double_quant and self.kind == "int8":
            raise LorafitError("double quantization applies to 4-bit weights (nf4, fp4), not int8")

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    def describe(self) -> str:
        return self.kind + (" + double quantization" if self.double_quant else "")

    def same_format(self, other: "QuantizeSettings") -> bool:
        return (self.kind, self.double_quant) == (other.kind, other.double_quant)

    def to_record(self) -> dict:
        """What adapter metadata and merge markers keep (JSON-able); the compute dtype when known."""
        record = {"kind": self.kind, "double_quant": self.double_quant}
        if self.compute_dtype is not None:
            record["dtype"] = str(self.compute_dtype).removeprefix("torch.")
        return record

    @classmethod
    def from_record(cls, record: dict | None) -> "QuantizeSettings | None":
        if not record:
            return None
        dtype = getattr(torch, str(record.get("dtype")), None) if record.get("dtype") else None
        return cls(kind=record["kind"], double_quant=bool(record.get("double_quant", False)),
                   compute_dtype=dtype if isinstance(dtype, torch.dtype) else None)


def bitsandbytes_config(settings: QuantizeSettings, dtype: torch.dtype, skip_modules: list[str] | None = None):
    """transformers' BitsAndBytesConfig for these settings (what a quantized model's config.json carries)."""
    from transformers import BitsAndBytesConfig

    if settings.kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.kind,
                              bnb_4bit_use_double_quant=settings.double_quant,
                              bnb_4bit_compute_dtype=settings.compute_dtype or dtype, llm_int8_skip_modules=skip_modules)


def import_bitsandbytes():
    """bitsandbytes, imported quietly; one clear line when it is not installed."""
    if "bitsandbytes" not in sys.modules:
        # On CPUs with AVX512-BF16 its import looks for an optional inference kernel package and warns
        # when it is absent (on every run). lorafit never uses that kernel (see keep_weights_as_trained).
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        # LLM.int8() rounds fp32 inputs through fp16 by design; its note on every new call site says nothing new
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast from")
    try:
        import bitsandbytes
    except ImportError as err:
        raise LorafitError(f"quantizing the base model needs bitsandbytes, which is not installed: {INSTALL_HINT}") from err
    return bitsandbytes


def is_quantized_layer(module: nn.Module) -> bool:
    types = quantized_layer_types()
    return bool(types) and isinstance(module, types)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if is_quantized_layer(m)]


def keep_weights_as_trained(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel in eval mode.

    On AVX512-BF16 CPUs, Linear4bit's first forward in eval mode without autograd rewrites its weight
    in another layout with the scales rounded to bf16, for good: evaluation would then run (and a merge
    would dequantize) slightly different weights from those the adapter was trained against.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _skipped_paths(model: nn.Module) -> set[str]:
    """The output head (and any linear tied to the input embeddings) stays in float."""
    skip = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for path, module in model.named_modules():
        if module is output or (embedding is not None and getattr(module, "weight", None) is embedding.weight):
            skip.add(path)
    return skip


def _linear_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    skip = _skipped_paths(model)
    return [(path, module) for path, module in model.named_modules()
            if path not in skip and type(module) in (nn.Linear, Conv1D)]


def _input_size(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


def kept_float_on_cpu(module: nn.Module, settings: QuantizeSettings, device: torch.device) -> bool:
    """A linear layer whose input size is not a multiple of 64 stays float for 4-bit on CPU.

    bitsandbytes 0.50's AVX-512 CPU kernel dequantizes such rows with the wrong block scales (measured:
    a 64×96 NF4 matrix comes back 26% off instead of 9%; its generic path and CUDA are right; see
    bitsandbytes PR #2072). Real models' sizes are multiples of 64; tiny test models may not be.
    """
    return settings.bits == 4 and device.type == "cpu" and _input_size(module) % BLOCK_SIZE != 0


def layers_to_quantize(model: nn.Module, settings: QuantizeSettings,
                       device: torch.device) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """(the linear layers to quantize, those kept float by kept_float_on_cpu), head excluded."""
    chosen, kept = [], []
    for path, module in _linear_candidates(model):
        (kept.append(path) if kept_float_on_cpu(module, settings, device) else chosen.append((path, module)))
    return chosen, kept


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, settings: QuantizeSettings,
                     device: torch.device, transposed: bool = False) -> nn.Module:
    """A frozen bitsandbytes layer holding `weight` (out, in; (in, out) if `transposed`, GPT-2's Conv1D)."""
    bnb = import_bitsandbytes()
    weight = weight.detach()
    if transposed:
        weight = weight.T
    out_features, in_features = weight.shape
    if settings.kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.contiguous().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        compute = settings.compute_dtype or weight.dtype
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute,
                                  compress_statistics=settings.double_quant, quant_type=settings.kind, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.contiguous().clone(), requires_grad=False, blocksize=BLOCK_SIZE,
                                         compress_statistics=settings.double_quant, quant_type=settings.kind,
                                         module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes here


def _quantized_copy(module: nn.Module, settings: QuantizeSettings, device: torch.device) -> nn.Module:
    layer = quantized_linear(module.weight, module.bias, settings, device, transposed=isinstance(module, Conv1D))
    layer.train(module.training)
    return layer


@dataclass(frozen=True)
class QuantizeReport:
    """What quantize_model (or a quantized load) did, for the start-up report and the run config."""

    settings: QuantizeSettings
    quantized: int  # linear layers now in 4/8 bits
    left_in_float: list[str]  # kinds of weights kept in float, e.g. "embeddings", "output head", "norms"
    weight_bytes_float: int  # the weights as they would be with every layer in float
    weight_bytes_now: int

    def summary(self) -> str:
        return (f"quantized {self.quantized} linear layers to {self.settings.describe()}; left in float: "
                f"{', '.join(self.left_in_float) or 'nothing'}; weights {_size(self.weight_bytes_float)} in float -> "
                f"{_size(self.weight_bytes_now)}")

    def to_record(self) -> dict:
        return {**self.settings.to_record(), "quantized_layers": self.quantized, "left_in_float": self.left_in_float,
                "weight_bytes_float": self.weight_bytes_float, "weight_bytes": self.weight_bytes_now}


def _size(count: int) -> str:
    return f"{count / 1024 ** 2:,.1f} MiB" if count >= 1024 ** 2 else f"{count / 1024:,.1f} KiB"


def quantize_report(model: nn.Module) -> QuantizeReport | None:
    """The report for a model whose linear layers are quantized (None when they are not)."""
    settings = quantization_of(model)
    if settings is None:
        return None
    layers = quantized_layers(model)
    now = weight_bytes(model)
    in_float = now
    for _, layer in layers:
        view = linear_base(layer)
        in_float += view.in_features * view.out_features * view.dtype.itemsize - _quantized_bytes(layer)
    return QuantizeReport(settings, len(layers), float_parts(model), in_float, now)


def report_quantization(model: nn.Module, echo=print) -> dict | None:
    """Say what a quantized load did (one line); its record for the run's config (None for a float model)."""
    report = quantize_report(model)
    if report is None:
        return None
    echo(report.summary())
    return report.to_record()


def quantize_model(model: nn.Module, settings: QuantizeSettings) -> QuantizeReport:
    """Replace the model's linear layers (not the output head) by bitsandbytes 4/8-bit ones, in place.

    For a model already loaded in float (e.g. the embedded GGUF model after its dequantization). Call it
    before attaching adapters; the new layers are frozen and sit on the device the old ones were on.
    """
    from lorafit.core.wrapper import AdapterWrapper

    if any(isinstance(m, AdapterWrapper) for m in model.modules()):
        raise LorafitError("quantize the base model before attaching adapters to it")
    if quantized_layers(model):
        raise LorafitError("the model is already quantized")
    import_bitsandbytes()
    device = next(model.parameters()).device
    candidates, _ = layers_to_quantize(model, settings, device)
    if not candidates:
        raise LorafitError("the model has no linear layers lorafit can quantize")
    for path, module in candidates:
        replace_module(model, path, _quantized_copy(module, settings, module.weight.device))
    keep_weights_as_trained(model)
    return quantize_report(model)


def quantization_of(model: nn.Module) -> QuantizeSettings | None:
    """The quantization of the model's linear layers (None when they are float)."""
    layers = quantized_layers(model)
    if not layers:
        return None
    layer = layers[0][1]
    bnb = sys.modules["bitsandbytes"]
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return QuantizeSettings("int8", compute_dtype=linear_base(layer).dtype)
    weight = layer.weight
    return QuantizeSettings(weight.quant_type, bool(weight.compress_statistics), layer.compute_dtype)


def float_parts(model: nn.Module) -> list[str]:
    """Which kinds of weights a quantized model keeps in float, in words."""
    parts = []
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None:
        parts.append("embeddings")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and not is_quantized_layer(output):
        tied = embedding is not None and output.weight is embedding.weight
        parts.append("output head (tied to the embeddings)" if tied else "output head")
    if any("norm" in type(m).__name__.lower() for m in model.modules()):
        parts.append("norms")
    left = _linear_candidates(model)
    if left:
        odd = sum(1 for _, m in left if _input_size(m) % BLOCK_SIZE)
        reason = (f" ({odd} with an input size not a multiple of {BLOCK_SIZE}, which bitsandbytes' CPU 4-bit kernel "
                  "dequantizes wrongly)" if odd else "")
        parts.append(f"{len(left)} other linear layers{reason}")
    return parts


def _quantized_bytes(layer: nn.Module) -> int:
    """A bitsandbytes layer's weight as stored: the packed weight, its scales (and nested scales)."""
    tensors = [layer.weight.data]
    state = getattr(layer.weight, "quant_state", None)
    if state is not None:  # 4-bit: one absmax per block, itself quantized under double quantization
        tensors.append(state.absmax)
        if getattr(state, "state2", None) is not None:
            tensors.append(state.state2.absmax)
    scales = getattr(layer.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if scales is not None:  # 8-bit: one scale per row
        tensors.append(scales)
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (4-bit ones with their scales), tied tensors once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if name == "weight" and is_quantized_layer(module):
                total += _quantized_bytes(module)
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every bitsandbytes layer (also under adapters) by an nn.Linear with its dequantized weight.

    The result computes exactly what the quantized model computed (the same weights, in float), so an
    adapter trained on the quantized base merges into it faithfully. Returns how many layers changed.
    """
    count = 0
    for path, module in list(model.named_modules()):
        if not is_quantized_layer(module):
            continue
        view = linear_base(module)
        weight = view.dense_weight().detach()
        target = dtype or view.dtype
        linear = nn.Linear(view.in_features, view.out_features, bias=module.bias is not None,
                           device="meta", dtype=target)
        linear.weight = nn.Parameter(weight.to(target).clone(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(target).clone(), requires_grad=False)
        linear.train(module.training)
        replace_module(model, path, linear)  # an adapter wrapper's view of its base follows (core/wrapper.py)
        count += 1
    _forget_transformers_quantization(model)
    return count


def _forget_transformers_quantization(model: nn.Module) -> None:
    """A model transformers loaded in 4/8 bits refuses `.to()` and saves a quantization_config; after
    dequantize_model it is a plain float model again, so it must say so."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attribute in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attribute, False):
            setattr(model, attribute, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "quantization_method"):
        del model.quantization_method
