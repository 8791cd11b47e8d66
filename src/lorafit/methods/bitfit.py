"""BitFit (Ben Zaken et al. 2021, arXiv:2106.10199): train the bias terms only.

Each selected module gets a per-adapter bias *offset*, initialised to zero and added to its output,
so several BitFit adapters can coexist, be disabled or deleted like any other adapter, and the
original biases stay untouched until a merge folds the offset in (b ← b + δ). Saved files hold the
resulting biases under the modules' own names (`<path>.bias`): applying them is replacing biases.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.config import BitFitConfig
from lorafit.errors import LorafitError
from lorafit.methods.base import AdapterWrapper
from lorafit.targeting import linear_types, select_modules


def bias_types() -> tuple[type, ...]:
    """Modules whose output is f(x) + b with b along the last dimension."""
    return linear_types() + (nn.LayerNorm,)


def _output_size(module: nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    return module.weight.shape[-1]  # LayerNorm


def _has_bias(module: nn.Module) -> bool:
    module = getattr(module, "base_layer", module)
    return getattr(module, "bias", None) is not None


def select(model: nn.Module, config: BitFitConfig) -> list[str]:
    if config.target_modules is None:
        with_bias = [p for p, m in model.named_modules()
                     if p and isinstance(getattr(m, "base_layer", m), bias_types()) and _has_bias(m)
                     and ".base_layer" not in p]
        if not with_bias:
            raise LorafitError(
                f"{type(model).__name__} has no bias terms to train (its Linear and norm layers have none); "
                "name target modules and set add_missing_bias=True (CLI: --targets ... --add-missing-bias) "
                "to train zero-initialised biases there"
            )
        config = BitFitConfig(**{**config.to_dict(), "target_modules": with_bias})
    paths = select_modules(model, config, allowed_types=bias_types())
    if not config.add_missing_bias:
        missing = [p for p in paths if not _has_bias(model.get_submodule(p))]
        if missing:
            raise LorafitError(
                f"{missing[0]} has no bias" + (f" (nor do {len(missing) - 1} more targets)" if len(missing) > 1 else "")
                + "; set add_missing_bias=True (CLI: --add-missing-bias) to train zero-initialised biases there"
            )
    return paths


class BitFitWrapper(AdapterWrapper):
    """A frozen Linear / Conv1D / LayerNorm plus named bias offsets δ: y = f(x) + b + δ."""

    adapter_parameter_dicts = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.out_features = _output_size(base_layer)
        self.bias_created_by_merge = False

    def add_adapter(self, name: str, config: BitFitConfig, module_path: str, dtype: torch.dtype) -> None:
        device = self.base_layer.weight.device
        self.bitfit_bias[name] = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.adapters_disabled:
            return out
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                out = out + self.bitfit_bias[name].to(out.dtype)
        return out

    def _base_bias(self) -> torch.Tensor:
        bias = self.base_layer.bias
        return bias.float() if bias is not None else torch.zeros(self.out_features, device=self.weight.device)

    def merge(self, names: list[str], module_path: str) -> None:
        if self.base_layer.bias is None and any(n not in self.merged_adapters for n in names):
            if not isinstance(self.base_layer, (nn.Linear, nn.LayerNorm)):
                raise LorafitError(f"{module_path} ({type(self.base_layer).__name__}) has no bias to merge into")
            self.base_layer.bias = nn.Parameter(torch.zeros_like(self.bitfit_bias[names[0]], dtype=self.weight.dtype),
                                                requires_grad=False)
            self.bias_created_by_merge = True
        super().merge(names, module_path)

    def check_merge(self, names: list[str], module_path: str) -> None:
        for name in names:
            if name not in self.merged_adapters:
                self._cast_and_check_bias(self._base_bias() + self.bitfit_bias[name].detach().float(), name, module_path)

    def _cast_and_check_bias(self, value: torch.Tensor, name: str, module_path: str) -> None:
        dtype = self.base_layer.bias.dtype if self.base_layer.bias is not None else self.weight.dtype
        if not torch.isfinite(value.to(dtype)).all():
            raise LorafitError(f"merging adapter {name!r} into {module_path}.bias would give NaN/Inf; "
                               "refused, no weight was changed")

    def unmerge(self, module_path: str) -> None:
        super().unmerge(module_path)
        if self.bias_created_by_merge and not self.merged_adapters:
            self.base_layer.bias = None
            self.bias_created_by_merge = False

    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"bias": self._base_bias() + self.bitfit_bias[name].detach().float()}

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"bias": self._base_bias() - self.bitfit_bias[name].detach().float()}

    # Files hold the trained biases (b + δ); checkpoints hold δ itself so that resume is bit-exact.
    def file_suffixes(self, name: str) -> dict[str, str]:
        return {"bitfit_bias": "bitfit_bias"}

    def file_tensors(self, name: str, for_resume: bool = False) -> dict[str, torch.Tensor]:
        offset = self.bitfit_bias[name].detach()
        if for_resume:
            return {"bitfit_bias": offset}
        return {"bias": (self._base_bias() + offset.float()).to(offset.dtype)}

    @torch.no_grad()
    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str, for_resume: bool = False) -> None:
        offset = tensors["bitfit_bias"] if for_resume else tensors["bias"].float() - self._base_bias()
        self.bitfit_bias[name].copy_(offset.to(self.bitfit_bias[name].dtype))


WRAPPERS = (BitFitWrapper,)


def wrap(module: nn.Module) -> AdapterWrapper:
    return BitFitWrapper(module)


def add(wrapper: BitFitWrapper, name: str, config: BitFitConfig, module_path: str, dtype: torch.dtype, model) -> None:
    wrapper.add_adapter(name, config, module_path, dtype)
