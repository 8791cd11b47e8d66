"""Adapters on disk in peft's format, both directions, so they move freely to peft, vLLM and back.

A folder holds `adapter_config.json` (only keys peft knows) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.<tensor>`: LoRA's `lora_A.weight` (r×in) / `lora_B.weight` (out×r),
embeddings' `lora_embedding_A` / `lora_embedding_B`, DoRA's `lora_magnitude_vector`, IA3's `ia3_l`.
BitFit, which peft lacks, uses the same layout with `peft_type: "BITFIT"` and the biases as `<path>.bias`.
Loading never unpickles anything unless the caller passes `allow_pickle=True`, and every mismatch is
an error that names the key.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorafit import __version__
from lorafit.adapters import AdapterState, attach, delete_adapter, set_active_adapter, state_of
from lorafit.config import BitFitConfig, FusedSlices, IA3Config, LoraConfig
from lorafit.errors import LorafitError
from lorafit.files import atomic_path, write_json
from lorafit.methods.lora import LoraEmbedding
from lorafit.targeting import matches_selection, select_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "BITFIT": "bitfit"}

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
_KNOWN_KEYS = {
    "lora": {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
             "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "bias",
             "use_dora"},
    "ia3": {"peft_type", "target_modules", "feedforward_modules", "exclude_modules"},
    "bitfit": {"peft_type", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "add_missing_bias", "train_head"},
}
_REQUIRED_KEYS = {"lora": ("r", "lora_alpha", "target_modules"), "ia3": ("target_modules",), "bitfit": ("target_modules",)}


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


def _short_names(paths: list[str]) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def _exported_targets(model: nn.Module, config, paths: list[str], with_layers: bool = True) -> dict:
    """target_modules (+ layers) for the file: short names when they reselect exactly `paths`, else full paths.

    Reselection uses the same rules as peft, so the file selects the same modules in peft and lorafit.
    `with_layers=False` is for peft configs without layers_to_transform (IA3): full paths then.
    """
    from lorafit.methods.bitfit import bias_types

    if not with_layers:
        if config.layers is not None:
            return {"target_modules": list(paths), "exclude_modules": None}
        exported = _exported_targets(model, config, paths)
        return {"target_modules": exported["target_modules"], "exclude_modules": exported["exclude_modules"]}
    short = _short_names(paths)
    candidate = {"target_modules": short, "exclude_modules": config.exclude_modules,
                 "layers_to_transform": config.layers, "layers_pattern": config.layers_pattern}
    try:
        check = LoraConfig(target_modules=short, exclude_modules=config.exclude_modules, layers=config.layers,
                           layers_pattern=config.layers_pattern)
        if select_modules(model, check, allowed_types=bias_types() + (nn.Embedding,)) == paths:
            return candidate
    except LorafitError:
        pass
    return {"target_modules": list(paths), "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}


def _single_adapter(model: nn.Module, adapter_name: str | None) -> str:
    state = state_of(model)
    if adapter_name is not None:
        if adapter_name not in state.configs:
            raise LorafitError(f"no adapter named {adapter_name!r}; the model has {', '.join(state.configs)}")
        return adapter_name
    if len(state.active) != 1:
        raise LorafitError(f"{len(state.active)} adapters are active; name the one to save (adapter_name=...)")
    return state.active[0]


def _lora_file_config(model, config: LoraConfig, paths: list[str], name: str) -> tuple[dict, dict]:
    """peft's LoRA keys; modules whose saved rank differs (slices, PiSSA) get rank/alpha pattern entries."""
    rank_pattern, alpha_pattern, slices_meta = dict(config.rank_pattern), dict(config.alpha_pattern), {}
    fan_in_fan_out = False
    for path in paths:
        wrapper = model.get_submodule(path)
        fan_in_fan_out |= wrapper.fan_in_fan_out
        spec = wrapper.specs[name]
        rank = wrapper.file_rank(name)
        if rank != spec.rank:  # the same s·B·A with rank r': alpha' keeps alpha'/r' (or alpha'/sqrt(r')) = s
            key = re.escape(path)
            rank_pattern = {key: rank, **rank_pattern}
            alpha_pattern = {key: spec.scaling * rank ** (0.5 if config.use_rslora else 1.0), **alpha_pattern}
        if spec.slices is not None:
            slices_meta[path] = {**asdict(spec.slices), "rank": config.rank_for(path), "alpha": config.alpha_for(path)}
    file_config = {
        "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        **_exported_targets(model, config, paths),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": config.use_rslora,
        "use_dora": config.use_dora, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        # a PiSSA adapter is saved converted to a plain LoRA: peft must not run PiSSA's SVD again on load
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "modules_to_save": None,
    }
    metadata = {"lorafit_fused_slices": json.dumps(slices_meta)} if slices_meta else {}
    return file_config, metadata


def _ia3_file_config(model, config: IA3Config, paths: list[str], name: str) -> dict:
    """peft's IA3 keys. peft wants feedforward_modules a subset of target_modules, string for string."""
    targets = _exported_targets(model, config, paths, with_layers=False)
    feedforward_paths = [p for p in paths if model.get_submodule(p).feedforward[name]]
    feedforward = _short_names(feedforward_paths)
    reselects = [p for p in paths if matches_selection(feedforward, p)] == feedforward_paths
    if not reselects or not set(feedforward) <= set(targets["target_modules"]):
        targets = {"target_modules": list(paths), "exclude_modules": None}
        feedforward = feedforward_paths
    return {"peft_type": "IA3", **targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": any(model.get_submodule(p).fan_in_fan_out for p in paths),
            "init_ia3_weights": True, "modules_to_save": None}


def _bitfit_file_config(model, config: BitFitConfig, paths: list[str]) -> dict:
    return {"peft_type": "BITFIT", "lorafit_method": "bitfit", **_exported_targets(model, config, paths),
            "add_missing_bias": config.add_missing_bias, "train_head": config.train_head}


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
    and vLLM load them. `base_model` (lorafit.identity.base_identity of the bare base) is recorded in
    the safetensors metadata, so `lorafit eval/merge/generate` use that base and refuse another.
    """
    name = _single_adapter(model, adapter_name)
    state = state_of(model)
    config, paths = state.configs[name], state.module_paths[name]
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        for suffix, tensor in model.get_submodule(path).file_tensors(name).items():
            tensors[f"{KEY_PREFIX}{path}.{suffix}"] = tensor.detach().to("cpu").contiguous().clone()

    metadata = {"format": "pt", "lorafit_version": __version__}
    if isinstance(config, LoraConfig):
        method_config, extra_metadata = _lora_file_config(model, config, paths, name)
        metadata.update(extra_metadata)
    elif isinstance(config, IA3Config):
        method_config = _ia3_file_config(model, config, paths, name)
    else:
        method_config = _bitfit_file_config(model, config, paths)
    if base_model is not None:
        from lorafit.identity import METADATA_KEY

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
    if peft_type not in PEFT_TYPES:
        raise LorafitError(f"{path}: peft_type {peft_type!r} is not supported (lorafit loads {', '.join(PEFT_TYPES)})")
    method = PEFT_TYPES[peft_type]
    for key in _REQUIRED_KEYS[method]:
        if key not in raw:
            raise LorafitError(f"{path}: required key {key!r} is missing")
    for key, value in raw.items():
        if key in _KNOWN_KEYS[method] or key in _IGNORED_KEYS:
            continue
        if key in _UNSUPPORTED_WHEN_SET or key in _KNOWN_KEYS["lora"]:
            if value not in (None, False, {}, [], ""):
                raise LorafitError(f"{path}: {key} = {json.dumps(value)} is a peft feature lorafit does not support"
                                   + ("" if method == "lora" else f" for {peft_type}"))
        elif value not in (None, False, {}, [], ""):
            warnings.warn(f"{path}: unknown key {key!r} ignored", stacklevel=3)
    if raw.get("bias", "none") != "none":
        raise LorafitError(f"{path}: bias = {raw['bias']!r}; lorafit loads LoRA adapters with bias 'none' only")
    return raw


def config_from_file(raw: dict, where: Path):
    """The lorafit config an adapter_config.json describes."""
    method = PEFT_TYPES[raw["peft_type"]]
    selection = {"target_modules": raw["target_modules"], "exclude_modules": raw.get("exclude_modules"),
                 "layers": raw.get("layers_to_transform"),
                 "layers_pattern": raw.get("layers_pattern") if raw.get("layers_to_transform") is not None else None}
    try:
        if method == "ia3":
            return IA3Config(**selection, feedforward_modules=raw.get("feedforward_modules"))
        if method == "bitfit":
            return BitFitConfig(**selection, add_missing_bias=bool(raw.get("add_missing_bias", False)),
                                train_head=bool(raw.get("train_head", False)))
        return LoraConfig(
            r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout") or 0.0, **selection,
            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
            use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
        )
    except LorafitError as err:
        raise LorafitError(f"{where / CONFIG_NAME}: {err}") from None


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


def _apply_slice_metadata(config: LoraConfig, metadata: dict, where: Path) -> LoraConfig:
    """Give back fused-slice adapters their packed form, from what save_adapter put in the metadata."""
    text = metadata.get("lorafit_fused_slices")
    if not text or not isinstance(config, LoraConfig):
        return config
    try:
        layout = json.loads(text)
        slices = {re.escape(p): FusedSlices(v["names"], v["sizes"], v["adapt"]) for p, v in layout.items()}
        ranks = {re.escape(p): v["rank"] for p, v in layout.items()}
        alphas = {re.escape(p): v["alpha"] for p, v in layout.items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, LorafitError) as err:
        raise LorafitError(f"{where / WEIGHTS_NAME}: unreadable lorafit_fused_slices metadata ({err})") from None
    rank_pattern = {**ranks, **{k: v for k, v in config.rank_pattern.items() if k not in ranks}}
    alpha_pattern = {**alphas, **{k: v for k, v in config.alpha_pattern.items() if k not in alphas}}
    return LoraConfig(**{**config.to_dict(), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                         "fused_slices": slices})


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
    if not folder.exists():
        raise LorafitError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise LorafitError(f"{folder} is a file; give the adapter folder (with {CONFIG_NAME})")
    raw = read_adapter_config(folder)
    tensors, metadata = _read_weights(folder, allow_pickle)
    config = _apply_slice_metadata(config_from_file(raw, folder), metadata, folder)
    if not tensors:
        raise LorafitError(f"{folder / WEIGHTS_NAME} holds no tensors")
    for key in tensors:
        if not key.startswith(KEY_PREFIX):
            raise LorafitError(f"{folder / WEIGHTS_NAME}: key {key!r} does not start with {KEY_PREFIX!r} (not a peft file)")

    # attach changes more than the new adapter: it activates it alone and freezes (first time) or
    # unfreezes parameters; remember those to put them back if the file does not fit.
    state = getattr(model, "lorafit_state", None)
    active = list(state.active) if isinstance(state, AdapterState) else None
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    attach(model, config, adapter_name)
    try:
        _copy_weights(model, adapter_name, tensors, folder / WEIGHTS_NAME)
    except Exception:
        delete_adapter(model, adapter_name)
        if active is not None:
            set_active_adapter(model, active)
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        raise
    for path in state_of(model).module_paths[adapter_name]:
        for tensor in model.get_submodule(path).adapter_tensors(adapter_name).values():
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
    if not isinstance(wrapper, LoraEmbedding) or key not in remaining:
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
