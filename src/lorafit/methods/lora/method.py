"""The LoRA method: its config, how it picks and wraps modules, and its mapping to peft's files.

The layers themselves are `lorafit.methods.lora` (the plain layer, its variants DoRA / fused slices / PiSSA,
the embedding, per-row serving). Files are peft's LoRA format: `lora_A.weight` (r×in), `lora_B.weight`
(out×r), `lora_embedding_A/B`, DoRA's `lora_magnitude_vector`. Sliced and PiSSA adapters are saved as
the exact plain LoRA they equal (rank G·r, or 2r for the untouched base) so peft and vLLM load them;
a sliced adapter's layout is kept in the safetensors metadata to load it back packed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Union

import torch
from torch import nn

from lorafit.core.registry import Method
from lorafit.core.selection import (
    Targets,
    check_pattern,
    check_selection,
    is_int,
    pattern_key_matches,
    pattern_value,
)
from lorafit.core.targeting import portable_targets, select_modules
from lorafit.core.wrapper import AdapterWrapper
from lorafit.errors import LorafitError
from lorafit.methods.lora.embedding import LoraEmbedding
from lorafit.methods.lora.layer import AdapterSpec, LoraLinear
from lorafit.methods.lora.variants import FusedSlices

LORA_INITS = ("default", "gaussian", "pissa")
SLICES_METADATA = "lorafit_fused_slices"


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
        if not is_int(self.r) or self.r < 1:
            raise LorafitError(f"r must be an integer >= 1 (the adapter rank), got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise LorafitError(f"alpha must be a number > 0 (scaling = alpha / r), got {self.alpha!r}")
        if not math.isfinite(self.alpha):
            raise LorafitError(f"alpha must be finite, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise LorafitError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_selection(self)
        self.rank_pattern = check_pattern("rank_pattern", self.rank_pattern, lambda v: is_int(v) and v >= 1, "an integer rank >= 1")
        self.alpha_pattern = check_pattern(
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


# -- choosing and wrapping modules -------------------------------------------------------------------------
def select(model: nn.Module, config: LoraConfig) -> list[str]:
    paths = select_modules(model, config)
    for option in ("rank_pattern", "alpha_pattern", "fused_slices"):
        for key in getattr(config, option):
            if not any(pattern_key_matches(key, p) for p in paths):
                raise LorafitError(
                    f"{option} key {key!r} matches none of the adapted modules "
                    f"(e.g. {', '.join(paths[:3])}); it would have no effect"
                )
    return paths


def wrap(module: nn.Module) -> AdapterWrapper:
    """The LoRA wrapper for a linear layer or an Embedding."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    return LoraLinear(module)


def add(wrapper, name: str, config: LoraConfig, module_path: str, dtype: torch.dtype, model) -> None:
    spec = AdapterSpec(rank=config.rank_for(module_path), scaling=config.scaling_for(module_path),
                       dropout=config.dropout, init=config.init, slices=config.slices_for(module_path),
                       use_dora=config.use_dora)
    wrapper.add_adapter(name, spec, dtype, module_path)


# -- peft's file format ---------------------------------------------------------------------------------------
FILE_KEYS = frozenset({"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                       "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora",
                       "bias", "use_dora"})


def file_config(model, config: LoraConfig, paths: list[str], name: str) -> tuple[dict, dict]:
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
    keys = {
        "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        **portable_targets(model, config, paths),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": config.use_rslora,
        "use_dora": config.use_dora, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        # a PiSSA adapter is saved converted to a plain LoRA: peft must not run PiSSA's SVD again on load
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "modules_to_save": None,
    }
    return keys, ({SLICES_METADATA: json.dumps(slices_meta)} if slices_meta else {})


def config_from_file(raw: dict, metadata: dict, where) -> LoraConfig:
    """The LoraConfig an adapter_config.json (and, for fused slices, the weights' metadata) describes."""
    if raw.get("bias", "none") != "none":
        raise LorafitError(f"{where}: bias = {raw['bias']!r}; lorafit loads LoRA adapters with bias 'none' only")
    try:
        config = LoraConfig(
            r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout") or 0.0,
            target_modules=raw["target_modules"], exclude_modules=raw.get("exclude_modules"),
            layers=raw.get("layers_to_transform"),
            layers_pattern=raw.get("layers_pattern") if raw.get("layers_to_transform") is not None else None,
            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
            use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
        )
    except LorafitError as err:
        raise LorafitError(f"{where}: {err}") from None
    return _with_slices(config, metadata.get(SLICES_METADATA), where)


def _with_slices(config: LoraConfig, text: str | None, where) -> LoraConfig:
    """Give back fused-slice adapters their packed form, from what file_config put in the metadata."""
    if not text:
        return config
    try:
        layout = json.loads(text)
        slices = {re.escape(p): FusedSlices(v["names"], v["sizes"], v["adapt"]) for p, v in layout.items()}
        ranks = {re.escape(p): v["rank"] for p, v in layout.items()}
        alphas = {re.escape(p): v["alpha"] for p, v in layout.items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, LorafitError) as err:
        raise LorafitError(f"{where}: unreadable {SLICES_METADATA} metadata ({err})") from None
    rank_pattern = {**ranks, **{k: v for k, v in config.rank_pattern.items() if k not in ranks}}
    alpha_pattern = {**alphas, **{k: v for k, v in config.alpha_pattern.items() if k not in alphas}}
    return LoraConfig(**{**config.to_dict(), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                         "fused_slices": slices})


# -- `lorafit train` --------------------------------------------------------------------------------------------
def from_options(options, targets, spelling: str) -> LoraConfig:
    """The config `--method lora|dora` and its flags (methods/options.py: LoraOptions) describe."""
    return LoraConfig(r=options.r, alpha=options.alpha, dropout=options.dropout, target_modules=targets,
                      use_rslora=options.use_rslora, init=options.init, use_dora=spelling == "dora")


def learning_rate_ratios(options) -> dict[str, float]:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B (and an embedding's B) learns `ratio` times faster."""
    ratio = options.lora_plus_ratio
    return {} if ratio == 1.0 else {"lora_B": ratio, "lora_embedding_B": ratio}


def gguf_adapter(config: LoraConfig) -> str | None:
    """llama.cpp applies plain LoRA pairs (sliced and PiSSA adapters are saved as such); DoRA's magnitudes it
    has no form for."""
    return "a DoRA adapter (magnitude vectors)" if config.use_dora else None


def per_row(config: LoraConfig) -> str | None:
    """adapter_per_row stacks plain A and B per row; variants that change the forward or the base it cannot."""
    if config.use_dora or config.fused_slices or config.init == "pissa":
        return "adapter_per_row serves plain LoRA adapters only (not DoRA, fused slices or PiSSA)"
    return None


METHOD = Method(
    name="lora", config_class=LoraConfig, peft_type="LORA", wrappers=(LoraLinear, LoraEmbedding),
    select=select, wrap=wrap, add=add, file_config=file_config, config_from_file=config_from_file,
    file_keys=FILE_KEYS, required_file_keys=("r", "lora_alpha", "target_modules"),
    from_options=from_options, learning_rate_ratios=learning_rate_ratios, gguf_adapter=gguf_adapter,
    per_row=per_row,
)
