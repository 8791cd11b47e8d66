"""The method registry: every adapter method lorafit knows, one entry each, and all that differs between them.

attach, save/load, targeting, the training loop, export, per-row serving and the commands look methods up
here and hold no per-method code: a method declares what it supports (its `lorafit train` flags and their
ranges, merging, FSDP, a llama.cpp adapter form, per-row serving). An entry is light (a name, the module
that implements the method, its options) so that `lorafit train --help` lists methods and flags without
importing torch; the module is imported the first time the method is used and provides `METHOD`, a
`Method`. The built-in methods register in lorafit/methods/__init__.py.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from lorafit.core.selection import finite_in_float32
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
    merges: bool = True  # its update folds into the base weights (merge, merge_and_unload, `lorafit merge`)
    # (config) -> None when llama.cpp can apply the adapter as it is (`lorafit export --format gguf-lora`), else
    # what the adapter is, e.g. "a DoRA adapter (magnitude vectors)"; None here: never
    gguf_adapter: Callable | None = None
    # (config) -> None when `adapter_per_row` can serve the adapter (one adapter per batch row), else why not;
    # None here: never
    per_row: Callable | None = None


@dataclass(frozen=True)
class MethodEntry:
    """One registry line: the method's name, where it lives, and what `lorafit train` needs before torch loads."""

    name: str
    module: str  # imported on first use; must define METHOD
    options: type | None = None  # a dataclass: its fields are `lorafit train` flags and YAML keys (see check_ranges)
    cli_names: tuple = field(default=())  # --method spellings (default: the name); LoRA adds "dora"
    display_name: str = ""  # how messages name it ("LoRA"); default: the name
    fsdp_refusal: str | None = None  # why --strategy fsdp cannot train it (None: it can)

    @property
    def spellings(self) -> tuple:
        return self.cli_names or (self.name,)

    @property
    def title(self) -> str:
        return self.display_name or self.name

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


def spellings() -> tuple[str, ...]:
    """Every --method value, in registration order."""
    return tuple(spelling for entry in _ENTRIES.values() for spelling in entry.spellings)


def entry_for(spelling: str) -> MethodEntry:
    """The entry a `--method` value (or a method's name) names; an unknown one is an error with the closest name."""
    for entry in _ENTRIES.values():
        if spelling in entry.spellings or spelling == entry.name:
            return entry
    names = list(spellings())
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


# -- a method's `lorafit train` options: who owns each, their ranges, the config they describe ----------------
def option_owners() -> dict[str, tuple[str, ...]]:
    """Option name -> the --method spellings that use it, for every option a method declares."""
    owners: dict[str, tuple[str, ...]] = {}
    for entry in _ENTRIES.values():
        for option in fields(entry.options) if entry.options else ():
            owners[option.name] = owners.get(option.name, ()) + entry.spellings
    return owners


# An options class may declare RANGES = {option name: rule}; each rule is one of these, with what it says.
_RULES = {
    ">= 1": (lambda v: v >= 1, "must be >= 1"),
    "> 0": (lambda v: finite_in_float32(v) and v > 0, "must be a finite number > 0"),
    "[0, 1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"),  # also false for NaN
}


def check_ranges(values) -> None:
    """Refuse every registered option in `values` (any object with those attributes) that is out of its range.

    Finite means finite in float32 too (lorafit.core.selection.finite_in_float32).
    """
    for entry in _ENTRIES.values():
        for name, rule in getattr(entry.options, "RANGES", {}).items():
            value = getattr(values, name, None)
            ok, words = _RULES[rule]
            if value is not None and not ok(value):
                raise LorafitError(f"--{name.replace('_', '-')} {words}, got {value}")


def config_from_options(spelling: str, targets, values: dict | None = None):
    """The method config that `--method spelling`, `targets` (as lorafit.core.selection.parse_targets gives
    them) and the method's option values describe; options not given take their defaults."""
    entry = entry_for(spelling)
    method = entry.load()
    if method.from_options is None:
        raise LorafitError(f"method {spelling!r} takes no command-line options (it has no from_options)")
    known = {f.name for f in fields(entry.options)} if entry.options else set()
    options = entry.options(**{k: v for k, v in (values or {}).items() if k in known}) if entry.options else None
    return method.from_options(options, targets, spelling)


def learning_rate_ratios(spelling: str, values: dict) -> dict[str, float]:
    """{parameter-dict name: lr multiplier} the method asks for with these option values (LoRA+), else {}."""
    entry = entry_for(spelling)
    ratios = entry.load().learning_rate_ratios
    if ratios is None:
        return {}
    known = {f.name for f in fields(entry.options)} if entry.options else set()
    return ratios(entry.options(**{k: v for k, v in values.items() if k in known}) if entry.options else None)
