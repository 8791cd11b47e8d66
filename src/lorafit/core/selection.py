"""What every method's config shares: the fields that say *where* adapters go, and their checks.

Each method's own config dataclass (LoraConfig in methods/lora.py, ...) has these selection fields
(targets, exclusions, layers) and calls `check_selection` when constructed. A config never refers to
a concrete model; `targeting.select_modules` resolves it against one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Union

from lorafit.errors import LorafitError

# The one target spelling that is not a module name: every linear layer except the output head.
ALL_LINEAR = "all-linear"

Targets = Union[list, str, None]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FLOAT32_MAX = 3.4028234663852886e38


def finite_in_float32(value: float) -> bool:
    """Finite in float32 too: torch turns settings such as lr or alpha into float32 tensors (1e39 overflows)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def check_module_list(name: str, value: Any, allow_all_linear: bool) -> Any:
    """A module selection is a list of names (exact or dotted suffix) or one full-path regex string."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == ALL_LINEAR:
            if allow_all_linear:
                return value
            raise LorafitError(f"{name}: {ALL_LINEAR!r} is only meaningful for target_modules")
        try:
            re.compile(value)
        except re.error as err:
            raise LorafitError(f"{name}: {value!r} is not a valid regular expression ({err})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        entries = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not entries:
            raise LorafitError(f"{name} is an empty list; name at least one module (e.g. ['q_proj', 'v_proj'])")
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise LorafitError(f"{name}: every entry must be a non-empty module name, got {entry!r}")
        return entries
    raise LorafitError(
        f"{name} must be a list of module names, a regex string"
        + (f" or {ALL_LINEAR!r}" if allow_all_linear else "")
        + f"; got {type(value).__name__}"
    )


def check_pattern(name: str, pattern: Any, value_ok, what: str) -> dict:
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise LorafitError(f"{name} must be a mapping of module name -> {what}, got {type(pattern).__name__}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise LorafitError(f"{name}: keys must be module names, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise LorafitError(f"{name}: key {key!r} is not a valid regular expression ({err})") from None
        if not value_ok(value):
            raise LorafitError(f"{name}[{key!r}] = {value!r}; it must be {what}")
    return dict(pattern)


def check_selection(config) -> None:
    """Validate the fields that say *where* adapters go; every method's config has them."""
    config.target_modules = check_module_list("target_modules", config.target_modules, allow_all_linear=True)
    config.exclude_modules = check_module_list("exclude_modules", config.exclude_modules, allow_all_linear=False)
    if config.layers is not None:
        layers = [config.layers] if is_int(config.layers) else config.layers
        if not isinstance(layers, (list, tuple)) or not layers or not all(is_int(i) and i >= 0 for i in layers):
            raise LorafitError(f"layers must be a block index or a non-empty list of indices >= 0, got {config.layers!r}")
        config.layers = sorted(set(layers))
    if config.layers_pattern is not None:
        patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
            raise LorafitError(
                f"layers_pattern must be a name such as 'layers' or a list of names, got {config.layers_pattern!r}")
        if config.layers is None:
            raise LorafitError("layers_pattern is set but layers is not; give the block indices to adapt")
        config.layers_pattern = list(patterns)


@dataclass
class Selection:
    """Only the fields that say *where* adapters go, e.g. to check that names reselect the same modules."""

    target_modules: Targets = None
    exclude_modules: Targets = None
    layers: Union[list, int, None] = None
    layers_pattern: Union[str, list, None] = None

    def __post_init__(self) -> None:
        check_selection(self)


def parse_targets(given: str | list | None):
    """A command line's targets as configs take them: None, 'all-linear', a regex, or a list of names.

    `given` is what a flag or YAML key holds: `--targets q_proj v_proj` (a list), or one string. A single
    entry with a regex character is one full-path regex; otherwise entries are names, commas also separating
    them (`q_proj,v_proj`, as earlier versions and run folders wrote them).
    """
    if given is None:
        return None
    entries = [given] if isinstance(given, str) else list(given)
    if len(entries) == 1 and (entries[0] == ALL_LINEAR or any(ch in entries[0] for ch in "*()[]|\\^$+?")):
        return entries[0]
    return [name.strip() for entry in entries for name in entry.split(",") if name.strip()]


def pattern_key_matches(key: str, module_path: str) -> bool:
    """peft's rule for rank/alpha patterns: the path ends with the key (a regex) after a dot, or equals it."""
    return re.match(rf"(.*\.)?({key})$", module_path) is not None


def pattern_value(pattern: dict, module_path: str, default):
    """The value of the first key of `pattern` that matches `module_path`, else `default`."""
    for key, value in pattern.items():
        if pattern_key_matches(key, module_path):
            return value
    return default
