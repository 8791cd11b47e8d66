"""Adapters on disk in peft's format, both directions, so they move freely to peft, vLLM and back.

A folder holds `adapter_config.json` (only keys peft knows) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.<tensor suffix>`. What the suffixes and config keys are is each
method's (`Method.file_config` / `config_from_file`, and its wrappers' `file_suffixes`); this module
does the rest for every method: atomic writes, strict reading, checking every key and shape before
anything is copied. Loading never unpickles anything unless the caller passes `allow_pickle=True`,
and every mismatch is an error that names the key.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorafit.core.adapters import attach, original_module, state_of, undone_on_error
from lorafit.errors import LorafitError
from lorafit.files import atomic_path, write_json
from lorafit.methods import method_for_peft_type, method_of, methods
from lorafit.models.identity import METADATA_KEY
from lorafit.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# adapter_config.json keys peft writes that say nothing about the weights lorafit loads.
_IGNORED_KEYS = {
    "peft_version", "revision", "auto_mapping", "base_model_name_or_path", "task_type", "inference_mode",
    "init_lora_weights", "init_ia3_weights", "megatron_core", "qalora_group_size", "fan_in_fan_out",
    "ensure_weight_tying", "lorafit_method",
}
# Keys for peft features lorafit does not implement: refused when set, since ignoring them would
# silently compute something other than what the adapter was trained as.
_UNSUPPORTED_WHEN_SET = {
    "lora_bias", "modules_to_save", "layer_replication", "target_parameters",
    "trainable_token_indices", "megatron_config", "loftq_config", "eva_config", "corda_config",
    "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
    "lora_ga_config", "monteclora_config", "velora_config",
}


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    return None


def _single_adapter(model: nn.Module, adapter_name: str | None) -> str:
    state = state_of(model)
    if adapter_name is not None:
        state.config(adapter_name)
        return adapter_name
    if len(state.active) != 1:
        raise LorafitError(f"{len(state.active)} adapters are active; name the one to save (adapter_name=...)")
    return state.active[0]


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    adapter_name: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
    base_model: dict | None = None,
) -> Path:
    """Write one adapter (default: the active one) as a peft-format folder; returns the folder.

    Each file is written atomically. Sliced LoRA adapters are stored as the equivalent full LoRA of
    rank G·r and PiSSA adapters as the rank-2r LoRA that applies to the untouched base model, so peft
    and vLLM load them. `base_model` (lorafit.models.identity.base_identity of the bare base) is recorded in
    the safetensors metadata, so `lorafit eval/merge/generate` use that base and refuse another.
    """
    name = _single_adapter(model, adapter_name)
    state, model = state_of(model), original_module(model)
    config, paths = state.configs[name], state.module_paths[name]
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        for suffix, tensor in model.get_submodule(path).file_tensors(name).items():
            tensors[f"{KEY_PREFIX}{path}.{suffix}"] = tensor.detach().to("cpu").contiguous().clone()

    method_config, method_metadata = method_of(config).file_config(model, config, paths, name)
    metadata = {"format": "pt", "lorafit_version": __version__, **method_metadata}
    if base_model is not None:
        metadata[METADATA_KEY] = json.dumps(base_model)
    nonfinite = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if nonfinite:
        raise LorafitError(f"refusing to save adapter {name!r}: {nonfinite[0]} holds NaN/Inf"
                           + (f" (+{len(nonfinite) - 1} more tensors)" if len(nonfinite) > 1 else ""))
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    adapter_config = {"task_type": _task_type(model), "base_model_name_or_path": base_model_name_or_path,
                      **method_config, "inference_mode": True, "revision": None}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_NAME) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    write_json(folder / CONFIG_NAME, adapter_config)
    return folder


# -- loading ------------------------------------------------------------------------------------------
def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json, checked against what lorafit can load; one clear error per problem."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise LorafitError(f"{folder} has no {CONFIG_NAME}; is it an adapter folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LorafitError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise LorafitError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise LorafitError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as err:  # valid JSON Python still refuses, e.g. an integer of over 4300 digits
        raise LorafitError(f"{path}: unreadable JSON value ({str(err).split(':')[0]})") from None
    if not isinstance(raw, dict):
        raise LorafitError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    method = method_for_peft_type(peft_type)
    if method is None:
        supported = ", ".join(m.peft_type for m in methods())
        raise LorafitError(f"{path}: peft_type {peft_type!r} is not supported (lorafit loads {supported})")
    for key in method.required_file_keys:
        if key not in raw:
            raise LorafitError(f"{path}: required key {key!r} is missing")
    other_methods_keys = {key for m in methods() if m is not method for key in m.file_keys}
    for key, value in raw.items():
        if key in method.file_keys or key in _IGNORED_KEYS:
            continue
        if key in _UNSUPPORTED_WHEN_SET or key in other_methods_keys:
            if value not in (None, False, {}, [], ""):
                raise LorafitError(f"{path}: {key} = {json.dumps(value)} is a peft feature lorafit does not support"
                                   f" for {peft_type} adapters")
        elif value not in (None, False, {}, [], ""):
            warnings.warn(f"{path}: unknown key {key!r} ignored", stacklevel=3)
    return raw


def _read_weights(folder: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / PICKLE_WEIGHTS_NAME).is_file():
            if not allow_pickle:
                raise LorafitError(
                    f"{folder / PICKLE_WEIGHTS_NAME} is a pickle file, which can run code when loaded; refused. "
                    "Convert it to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust it"
                )
            return torch.load(folder / PICKLE_WEIGHTS_NAME, map_location="cpu", weights_only=True), {}
        raise LorafitError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LorafitError(f"{path} is not a readable safetensors file (truncated or corrupted?): {err}") from None
    return tensors, metadata


def read_adapter(folder: str | Path, *, allow_pickle: bool = False) -> tuple[dict, object, dict[str, torch.Tensor]]:
    """(adapter_config.json as read, the method's config it describes, the weights by file key), all checked.

    For code that uses an adapter's tensors without a model (GGUF export); `load_adapter` starts here too.
    """
    folder = Path(folder)
    if not folder.exists():
        raise LorafitError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise LorafitError(f"{folder} is a file; give the adapter folder (with {CONFIG_NAME})")
    raw = read_adapter_config(folder)
    tensors, metadata = _read_weights(folder, allow_pickle)
    config = method_for_peft_type(raw["peft_type"]).config_from_file(raw, metadata, folder / CONFIG_NAME)
    if not tensors:
        raise LorafitError(f"{folder / WEIGHTS_NAME} holds no tensors")
    for key in tensors:
        if not key.startswith(KEY_PREFIX):
            raise LorafitError(f"{folder / WEIGHTS_NAME}: key {key!r} does not start with {KEY_PREFIX!r} (not a peft file)")
    return raw, config, tensors


def load_adapter(
    model: nn.Module,
    folder: str | Path,
    adapter_name: str = "default",
    *,
    trainable: bool = False,
    allow_pickle: bool = False,
) -> nn.Module:
    """Attach the adapter saved in `folder` (by lorafit or peft) to `model`, in place; returns `model`.

    Strict: every tensor the model's adapter needs must be in the file with the right shape, and every
    tensor in the file must belong to it; otherwise the error names the key and the model is unchanged
    (weights and which parameters require grad). A base embedding weight stored beside the adapter
    (peft does so for trained embeddings) replaces the model's; unloading or deleting the adapter gives
    the original back.
    """
    folder = Path(folder)
    _, config, tensors = read_adapter(folder, allow_pickle=allow_pickle)
    inner = original_module(model)
    # attach changes more than the new adapter (it activates it alone, freezes or unfreezes parameters): all of
    # it is undone if the file does not fit
    with undone_on_error(inner, adapter_name):
        attach(inner, config, adapter_name)
        _copy_weights(inner, adapter_name, tensors, folder / WEIGHTS_NAME)
    for path in state_of(inner).module_paths[adapter_name]:
        for tensor in inner.get_submodule(path).adapter_tensors(adapter_name).values():
            tensor.requires_grad_(trainable)
    return model


@dataclass
class _ModuleTensors:
    """What a file holds for one adapted module, checked against it and not yet copied."""

    path: str
    wrapper: nn.Module
    adapter: dict[str, torch.Tensor]
    base_weight: torch.Tensor | None = None


def _copy_weights(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Check every key and shape of the file first and only then copy, so a file that does not fit
    changes nothing. Base weights are written last: the adapter's own tensors (the slice layout of a
    fused layer is checked while they are copied) belong to an adapter a failed load deletes again.
    """
    matched = _match_file_tensors(model, name, tensors, where)
    for module in matched:
        module.wrapper.load_file_tensors(name, module.adapter, f"{where}: {module.path}")
    for module in matched:
        if module.base_weight is not None:
            module.wrapper.replace_base_weight(name, module.base_weight)


def _match_file_tensors(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], where: Path
) -> list[_ModuleTensors]:
    """The file's tensors grouped by adapted module; raises on any missing, misshapen or unexpected key."""
    remaining = dict(tensors)
    matched = []
    for path in state_of(model).module_paths[name]:
        wrapper = model.get_submodule(path)
        found = {}
        for suffix, want in wrapper.expected_file_shapes(name).items():
            key = f"{KEY_PREFIX}{path}.{suffix}"
            if key not in remaining:
                raise LorafitError(f"{where}: missing key {key!r} (the adapter does not cover module {path})")
            tensor = remaining.pop(key)
            if tuple(tensor.shape) != want:
                raise LorafitError(
                    f"{where}: {key} has shape {tuple(tensor.shape)} but module {path} needs {want}; "
                    "was this adapter made for another base model?"
                )
            found[suffix] = tensor
        matched.append(_ModuleTensors(path, wrapper, found, _base_weight(wrapper, path, name, remaining, where)))
    if remaining:
        key = sorted(remaining)[0]
        raise LorafitError(
            f"{where}: unexpected key {key!r}"
            + (f" (+{len(remaining) - 1} more)" if len(remaining) > 1 else "")
            + ": the model has no adapted module for it; was this adapter made for another base model?"
        )
    return matched


def _base_weight(wrapper: nn.Module, path: str, name: str, remaining: dict, where: Path) -> torch.Tensor | None:
    """peft stores a targeted embedding's (possibly trained) base weight beside the adapter: take it out of
    `remaining` and check it fits. One adapter per embedding may bring one, since the module has one weight.
    """
    key = f"{KEY_PREFIX}{path}.base_layer.weight"
    if not wrapper.takes_base_weight_from_file or key not in remaining:
        return None
    weight = remaining.pop(key)
    if tuple(weight.shape) != tuple(wrapper.base_layer.weight.shape):
        raise LorafitError(f"{where}: {key} has shape {tuple(weight.shape)}, the model's is "
                           f"{tuple(wrapper.base_layer.weight.shape)}")
    owner = wrapper.base_weight_owner
    if owner not in (None, name):
        raise LorafitError(f"{where}: {key} would replace the base weight of {path}, which adapter {owner!r} "
                           "already replaced from its file; delete that adapter first")
    return weight
