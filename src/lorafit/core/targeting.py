"""Which modules of a model a config selects: one set of matching rules for every method.

Rules (the same as in peft's files, so a saved config selects the same modules everywhere):
- a list entry matches a module whose path equals it or ends with "." + entry;
- a string is a regular expression that must match the whole module path;
- "all-linear" is every Linear / Conv1D except the model's output head;
- `layers` keeps modules whose block index (the first numbered path segment, or the number after
  `layers_pattern`) is listed; `exclude_modules` removes modules with the same list/regex rules.
A selection that matches nothing, or a list entry that matches nothing, is an error that names the
closest module names: a silent no-op would train nothing and look like success.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from lorafit.core.base_layer import is_linear, linear_types
from lorafit.core.selection import ALL_LINEAR, Selection
from lorafit.core.wrapper import AdapterWrapper
from lorafit.errors import LorafitError

# Default targets are found by the names families give their attention projections, not by a table of model
# types, so a new family with Llama-style names needs no entry. Most common names first; a family with one fused
# projection (query_key_value: GPT-NeoX, Falcon, BLOOM, ChatGLM; qkv_proj: Phi-3; c_attn: GPT-2; Wqkv: MPT;
# W_pack: Baichuan) has it adapted whole, as the seed does with ChatGLM.
QUERY_VALUE_NAMES = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("wq", "wv"))
KEY_VALUE_NAMES = (("k_proj", "v_proj"), ("key", "value"), ("k", "v"), ("wk", "wv"))
FUSED_ATTENTION_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "qkv")
DOWN_PROJECTION_NAMES = ("down_proj", "dense_4h_to_h", "fc2", "mlp.c_proj", "w2")


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of the layers adapters can treat as linear, outside lorafit's own wrappers, in model order."""
    return [p for p, m in _candidate_modules(model).items() if is_linear(_unwrapped(m))]


def attention_targets(model: nn.Module, pairs=QUERY_VALUE_NAMES) -> list[str] | None:
    """The first of `pairs` whose both names are linear layers of `model`, else its fused projection's name."""
    paths = linear_paths(model)
    for pair in pairs:
        if all(any(name_matches(name, path) for path in paths) for name in pair):
            return list(pair)
    return next(([name] for name in FUSED_ATTENTION_NAMES if any(name_matches(name, p) for p in paths)), None)


def adaptable_types() -> tuple[type, ...]:
    return linear_types() + (nn.Embedding,)


def bias_types() -> tuple[type, ...]:
    """Modules whose output is f(x) + b with b along the last dimension (what BitFit can train)."""
    return linear_types() + (nn.LayerNorm,)


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the module(s) that produce the logits; "all-linear" leaves them out."""
    head = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except (AttributeError, NotImplementedError):
            head = None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def block_index(path: str, layers_pattern: list[str] | None) -> int | None:
    """The transformer block a module belongs to: `model.layers.3.self_attn.q_proj` -> 3."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(\d+)\.", path)
            if match:
                break
    return int(match.group(1)) if match else None


def name_matches(entry: str, path: str) -> bool:
    return path == entry or path.endswith("." + entry)


def matches_selection(selection, path: str) -> bool:
    """Does `path` match a list of names (exact or dotted suffix) or a full-path regex?"""
    if selection is None:
        return False
    if isinstance(selection, str):
        return re.fullmatch(selection, path) is not None
    return any(name_matches(entry, path) for entry in selection)


def closest_names(wanted: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Module names that look like `wanted` (compared by full path and by last component)."""
    candidates = sorted(set(candidates))
    short = sorted({c.rsplit(".", 1)[-1] for c in candidates})
    close = difflib.get_close_matches(wanted, short, n=n, cutoff=0.5)
    close += [c for c in difflib.get_close_matches(wanted, candidates, n=n, cutoff=0.5) if c not in close]
    return close[:n] or short[: min(len(short), 8)]


def default_targets(model: nn.Module) -> list[str]:
    """Attention's query and value projections (the seed's choice), or the fused projection that holds them."""
    targets = attention_targets(model)
    if targets is not None:
        return targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = short_names(linear_paths(model))
    raise LorafitError(
        f"no default targets for model type {model_type!r}: no linear layers named like attention's query and "
        f"value projections ({', '.join('/'.join(pair) for pair in QUERY_VALUE_NAMES)}) or a fused one "
        f"({', '.join(FUSED_ATTENTION_NAMES)}); name them with --targets (target_modules; linear layers here: "
        f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''}) or use --targets all-linear"
    )


def select_modules(model: nn.Module, config, allowed_types: tuple[type, ...] | None = None) -> list[str]:
    """Module paths of `model` that `config` selects, in model order; raises if the selection is empty.

    `config` needs target_modules, exclude_modules, layers, layers_pattern. Modules already wrapped by
    lorafit are looked at through their `base_layer`, so a second adapter can target the same layers.
    """
    allowed_types = allowed_types or adaptable_types()
    modules = _candidate_modules(model)
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    model_name = type(model).__name__

    if targets == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [p for p, m in modules.items() if is_linear(_unwrapped(m)) and p not in heads]
        if not chosen:
            raise LorafitError(f"'all-linear' found no Linear or Conv1D layer in {model_name}")
    elif isinstance(targets, str):
        chosen = [p for p in modules if re.fullmatch(targets, p)]
        if not chosen:
            examples = [p for p, m in modules.items() if isinstance(_unwrapped(m), allowed_types)][:5]
            raise LorafitError(
                f"target_modules regex {targets!r} matches no module path of {model_name}; "
                f"paths look like: {', '.join(examples)}"
            )
    else:
        chosen = []
        adaptable = [p for p, m in modules.items() if isinstance(_unwrapped(m), allowed_types)]
        for entry in targets:
            hits = [p for p in modules if name_matches(entry, p)]
            if not hits:
                raise LorafitError(
                    f"target {entry!r} matches no module of {model_name}; closest names: "
                    + ", ".join(closest_names(entry, adaptable))
                )
            chosen.extend(h for h in hits if h not in chosen)
        chosen.sort(key=list(modules).index)

    for path in chosen:
        module = _unwrapped(modules[path])
        if isinstance(module, linear_types()) and not is_linear(module):
            raise LorafitError(f"target module {path!r} is a {type(module).__name__}, a {_linear_parent(module)} "
                               "subclass with a forward of its own (a router?), which adapters cannot add to")
        if not isinstance(module, allowed_types):
            inner = sorted({p.rsplit(".", 1)[-1] for p, m in module.named_modules() if p and isinstance(m, allowed_types)})
            hint = f"; inside it: {', '.join(inner[:8])}" if inner else ""
            kinds = ", ".join(t.__name__ for t in allowed_types)
            raise LorafitError(
                f"target module {path!r} is a {type(module).__name__}, which this method cannot adapt "
                f"(it adapts {kinds}){hint}"
            )

    if config.layers is not None:
        chosen = [p for p in chosen if block_index(p, config.layers_pattern) in config.layers]
        if not chosen:
            raise LorafitError(
                f"layers={config.layers} leaves no target module: none of the targets sits in those blocks"
                + (f" (layers_pattern {config.layers_pattern})" if config.layers_pattern else "")
            )
    if config.exclude_modules is not None:
        chosen = [p for p in chosen if not matches_selection(config.exclude_modules, p)]
        if not chosen:
            raise LorafitError("exclude_modules removes every target module; nothing would be adapted")
    return chosen


def _linear_parent(module: nn.Module) -> str:
    return next(kind.__name__ for kind in linear_types() if isinstance(module, kind))


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module except those inside a lorafit wrapper (its base layer, its adapters' parts).

    named_modules() walks the tree depth-first, so a wrapper's insides come right after it.
    """
    modules, inside = {}, None
    for path, module in model.named_modules():
        if not path or (inside is not None and path.startswith(inside)):
            continue
        modules[path] = module
        inside = path + "." if isinstance(module, AdapterWrapper) else None
    return modules


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterWrapper) else module


def short_names(paths: list[str]) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def portable_targets(model: nn.Module, config, paths: list[str], with_layers: bool = True) -> dict:
    """target_modules (+ layers) for a file: short names when they reselect exactly `paths`, else full paths.

    Reselection uses the same rules as peft, so the file selects the same modules in peft and lorafit.
    `with_layers=False` is for peft configs without layers_to_transform (IA3): full paths then.
    """
    if not with_layers:
        if config.layers is not None:
            return {"target_modules": list(paths), "exclude_modules": None}
        exported = portable_targets(model, config, paths)
        return {"target_modules": exported["target_modules"], "exclude_modules": exported["exclude_modules"]}
    short = short_names(paths)
    candidate = {"target_modules": short, "exclude_modules": config.exclude_modules,
                 "layers_to_transform": config.layers, "layers_pattern": config.layers_pattern}
    try:
        check = Selection(target_modules=short, exclude_modules=config.exclude_modules, layers=config.layers,
                          layers_pattern=config.layers_pattern)
        if select_modules(model, check, allowed_types=bias_types() + (nn.Embedding,)) == paths:
            return candidate
    except LorafitError:
        pass
    return {"target_modules": list(paths), "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}
