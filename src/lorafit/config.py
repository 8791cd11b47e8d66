"""Adapter configurations: one dataclass per method, validated when constructed.

A config says *where* adapters go (targets, layers, exclusions) and *what* they are (rank, alpha,
dropout, init). It never refers to a concrete model; `targeting.select_modules` resolves it against one.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union

from lorafit.errors import LorafitError

# The one target spelling that is not a module name: every linear layer except the output head.
ALL_LINEAR = "all-linear"

LORA_INITS = ("default", "gaussian", "pissa")

Targets = Union[list, str, None]


@dataclass(frozen=True)
class FusedSlices:
    """Names the output rows of a fused projection so that LoRA can adapt some of them only.

    A fused layer such as ChatGLM2's `query_key_value` computes q, k and v in one matmul; its output
    rows are consecutive blocks. `names[i]` names block i and `sizes[i]` is its row count; a name may
    repeat (ChatGLM-6B interleaves q, k, v per head). Every name in `adapt` gets its own rank-r pair
    (A_name: r×in, B_name: rows_of_name×r) whose output lands only in that name's rows, like loralib's
    MergedLinear with `enable_lora=[True, False, True]`.

    Example, ChatGLM2-6B (hidden 4096, 2 key/value groups of 128): adapt q and v only::

        FusedSlices(names=("q", "k", "v"), sizes=(4096, 256, 256), adapt=("q", "v"))
    """

    names: tuple
    sizes: tuple
    adapt: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        object.__setattr__(self, "adapt", tuple(self.adapt))
        if not self.names or len(self.names) != len(self.sizes):
            raise LorafitError(
                f"FusedSlices: names ({len(self.names)}) and sizes ({len(self.sizes)}) must be "
                "non-empty lists of the same length, one entry per block of output rows"
            )
        for size in self.sizes:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise LorafitError(f"FusedSlices: every size must be a positive integer, got {size!r}")
        if not self.adapt:
            raise LorafitError("FusedSlices: adapt is empty; name at least one slice to adapt")
        for name in self.adapt:
            if name not in self.names:
                raise LorafitError(
                    f"FusedSlices: adapt names {name!r}, which is not one of the slices {sorted(set(self.names))}"
                )
        if len(set(self.adapt)) != len(self.adapt):
            raise LorafitError(f"FusedSlices: adapt lists a slice twice: {list(self.adapt)}")

    @property
    def total_rows(self) -> int:
        return sum(self.sizes)

    def rows_of(self, name: str) -> list[int]:
        """Output row indices that belong to slice `name`, in increasing order."""
        rows, start = [], 0
        for block_name, size in zip(self.names, self.sizes):
            if block_name == name:
                rows.extend(range(start, start + size))
            start += size
        return rows


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_module_list(name: str, value: Any, allow_all_linear: bool) -> Any:
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


def _check_pattern(name: str, pattern: Any, value_ok, what: str) -> dict:
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


def _check_selection(config) -> None:
    """Validate the fields that say *where* adapters go; every method's config has them."""
    config.target_modules = _check_module_list("target_modules", config.target_modules, allow_all_linear=True)
    config.exclude_modules = _check_module_list("exclude_modules", config.exclude_modules, allow_all_linear=False)
    if config.layers is not None:
        layers = [config.layers] if _is_int(config.layers) else config.layers
        if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(i) and i >= 0 for i in layers):
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
class LoraConfig:
    """LoRA (Hu et al. 2021, arXiv:2106.09685): h = W x + (alpha / r) · B A x, with W frozen.

    r: rank of the bypass (the seed: 4, 8 or 12 give the best cost/benefit; 8 by default).
    alpha: the bypass's weight; scaling = alpha / r, or alpha / sqrt(r) with `use_rslora`
        (Kalajdzievski 2023, arXiv:2312.03732).
    dropout: dropout on the bypass input; 0 means the input is not copied at all.
    target_modules: a list (each entry an exact module path or a dotted suffix such as "q_proj"),
        one string (a regex that must match the full module path), "all-linear" (every Linear/Conv1D
        except the output head) or None (the usual choice for the model's architecture, e.g. q_proj,
        v_proj for Llama; query_key_value for ChatGLM).
    exclude_modules: same forms as target_modules; matching modules are never adapted.
    layers / layers_pattern: adapt only these block indices (the first numbered path segment, or the
        one after `layers_pattern`, e.g. "layers" or "h").
    rank_pattern / alpha_pattern: per-module r / alpha; a key matches a module whose path equals it or
        ends with "." + key; keys are regexes, as in peft's files ("layers\\.0\\.self_attn\\.q_proj").
    init: "default" (A Kaiming-uniform, B zero) or "gaussian" (A ~ N(0, 1/r²), B zero): either way
        B·A = 0 so the adapted model equals the base model at step 0. "pissa" (Meng et al. 2024,
        arXiv:2404.02948): A, B from W's top-r singular vectors, W replaced by the residual; saved
        adapters are converted to a plain LoRA for the untouched base model.
    use_dora: DoRA (Liu et al. 2024, arXiv:2402.09353), a learned magnitude per output row.
    fused_slices: {module name: FusedSlices} to adapt chosen slices of fused projections only.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Targets = None
    exclude_modules: Targets = None
    layers: Union[list, int, None] = None
    layers_pattern: Union[str, list, None] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "default"
    use_dora: bool = False
    fused_slices: dict = field(default_factory=dict)

    method = "lora"

    def __post_init__(self) -> None:
        if not _is_int(self.r) or self.r < 1:
            raise LorafitError(f"r must be an integer >= 1 (the adapter rank), got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise LorafitError(f"alpha must be a number > 0 (scaling = alpha / r), got {self.alpha!r}")
        if not math.isfinite(self.alpha):
            raise LorafitError(f"alpha must be finite, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise LorafitError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _check_selection(self)
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, lambda v: _is_int(v) and v >= 1, "an integer rank >= 1")
        self.alpha_pattern = _check_pattern(
            "alpha_pattern",
            self.alpha_pattern,
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
            "a number > 0",
        )
        if not isinstance(self.use_rslora, bool):
            raise LorafitError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        if self.init not in LORA_INITS:
            raise LorafitError(f"init must be one of {', '.join(LORA_INITS)}; got {self.init!r}")
        if not isinstance(self.use_dora, bool):
            raise LorafitError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.use_dora and self.init == "pissa":
            raise LorafitError("use_dora with init='pissa' is not supported; choose one")
        if not isinstance(self.fused_slices, dict):
            raise LorafitError("fused_slices must be a mapping of module name -> FusedSlices")
        slices = {}
        for key, value in self.fused_slices.items():
            if isinstance(value, dict):
                value = FusedSlices(**value)
            if not isinstance(value, FusedSlices):
                raise LorafitError(f"fused_slices[{key!r}] must be a FusedSlices or a mapping with names, sizes, adapt")
            slices[key] = value
        self.fused_slices = slices

    def rank_for(self, module_path: str) -> int:
        return pattern_value(self.rank_pattern, module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        return pattern_value(self.alpha_pattern, module_path, self.alpha)

    def scaling_for(self, module_path: str) -> float:
        rank, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def slices_for(self, module_path: str) -> FusedSlices | None:
        return pattern_value(self.fused_slices, module_path, None)

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["fused_slices"] = {k: asdict(v) for k, v in self.fused_slices.items()}
        return values


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
        _check_selection(self)
        self.feedforward_modules = _check_module_list("feedforward_modules", self.feedforward_modules,
                                                      allow_all_linear=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
        _check_selection(self)
        for name in ("add_missing_bias", "train_head"):
            if not isinstance(getattr(self, name), bool):
                raise LorafitError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def pattern_key_matches(key: str, module_path: str) -> bool:
    """peft's rule for rank/alpha patterns: the path ends with the key (a regex) after a dot, or equals it."""
    return re.match(rf"(.*\.)?({key})$", module_path) is not None


def pattern_value(pattern: dict, module_path: str, default):
    """The value of the first key of `pattern` that matches `module_path`, else `default`."""
    for key, value in pattern.items():
        if pattern_key_matches(key, module_path):
            return value
    return default
