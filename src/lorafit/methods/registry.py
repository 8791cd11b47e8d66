"""The method registry: every adapter method lorafit knows, one entry each.

attach, save/load, targeting, the training loop and `lorafit train` look methods up here and hold no
per-method code. An entry is light (a name, the module that implements the method, its `lorafit train`
options) so that `lorafit train --help` lists methods and flags without importing torch; the module
is imported the first time the method is used and provides `METHOD`, a `Method`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from lorafit.errors import LorafitError


@dataclass(frozen=True)
class Method:
    """What the shared code needs from one method; the method's module defines it as `METHOD`."""

    name: str
    config_class: type
    peft_type: str  # adapter_config.json's "peft_type"
    wrappers: tuple  # the AdapterWrapper classes it puts into a model
    select: Callable  # (model, config) -> module paths it adapts
    wrap: Callable  # (module) -> a new wrapper around it
    add: Callable  # (wrapper, adapter name, config, module path, dtype, model) -> None
    file_config: Callable  # (model, config, paths, adapter name) -> (adapter_config keys, safetensors metadata)
    config_from_file: Callable  # (adapter_config dict, safetensors metadata, where) -> config
    file_keys: frozenset  # adapter_config.json keys it reads
    required_file_keys: tuple = ()
    from_options: Callable | None = None  # (options dataclass, targets, --method name) -> config
    learning_rate_ratios: Callable | None = None  # (options) -> {parameter-dict name: lr multiplier}


@dataclass(frozen=True)
class MethodEntry:
    """One registry line: the method's name, where it lives, and its `lorafit train` options."""

    name: str
    module: str  # imported on first use; must define METHOD
    options: type | None = None  # a dataclass: its fields are `lorafit train` flags and YAML keys
    cli_names: tuple = field(default=())  # --method spellings (default: the name); LoRA adds "dora"

    @property
    def spellings(self) -> tuple:
        return self.cli_names or (self.name,)

    def load(self) -> Method:
        method = importlib.import_module(self.module).METHOD
        if method.name != self.name:
            raise LorafitError(f"method module {self.module} defines {method.name!r}, registered as {self.name!r}")
        return method


_ENTRIES: dict[str, MethodEntry] = {}


def register(entry: MethodEntry) -> MethodEntry:
    """Add a method; its names must be new (a second registration would shadow the first silently)."""
    taken = {s for e in _ENTRIES.values() for s in e.spellings}
    clash = [s for s in entry.spellings if s in taken] or ([entry.name] if entry.name in _ENTRIES else [])
    if clash:
        raise LorafitError(f"method name {clash[0]!r} is already registered")
    _ENTRIES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    _ENTRIES.pop(name, None)


def entries() -> list[MethodEntry]:
    return list(_ENTRIES.values())


def methods() -> list[Method]:
    """Every registered method, loaded (imports their modules, hence torch)."""
    return [entry.load() for entry in _ENTRIES.values()]


def entry_for(spelling: str) -> MethodEntry:
    """The entry a `--method` value names; an unknown one is an error with the closest name."""
    for entry in _ENTRIES.values():
        if spelling in entry.spellings:
            return entry
    names = [s for e in _ENTRIES.values() for s in e.spellings]
    close = difflib.get_close_matches(spelling, names, n=1)
    raise LorafitError(f"method {spelling!r} is unknown" + (f" (did you mean {close[0]}?)" if close else "")
                       + f"; methods: {', '.join(names)}")


def method_of(config) -> Method:
    """The method whose config class `config` is an instance of."""
    for method in methods():
        if isinstance(config, method.config_class):
            return method
    kinds = ", ".join(m.config_class.__name__ for m in methods())
    raise LorafitError(f"attach needs an adapter config ({kinds}), got {type(config).__name__}")


def method_for_peft_type(peft_type) -> Method | None:
    for method in methods():
        if method.peft_type == peft_type:
            return method
    return None
