"""IA3 (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale activations, initialised to ones.

For keys and values the output of k_proj / v_proj is rescaled: l ⊙ (W x + b), which merges as
W ← diag(l) W, b ← l ⊙ b. For the feed-forward the activation entering down_proj is rescaled:
W (l ⊙ h), which merges as W ← W diag(l). The vectors have peft's shapes and names (`ia3_l`,
(out, 1) or (1, in)), so files move between lorafit and peft unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Union

import torch
from torch import nn

from lorafit.core.base_layer import linear_types
from lorafit.core.registry import Method
from lorafit.core.selection import Targets, check_module_list, check_selection, parse_targets
from lorafit.core.targeting import (
    DOWN_PROJECTION_NAMES,
    KEY_VALUE_NAMES,
    attention_targets,
    linear_paths,
    matches_selection,
    name_matches,
    portable_targets,
    select_modules,
    short_names,
)
from lorafit.core.wrapper import AdapterWrapper, LinearAdapterWrapper
from lorafit.errors import LorafitError


@dataclass
class IA3Config:
    """IA3 (Liu et al. 2022, arXiv:2205.05638): learned vectors, initialised to ones, rescale activations.

    A target's output is rescaled (l ⊙ W x: keys and values) unless it is also listed in
    `feedforward_modules`, where its input is rescaled instead (W (l ⊙ h): the feed-forward activation
    feeding the down projection). None picks the paper's choice for the architecture (Llama: k_proj,
    v_proj, down_proj with down_proj feed-forward). Selection rules are LoraConfig's.
    """

    target_modules: Targets = None
    feedforward_modules: Targets = None
    exclude_modules: Targets = None
    layers: Union[list, int, None] = None
    layers_pattern: Union[str, list, None] = None

    method = "ia3"

    def __post_init__(self) -> None:
        check_selection(self)
        self.feedforward_modules = check_module_list("feedforward_modules", self.feedforward_modules,
                                                      allow_all_linear=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve(model: nn.Module, config: IA3Config) -> IA3Config:
    """The config with the paper's default targets filled in where the user gave none: attention's key and value
    projections (or the fused projection holding them) and the feed-forward block's down projection, found by the
    names families give them (lorafit.core.targeting)."""
    if config.target_modules is not None:
        return config
    attention = attention_targets(model, KEY_VALUE_NAMES)
    paths = linear_paths(model)
    down = next((name for name in DOWN_PROJECTION_NAMES if any(name_matches(name, p) for p in paths)), None)
    if attention is None or down is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise LorafitError(f"no default IA3 targets for model type {model_type!r}: no linear layers named like "
                           f"{'key/value projections' if attention is None else 'a feed-forward down projection'}; "
                           "set target_modules and feedforward_modules")
    return IA3Config(**{**config.to_dict(), "target_modules": attention + [down],
                        "feedforward_modules": config.feedforward_modules or [down]})


def select(model: nn.Module, config: IA3Config) -> list[str]:
    config = resolve(model, config)
    paths = select_modules(model, config, allowed_types=linear_types())
    if config.feedforward_modules is not None:
        feedforward = [p for p in paths if matches_selection(config.feedforward_modules, p)]
        if not feedforward:
            raise LorafitError(f"feedforward_modules {config.feedforward_modules} matches none of the IA3 targets "
                               f"(e.g. {', '.join(paths[:3])}); feed-forward modules must be targets too")
    return paths


class IA3Linear(LinearAdapterWrapper):
    """A frozen Linear / Conv1D whose output (or, feed-forward, input) is rescaled by learned vectors."""

    adapter_parameter_dicts = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, config: IA3Config, module_path: str, dtype: torch.dtype) -> None:
        feedforward = matches_selection(config.feedforward_modules, module_path)
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, dtype=dtype, device=self.base.device))
        self.feedforward[name] = feedforward

    def _forget(self, name: str) -> None:
        self.feedforward.pop(name, None)

    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input scale, output scale): the products of the active, unmerged adapters' vectors."""
        input_scale = output_scale = None
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            vector = self.ia3_l[name].flatten()
            if self.feedforward[name]:
                input_scale = vector if input_scale is None else input_scale * vector
            else:
                output_scale = vector if output_scale is None else output_scale * vector
        return input_scale, output_scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.adapters_disabled:
            return self.base_layer(x, *args, **kwargs)
        input_scale, output_scale = self._scales()
        if input_scale is not None:
            x = (x.to(input_scale.dtype) * input_scale).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        if output_scale is not None:
            out = out * output_scale.to(out.dtype)
        return out

    def _scaled(self, name: str, inverse: bool) -> dict[str, torch.Tensor]:
        """The base tensors with adapter `name` folded in (or out): W's rows or columns, and b, scaled."""
        vector = self.ia3_l[name].detach().float().flatten()
        if inverse:
            vector = 1.0 / vector
        weight = self.base.dense_weight().float()  # (out, in)
        if self.feedforward[name]:
            return {"weight": weight * vector[None, :]}
        merged = {"weight": weight * vector[:, None]}
        if self.base_layer.bias is not None:
            merged["bias"] = self.base_layer.bias.float() * vector
        return merged

    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self._scaled(name, inverse=False)

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self._scaled(name, inverse=True)  # a zero in l makes this Inf: refused, weights kept

    def file_suffixes(self, name: str) -> dict[str, str]:
        return {"ia3_l": "ia3_l"}


def wrap(module: nn.Module) -> AdapterWrapper:
    return IA3Linear(module)


def add(wrapper: IA3Linear, name: str, config: IA3Config, module_path: str, dtype: torch.dtype, model) -> None:
    wrapper.add_adapter(name, resolve(model, config), module_path, dtype)


# -- peft's file format ---------------------------------------------------------------------------------------
def file_config(model, config: IA3Config, paths: list[str], name: str) -> tuple[dict, dict]:
    """peft's IA3 keys. peft wants feedforward_modules a subset of target_modules, string for string."""
    targets = portable_targets(model, config, paths, with_layers=False)
    feedforward_paths = [p for p in paths if model.get_submodule(p).feedforward[name]]
    feedforward = short_names(feedforward_paths)
    reselects = [p for p in paths if matches_selection(feedforward, p)] == feedforward_paths
    if not reselects or not set(feedforward) <= set(targets["target_modules"]):
        targets = {"target_modules": list(paths), "exclude_modules": None}
        feedforward = feedforward_paths
    return {"peft_type": "IA3", **targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": any(model.get_submodule(p).fan_in_fan_out for p in paths),
            "init_ia3_weights": True, "modules_to_save": None}, {}


def config_from_file(raw: dict, metadata: dict, where) -> IA3Config:
    try:
        return IA3Config(target_modules=raw["target_modules"], exclude_modules=raw.get("exclude_modules"),
                         layers=raw.get("layers_to_transform"),
                         layers_pattern=raw.get("layers_pattern") if raw.get("layers_to_transform") is not None else None,
                         feedforward_modules=raw.get("feedforward_modules"))
    except LorafitError as err:
        raise LorafitError(f"{where}: {err}") from None


def from_options(options, targets, spelling: str) -> IA3Config:
    """The config `--method ia3` and its flags (methods/options.py: IA3Options) describe."""
    return IA3Config(target_modules=targets, feedforward_modules=parse_targets(options.feedforward_targets))


METHOD = Method(
    name="ia3", config_class=IA3Config, peft_type="IA3", wrappers=(IA3Linear,), select=select, wrap=wrap, add=add,
    file_config=file_config, config_from_file=config_from_file,
    file_keys=frozenset({"peft_type", "target_modules", "feedforward_modules", "exclude_modules"}),
    required_file_keys=("target_modules",), from_options=from_options,
    gguf_adapter=lambda config: "a IA3 adapter (scaling vectors)",
)
