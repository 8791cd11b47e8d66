"""Adapters on disk in peft's format, both directions, so they move freely to peft, vLLM and back.

A folder holds `adapter_config.json` (only keys peft knows) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r×in) / `.lora_B.weight` (out×r), and for embeddings
`.lora_embedding_A` (r×vocab) / `.lora_embedding_B` (dim×r). Loading never unpickles anything unless
the caller passes `allow_pickle=True`, and every mismatch is an error that names the key.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorafit import __version__
from lorafit.adapters import attach, delete_adapter, state_of
from lorafit.config import FusedSlices, LoraConfig
from lorafit.errors import LorafitError
from lorafit.files import atomic_path, write_json
from lorafit.methods.lora import LoraEmbedding, LoraLinear
from lorafit.targeting import select_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# adapter_config.json keys peft writes that say nothing about the weights lorafit loads.
_IGNORED_KEYS = {
    "peft_version", "revision", "auto_mapping", "base_model_name_or_path", "task_type", "inference_mode",
    "init_lora_weights", "megatron_core", "qalora_group_size", "fan_in_fan_out", "ensure_weight_tying",
}
# Keys for peft features lorafit does not implement: refused when set, since ignoring them would
# silently compute something other than what the adapter was trained as.
_UNSUPPORTED_WHEN_SET = {
    "use_dora", "lora_bias", "modules_to_save", "layer_replication", "target_parameters",
    "trainable_token_indices", "megatron_config", "loftq_config", "eva_config", "corda_config",
    "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
    "lora_ga_config", "monteclora_config", "velora_config",
}
_LORA_KEYS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "bias",
}


def _tensor_names(wrapper: nn.Module) -> tuple[str, str]:
    if isinstance(wrapper, LoraEmbedding):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


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


def _exported_targets(model: nn.Module, config: LoraConfig, paths: list[str]) -> dict:
    """target_modules (+ layers) for the file: short names when they reselect exactly `paths`, else full paths."""
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    exclude = config.exclude_modules
    candidate = {"target_modules": short, "exclude_modules": exclude,
                 "layers_to_transform": config.layers, "layers_pattern": config.layers_pattern}
    try:
        check = LoraConfig(target_modules=short, exclude_modules=exclude, layers=config.layers,
                           layers_pattern=config.layers_pattern)
        if select_modules(model, check) == paths:
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


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    adapter_name: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write one adapter (default: the active one) as a peft-format folder; returns the folder.

    Each file is written atomically. A fused-slice adapter is stored as the equivalent full LoRA of
    rank G·r (B zero outside the slices) so peft and vLLM load it; lorafit reads its slice layout
    back from the safetensors metadata.
    """
    name = _single_adapter(model, adapter_name)
    state = state_of(model)
    config, paths = state.configs[name], state.module_paths[name]
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern, slices_meta = dict(config.rank_pattern), dict(config.alpha_pattern), {}
    fan_in_fan_out = False
    for path in paths:
        wrapper = model.get_submodule(path)
        lora_a, lora_b = wrapper.export_tensors(name)
        a_name, b_name = _tensor_names(wrapper)
        tensors[f"{KEY_PREFIX}{path}.{a_name}"] = lora_a.detach().to("cpu").contiguous().clone()
        tensors[f"{KEY_PREFIX}{path}.{b_name}"] = lora_b.detach().to("cpu").contiguous().clone()
        fan_in_fan_out |= getattr(wrapper, "fan_in_fan_out", False)
        spec = wrapper.specs[name]
        if spec.slices is not None:
            groups = len(spec.slices.adapt)
            # Same product s·B·A in peft: rank G·r and an alpha that keeps alpha/r (or alpha/sqrt(r)).
            key = re.escape(path)
            rank_pattern = {key: groups * spec.rank, **rank_pattern}
            alpha_pattern = {key: spec.scaling * (groups * spec.rank) ** (0.5 if config.use_rslora else 1.0), **alpha_pattern}
            slices_meta[path] = {**asdict(spec.slices), "rank": config.rank_for(path), "alpha": config.alpha_for(path)}

    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    adapter_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        **_exported_targets(model, config, paths),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True if config.init == "default" else config.init,
        "modules_to_save": None,
        "use_dora": False,
        "inference_mode": True,
        "revision": None,
    }
    metadata = {"format": "pt", "lorafit_version": __version__}
    if slices_meta:
        metadata["lorafit_fused_slices"] = json.dumps(slices_meta)

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
    if not isinstance(raw, dict):
        raise LorafitError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise LorafitError(f"{path}: peft_type {peft_type!r} is not supported (lorafit loads 'LORA' adapters)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise LorafitError(f"{path}: required key {key!r} is missing")
    for key, value in raw.items():
        if key in _LORA_KEYS or key in _IGNORED_KEYS:
            continue
        if key in _UNSUPPORTED_WHEN_SET:
            if value not in (None, False, {}, [], ""):
                raise LorafitError(f"{path}: {key} = {json.dumps(value)} is a peft feature lorafit does not support")
        elif value not in (None, False, {}, [], ""):
            warnings.warn(f"{path}: unknown key {key!r} ignored", stacklevel=3)
    if raw.get("bias", "none") != "none":
        raise LorafitError(f"{path}: bias = {raw['bias']!r}; lorafit loads LoRA adapters with bias 'none' only")
    return raw


def config_from_peft(raw: dict, where: Path) -> LoraConfig:
    try:
        return LoraConfig(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout") or 0.0,
            target_modules=raw["target_modules"],
            exclude_modules=raw.get("exclude_modules"),
            layers=raw.get("layers_to_transform"),
            layers_pattern=raw.get("layers_pattern") if raw.get("layers_to_transform") is not None else None,
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            use_rslora=bool(raw.get("use_rslora", False)),
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
    if not text:
        return config
    try:
        layout = json.loads(text)
        slices = {re.escape(p): FusedSlices(v["names"], v["sizes"], v["adapt"]) for p, v in layout.items()}
        ranks = {re.escape(p): v["rank"] for p, v in layout.items()}
        alphas = {re.escape(p): v["alpha"] for p, v in layout.items()}
    except (ValueError, KeyError, TypeError, LorafitError) as err:
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
    tensor in the file must belong to it; otherwise the error names the key and the model is unchanged.
    """
    folder = Path(folder)
    if not folder.exists():
        raise LorafitError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise LorafitError(f"{folder} is a file; give the adapter folder (with {CONFIG_NAME})")
    raw = read_adapter_config(folder)
    tensors, metadata = _read_weights(folder, allow_pickle)
    config = _apply_slice_metadata(config_from_peft(raw, folder), metadata, folder)
    if not tensors:
        raise LorafitError(f"{folder / WEIGHTS_NAME} holds no tensors")
    for key in tensors:
        if not key.startswith(KEY_PREFIX):
            raise LorafitError(f"{folder / WEIGHTS_NAME}: key {key!r} does not start with {KEY_PREFIX!r} (not a peft LoRA file)")

    attach(model, config, adapter_name)
    try:
        _copy_weights(model, adapter_name, tensors, folder / WEIGHTS_NAME)
    except Exception:
        delete_adapter(model, adapter_name)
        raise
    for path in state_of(model).module_paths[adapter_name]:
        for tensor in model.get_submodule(path).adapter_tensors(adapter_name).values():
            tensor.requires_grad_(trainable)
    return model


def _copy_weights(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], where: Path) -> None:
    remaining = dict(tensors)
    for path in state_of(model).module_paths[name]:
        wrapper = model.get_submodule(path)
        a_name, b_name = _tensor_names(wrapper)
        found = []
        for tensor_name in (a_name, b_name):
            key = f"{KEY_PREFIX}{path}.{tensor_name}"
            if key not in remaining:
                raise LorafitError(f"{where}: missing key {key!r} (the adapter does not cover module {path})")
            found.append(remaining.pop(key))
        lora_a, lora_b = found
        want_a = (wrapper.export_rank(name), wrapper.in_features if isinstance(wrapper, LoraLinear) else wrapper.num_embeddings)
        want_b = (wrapper.out_features if isinstance(wrapper, LoraLinear) else wrapper.embedding_dim, wrapper.export_rank(name))
        for key_name, tensor, want in ((a_name, lora_a, want_a), (b_name, lora_b, want_b)):
            if tuple(tensor.shape) != want:
                raise LorafitError(
                    f"{where}: {KEY_PREFIX}{path}.{key_name} has shape {tuple(tensor.shape)} but module {path} "
                    f"needs {want}; was this adapter made for another base model?"
                )
        # peft stores a targeted embedding's (possibly resized/trained) base weight beside the adapter.
        base_key = f"{KEY_PREFIX}{path}.base_layer.weight"
        if base_key in remaining:
            base_weight = remaining.pop(base_key)
            if tuple(base_weight.shape) != tuple(wrapper.base_layer.weight.shape):
                raise LorafitError(f"{where}: {base_key} has shape {tuple(base_weight.shape)}, the model's is "
                                   f"{tuple(wrapper.base_layer.weight.shape)}")
            with torch.no_grad():
                wrapper.base_layer.weight.copy_(base_weight)
        dtype = wrapper.adapter_tensors(name)[wrapper.adapter_parameter_dicts[0]].dtype
        wrapper.import_tensors(name, lora_a.to(dtype), lora_b.to(dtype), f"{where}: {path}")
    if remaining:
        key = sorted(remaining)[0]
        raise LorafitError(
            f"{where}: unexpected key {key!r}"
            + (f" (+{len(remaining) - 1} more)" if len(remaining) > 1 else "")
            + ": the model has no adapted module for it; was this adapter made for another base model?"
        )


def load_adapter_weights_into(model: nn.Module, folder: str | Path, adapter_name: str) -> None:
    """Overwrite the tensors of an adapter already attached to `model` (resume from a checkpoint)."""
    folder = Path(folder)
    tensors, _ = _read_weights(folder, allow_pickle=False)
    _copy_weights(model, adapter_name, tensors, folder / WEIGHTS_NAME)
