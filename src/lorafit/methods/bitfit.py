"""BitFit (Ben Zaken et al. 2021, arXiv:2106.10199): train the bias terms only.

Each selected module gets a per-adapter bias *offset*, initialised to zero and added to its output,
so several BitFit adapters can coexist, be disabled or deleted like any other adapter, and the
original biases stay untouched until a merge folds the offset in (b ← b + δ). Saved files hold the
resulting biases under the modules' own names (`<path>.bias`): applying them is replacing biases.
With `train_head` the output head gets a weight offset the same way (`<head path>.weight` in files).
peft has no BitFit; its files use peft's layout with `peft_type: "BITFIT"`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.core.base_layer import linear_base, linear_types
from lorafit.core.registry import Method
from lorafit.core.selection import Targets, check_selection
from lorafit.core.targeting import bias_types, portable_targets, select_modules
from lorafit.core.wrapper import AdapterWrapper
from lorafit.errors import LorafitError


@dataclass
class BitFitConfig:
    """BitFit (Ben Zaken et al. 2021, arXiv:2106.10199): train only the bias terms.

    target_modules None means every Linear, Conv1D and LayerNorm that has a bias; a list picks a subset
    (the paper's smallest variant: the query and the MLP-intermediate biases, e.g. ["q_proj", "up_proj"]).
    Models without biases (Llama) have nothing to train unless `add_missing_bias` gives the targets
    zero-initialised biases (the model starts unchanged). `train_head` also trains the output head's
    weight, as the paper trains its task head (for a language model that is the vocabulary projection,
    hidden × vocab parameters: far more than the biases).
    """

    target_modules: Targets = None
    exclude_modules: Targets = None
    layers: Union[list, int, None] = None
    layers_pattern: Union[str, list, None] = None
    add_missing_bias: bool = False
    train_head: bool = False

    method = "bitfit"

    def __post_init__(self) -> None:
        check_selection(self)
        for name in ("add_missing_bias", "train_head"):
            if not isinstance(getattr(self, name), bool):
                raise LorafitError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _output_size(module: nn.Module) -> int:
    if isinstance(module, linear_types()):
        return linear_base(module).out_features
    return module.weight.shape[-1]  # LayerNorm


def _has_bias(module: nn.Module) -> bool:
    module = getattr(module, "base_layer", module)
    return getattr(module, "bias", None) is not None


def output_head_path(model: nn.Module) -> str | None:
    """Module path of the model's output head (its vocabulary / task projection), if it is a Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = getattr(head, "base_layer", head)
    for path, module in model.named_modules():
        if getattr(module, "base_layer", module) is head and ".base_layer" not in path and path:
            return path if isinstance(head, nn.Linear) else None
    return None


def select(model: nn.Module, config: BitFitConfig) -> list[str]:
    head_path = output_head_path(model) if config.train_head else None
    if config.train_head and head_path is None:
        raise LorafitError(f"train_head: {type(model).__name__} has no output head that is a Linear layer "
                           "(get_output_embeddings() gives none)")
    if config.target_modules is None:
        with_bias = [p for p, m in model.named_modules()
                     if p and isinstance(getattr(m, "base_layer", m), bias_types()) and _has_bias(m)
                     and ".base_layer" not in p]
        if not with_bias and head_path is not None:
            return [head_path]
        if not with_bias:
            raise LorafitError(
                f"{type(model).__name__} has no bias terms to train (its Linear and norm layers have none); "
                "name target modules and set add_missing_bias=True (CLI: --targets ... --add-missing-bias) "
                "to train zero-initialised biases there"
            )
        config = BitFitConfig(**{**config.to_dict(), "target_modules": with_bias})
    paths = select_modules(model, config, allowed_types=bias_types())
    if head_path is not None and head_path not in paths:
        paths.append(head_path)
    if not config.add_missing_bias:
        missing = [p for p in paths if not _has_bias(model.get_submodule(p)) and p != head_path]
        if missing:
            raise LorafitError(
                f"{missing[0]} has no bias" + (f" (nor do {len(missing) - 1} more targets)" if len(missing) > 1 else "")
                + "; set add_missing_bias=True (CLI: --add-missing-bias) to train zero-initialised biases there"
            )
    return paths


class BitFitWrapper(AdapterWrapper):
    """A frozen Linear / Conv1D / LayerNorm plus named offsets: y = f(x) + b + δ, or (W + Δ)x + b + δ (head)."""

    adapter_parameter_dicts = ("bitfit_bias", "bitfit_weight")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.bitfit_weight = nn.ParameterDict()  # only on the output head, with train_head
        self.out_features = _output_size(base_layer)
        self.bias_created_by_merge = False

    def add_adapter(self, name: str, config: BitFitConfig, module_path: str, dtype: torch.dtype,
                    is_head: bool = False) -> None:
        device = self.base_layer.weight.device
        if not is_head or _has_bias(self) or config.add_missing_bias:
            self.bitfit_bias[name] = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        if is_head:
            self.bitfit_weight[name] = nn.Parameter(torch.zeros(self.base_layer.weight.shape, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.adapters_disabled:
            return self.base_layer(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        weight_offsets = [self.bitfit_weight[n] for n in active if n in self.bitfit_weight]
        if weight_offsets:  # one matmul with W + Δ rather than a second one for Δ
            weight = self.base_layer.weight
            weight = weight + sum(offset.to(weight.dtype) for offset in weight_offsets)
            out = F.linear(x, weight, self.base_layer.bias)
        else:
            out = self.base_layer(x, *args, **kwargs)
        for name in active:
            if name in self.bitfit_bias:
                out = out + self.bitfit_bias[name].to(out.dtype)
        return out

    def _base_bias(self) -> torch.Tensor:
        bias = self.base_layer.bias
        return bias.float() if bias is not None else torch.zeros(self.out_features, device=self.weight.device)

    def merge(self, names: list[str], module_path: str) -> None:
        if self.base_layer.bias is None and any(n not in self.merged_adapters and n in self.bitfit_bias for n in names):
            if not isinstance(self.base_layer, (nn.Linear, nn.LayerNorm)):
                raise LorafitError(f"{module_path} ({type(self.base_layer).__name__}) has no bias to merge into")
            self.base_layer.bias = nn.Parameter(torch.zeros(self.out_features, dtype=self.compute_dtype,
                                                            device=self.weight.device), requires_grad=False)
            self.bias_created_by_merge = True
        super().merge(names, module_path)

    def check_merge(self, names: list[str], module_path: str) -> None:
        for name in names:
            if name not in self.merged_adapters:
                self._check_finite_where_bias_may_be_missing(self._merged_tensors(name), name, module_path)

    def _check_finite_where_bias_may_be_missing(self, tensors: dict[str, torch.Tensor], name: str, module_path: str) -> None:
        for tensor_name, value in tensors.items():
            current = getattr(self.base_layer, tensor_name)
            dtype = current.dtype if current is not None else self.compute_dtype
            if not torch.isfinite(value.to(dtype)).all():
                raise LorafitError(f"merging adapter {name!r} into {module_path}.{tensor_name} would give NaN/Inf; "
                                   "refused, no weight was changed")

    def unmerge(self, module_path: str) -> None:
        super().unmerge(module_path)
        if self.bias_created_by_merge and not self.merged_adapters:
            self.base_layer.bias = None
            self.bias_created_by_merge = False

    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        merged = {}
        if name in self.bitfit_bias:
            merged["bias"] = self._base_bias() + self.bitfit_bias[name].detach().float()
        if name in self.bitfit_weight:
            merged["weight"] = self.base_layer.weight.float() + self.bitfit_weight[name].detach().float()
        return merged

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        unmerged = {}
        if name in self.bitfit_bias:
            unmerged["bias"] = self._base_bias() - self.bitfit_bias[name].detach().float()
        if name in self.bitfit_weight:
            unmerged["weight"] = self.base_layer.weight.float() - self.bitfit_weight[name].detach().float()
        return unmerged

    # Files hold the trained tensors (b + δ, W + Δ); checkpoints keep the offsets (the parameters) too, so
    # that resume is bit-exact.
    def file_suffixes(self, name: str) -> dict[str, str]:
        return {dict_name: dict_name for dict_name in self.adapter_parameter_dicts if name in getattr(self, dict_name)}

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        offsets = {dict_name: getattr(self, dict_name)[name].detach() for dict_name in self.file_suffixes(name)}
        tensors = {}
        if "bitfit_bias" in offsets:
            tensors["bias"] = (self._base_bias() + offsets["bitfit_bias"].float()).to(offsets["bitfit_bias"].dtype)
        if "bitfit_weight" in offsets:
            delta = offsets["bitfit_weight"]
            tensors["weight"] = (self.base_layer.weight.float() + delta.float()).to(delta.dtype)
        return tensors

    @torch.no_grad()
    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        if name in self.bitfit_bias:
            offset = tensors["bias"].float() - self._base_bias()
            self.bitfit_bias[name].copy_(offset.to(self.bitfit_bias[name].dtype))
        if name in self.bitfit_weight:
            offset = tensors["weight"].float() - self.base_layer.weight.float()
            self.bitfit_weight[name].copy_(offset.to(self.bitfit_weight[name].dtype))


def wrap(module: nn.Module) -> AdapterWrapper:
    return BitFitWrapper(module)


def add(wrapper: BitFitWrapper, name: str, config: BitFitConfig, module_path: str, dtype: torch.dtype, model) -> None:
    is_head = config.train_head and module_path == output_head_path(model)
    wrapper.add_adapter(name, config, module_path, dtype, is_head=is_head)


FILE_KEYS = frozenset({"peft_type", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                       "add_missing_bias", "train_head"})


def file_config(model, config: BitFitConfig, paths: list[str], name: str) -> tuple[dict, dict]:
    return {"peft_type": "BITFIT", "lorafit_method": "bitfit", **portable_targets(model, config, paths),
            "add_missing_bias": config.add_missing_bias, "train_head": config.train_head}, {}


def config_from_file(raw: dict, metadata: dict, where) -> BitFitConfig:
    try:
        return BitFitConfig(target_modules=raw["target_modules"], exclude_modules=raw.get("exclude_modules"),
                            layers=raw.get("layers_to_transform"),
                            layers_pattern=raw.get("layers_pattern") if raw.get("layers_to_transform") is not None
                            else None,
                            add_missing_bias=bool(raw.get("add_missing_bias", False)),
                            train_head=bool(raw.get("train_head", False)))
    except LorafitError as err:
        raise LorafitError(f"{where}: {err}") from None


def from_options(options, targets, spelling: str) -> BitFitConfig:
    """The config `--method bitfit` and its flags (methods/options.py: BitFitOptions) describe."""
    return BitFitConfig(target_modules=targets, add_missing_bias=options.add_missing_bias,
                        train_head=options.train_head)


METHOD = Method(
    name="bitfit", config_class=BitFitConfig, peft_type="BITFIT", wrappers=(BitFitWrapper,), select=select,
    wrap=wrap, add=add, file_config=file_config, config_from_file=config_from_file, file_keys=FILE_KEYS,
    required_file_keys=("target_modules",), from_options=from_options,
    gguf_adapter=lambda config: "a BitFit adapter (bias updates)",
)
