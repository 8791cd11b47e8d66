"""Attach, activate, disable, delete, merge and unmerge adapters on any PyTorch model.

The model is changed in place: each selected module is replaced by a wrapper that keeps the original
module as `base_layer`. What lorafit needs to remember about the model (the config of every named
adapter and which ones are active) lives in one attribute, `model.lorafit_state`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafit.core.module_tree import replace_module
from lorafit.core.registry import method_of
from lorafit.core.wrapper import AdapterWrapper, LinearAdapterWrapper
from lorafit.errors import LorafitError

DEFAULT_ADAPTER = "default"


@dataclass
class AdapterState:
    """lorafit's memory of a model: adapter name -> config and module paths, and the active names."""

    configs: dict = field(default_factory=dict)
    module_paths: dict = field(default_factory=dict)
    active: list = field(default_factory=list)

    def config(self, name: str):
        """Adapter `name`'s config; the one error every function gives for a name the model does not have."""
        if name not in self.configs:
            raise LorafitError(f"no adapter named {name!r}; the model has {', '.join(self.configs) or 'none'}")
        return self.configs[name]


def original_module(model: nn.Module) -> nn.Module:
    """The model itself, or the module a `torch.compile` wrapper holds: adapters, their state and the paths saved
    in files belong to the original module, so a compiled model saves the keys its uncompiled twin would."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def state_of(model: nn.Module) -> AdapterState:
    model = original_module(model)
    state = getattr(model, "lorafit_state", None)
    if not isinstance(state, AdapterState):
        raise LorafitError(f"{type(model).__name__} has no lorafit adapters; call lorafit.attach(model, config) first")
    return state


def wrappers(model: nn.Module) -> Iterator[tuple[str, AdapterWrapper]]:
    """(path, wrapper) for every adapted module, in model order (paths of the original module, see
    original_module)."""
    for path, module in original_module(model).named_modules():
        if isinstance(module, AdapterWrapper):
            yield path, module


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or not name.isprintable():
        raise LorafitError(f"adapter name must be a non-empty string without dots, got {name!r}")


def _adapter_dtype(base_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """Adapters train in float32 on half-precision (and quantized) bases: tiny updates vanish in bf16's
    8-bit mantissa. `base_dtype` is what the base layer computes in."""
    if requested is not None:
        return requested
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def attach(
    model: nn.Module,
    config,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Add adapter `adapter_name` (the method is the config's: LoraConfig, IA3Config, ...) to `model` in place.

    The new adapter becomes the active, trainable one; everything that is not an adapter parameter is
    frozen the first time. Returns `model` itself. On any error the model is left as it was. Refused
    while adapters are merged, since they would keep running beside the new one (see set_active_adapter).
    A `torch.compile`d model gets its adapters in the module it compiled (see original_module).
    """
    method = method_of(config)
    _check_adapter_name(adapter_name)
    inner = original_module(model)
    state = getattr(inner, "lorafit_state", None)
    if isinstance(state, AdapterState) and adapter_name in state.configs:
        raise LorafitError(f"the model already has an adapter named {adapter_name!r}; pick another name or delete it")
    if isinstance(state, AdapterState):
        _check_merged_stay_active(inner, [adapter_name])

    paths = method.select(inner, config)
    with undone_on_error(inner, adapter_name):
        for path in paths:
            module = inner.get_submodule(path)
            if not isinstance(module, AdapterWrapper):
                module = method.wrap(module)
                replace_module(inner, path, module)
            elif not isinstance(module, method.wrappers):
                raise LorafitError(f"{path} already carries a {type(module).__name__} adapter; one method per module")
            method.add(module, adapter_name, config, path, _adapter_dtype(module.compute_dtype, dtype), inner)
            module.train(module.base_layer.training)  # new dropout modules follow the model's train/eval mode
        if not isinstance(state, AdapterState):
            for parameter in inner.parameters():
                parameter.requires_grad_(False)
            inner.lorafit_state = AdapterState()
        inner.lorafit_state.configs[adapter_name] = config
        inner.lorafit_state.module_paths[adapter_name] = paths
        set_active_adapter(inner, adapter_name)
    return model


@contextmanager
def undone_on_error(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Run the block; if it raises, put the model back as it was before it, and re-raise.

    Adapter `adapter_name` leaves every module (a module it wrapped gets its original layer back, a base weight
    it changed its old value), and the active adapters and which parameters train are restored. attach runs
    inside it, and so does load_adapter around attach and the copying of the file's tensors: a refused target
    or a file that does not fit leaves the model exactly as it was.
    """
    model = original_module(model)
    state = getattr(model, "lorafit_state", None)
    if isinstance(state, AdapterState) and adapter_name in state.configs:
        yield  # an adapter of that name is already there (attach refuses the block): it is not the block's to undo
        return
    active = list(state.active) if isinstance(state, AdapterState) else None
    wrapped_before = {path for path, _ in wrappers(model)}
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    except BaseException:
        for path, wrapper in list(wrappers(model)):
            wrapper.delete(adapter_name, path)
            if path not in wrapped_before:
                replace_module(model, path, wrapper.base_layer)
        now = getattr(model, "lorafit_state", None)
        if isinstance(now, AdapterState):
            now.configs.pop(adapter_name, None)
            now.module_paths.pop(adapter_name, None)
            if active is None:
                del model.lorafit_state
            else:
                set_active_adapter(model, active)
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        raise


def adapter_names(model: nn.Module) -> list[str]:
    return list(state_of(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    return list(state_of(model).active)


def set_active_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the adapters that run (their outputs add up); only they are trainable.

    Adapters merged into the weights run whatever is active, so `names` must include every one of them
    (unmerge(model) first to switch away from a merged adapter).
    """
    state = state_of(model)
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        state.config(name)
    _check_merged_stay_active(model, names)
    state.active = names
    for _, wrapper in wrappers(model):
        wrapper.set_active(names)
        for dict_name in wrapper.adapter_parameter_dicts:
            for name, parameter in getattr(wrapper, dict_name).items():
                parameter.requires_grad_(name in names)


def _check_merged_stay_active(model: nn.Module, names: list[str]) -> None:
    """Refuse an active set that leaves out a merged adapter: its update is in the weights and would still
    run, so switching from merged "a" to "b" would silently compute W + a + b.
    """
    for path, wrapper in wrappers(model):
        for merged in wrapper.merged_adapters:
            if merged not in names:
                raise LorafitError(
                    f"adapter {merged!r} is merged into the weights of {path} and would keep running with "
                    f"{', '.join(map(repr, names)) or 'no adapter'} active; unmerge(model) first"
                )


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. a reference model for DPO, or a before/after)."""
    state_of(model)
    found = list(wrappers(model))
    merged = [path for path, w in found if w.merged_adapters]
    if merged:
        raise LorafitError(f"adapters are merged into the weights (e.g. {merged[0]}); unmerge before disabling them")
    previous = [w.adapters_disabled for _, w in found]
    for _, wrapper in found:
        wrapper.adapters_disabled = True
    try:
        yield model
    finally:
        for (_, wrapper), was in zip(found, previous):
            wrapper.adapters_disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; modules left without any adapter get their original layer back.

    A base weight the adapter's file replaced (see load_adapter) gets its original value back.
    """
    state = state_of(model)
    state.config(name)
    model = original_module(model)
    found = [(path, wrapper) for path, wrapper in wrappers(model) if name in wrapper.adapter_names]
    for path, wrapper in found:  # every module first: a refusal must not leave the adapter half deleted
        wrapper.check_delete(name, path)
    for path, wrapper in found:
        wrapper.delete(name, path)
        if not wrapper.adapter_names:
            replace_module(model, path, wrapper.base_layer)
    del state.configs[name]
    del state.module_paths[name]
    state.active = [n for n in state.active if n != name]
    if not state.configs:
        del model.lorafit_state


def _tied_elsewhere(model: nn.Module, wrapper_path: str, weight: torch.Tensor) -> str | None:
    for path, module in model.named_modules(remove_duplicate=False):
        if path.startswith(wrapper_path + "."):
            continue
        for param_name, parameter in module.named_parameters(recurse=False):
            if parameter is weight:
                return f"{path}.{param_name}" if path else param_name
    return None


def merge(model: nn.Module, adapter_names: list[str] | None = None, *, requantize: bool = False) -> None:
    """W <- W + s·B·A for the given (default: active) adapters; inference then costs what the base costs.

    Only active adapters can be merged: a merged adapter runs whatever is active, so merging an inactive
    one would change the outputs it is not supposed to take part in. Active adapters left out keep
    running unmerged. All modules are checked first: if any merged weight would be NaN/Inf nothing at
    all is changed.

    On a 4/8-bit base the merged weight would have to be quantized again, and the rounding to 16 levels
    per block swallows most of a small update (peft#2321): refused unless `requantize=True`. Merge into
    float instead: lorafit.models.quantize.dequantize_model first (the weights the adapter was trained against),
    or load the adapter onto the original float model.
    """
    state = state_of(model)
    names = list(state.active) if adapter_names is None else list(adapter_names)
    for name in names:
        method = method_of(state.config(name))
        if not method.merges:
            raise LorafitError(f"adapter {name!r} is a {method.name} adapter, whose update does not fold into the "
                               "weights; keep it unmerged")
        if name not in state.active:
            raise LorafitError(f"adapter {name!r} is not active, so merging it would add it to the outputs; "
                               f"activate it first (set_active_adapter), the active ones are "
                               f"{', '.join(state.active) or 'none'}")
    found = [(p, w) for p, w in wrappers(model) if any(n in w.adapter_names for n in names)]
    quantized = [p for p, w in found if isinstance(w, LinearAdapterWrapper) and w.base.quantized]
    if quantized and not requantize:
        raise LorafitError(
            f"{quantized[0]} (+{len(quantized) - 1} more) is quantized: merging into it re-quantizes W + ΔW, which "
            "loses small updates (peft#2321); dequantize the model first (lorafit.models.quantize.dequantize_model), or "
            "pass requantize=True to accept the loss")
    model = original_module(model)
    for path, wrapper in found:
        tied = _tied_elsewhere(model, path, wrapper.base_layer.weight)
        if tied:
            raise LorafitError(
                f"{path}.weight is shared with {tied} (tied embeddings): merging would change both; "
                "keep this adapter unmerged or untie the weights first"
            )
    for path, wrapper in found:
        wrapper.check_merge([n for n in names if n in wrapper.adapter_names], path)
    for path, wrapper in found:
        wrapper.merge([n for n in names if n in wrapper.adapter_names], path)


def unmerge(model: nn.Module) -> None:
    """Undo every merge: W <- W - s·B·A (exact up to floating-point rounding)."""
    state_of(model)
    for path, wrapper in wrappers(model):
        wrapper.unmerge(path)


def merge_and_unload(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Merge the active adapters and return the plain model: no wrapper left, same size and speed as the base."""
    merge(model, requantize=requantize)
    return _unwrap_all(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the original model, as it was before `attach`."""
    unmerge(model)
    for _, wrapper in wrappers(model):
        wrapper.restore_base()  # PiSSA's residual, or a base weight load_adapter took from the file
    return _unwrap_all(model)


def _unwrap_all(model: nn.Module) -> nn.Module:
    inner = original_module(model)
    for path, wrapper in list(wrappers(inner)):
        replace_module(inner, path, wrapper.base_layer)
    if hasattr(inner, "lorafit_state"):
        del inner.lorafit_state
    return model

