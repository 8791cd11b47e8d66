"""The `lorafit train` flags of the built-in methods, one dataclass per method.

Kept apart from the methods' modules (which import torch) so that `lorafit train --help` lists them
at once. Each field is a flag (`--lora-plus-ratio`) and a YAML key (`lora_plus_ratio`); its docstring
is the help; `RANGES` says which values each may take. The train command refuses a flag of another method
than the one chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional


@dataclass
class LoraOptions:
    """LoRA and DoRA (--method lora | dora)."""

    r: int = 8
    """LoRA/DoRA rank."""
    alpha: float = 16.0
    """LoRA/DoRA alpha (scaling alpha / r)."""
    dropout: float = 0.05
    """LoRA/DoRA dropout on the adapter input. The one default for training runs is 0.05, what peft's examples
    and the QLoRA paper use for small models; the library's LoraConfig keeps peft's 0.0, which copies nothing."""
    use_rslora: bool = False
    """LoRA/DoRA: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r."""
    init: Literal["default", "gaussian", "pissa"] = "default"
    """LoRA/DoRA initialisation; pissa starts from the weights' top singular vectors."""
    lora_plus_ratio: float = 1.0
    """LoRA+: lora_B's learning rate is this times lora_A's (the paper suggests 16; 1 is plain LoRA)."""

    # checked before anything loads (lorafit.core.registry.check_ranges)
    RANGES: ClassVar[dict] = {"r": ">= 1", "alpha": "> 0", "dropout": "[0, 1)", "lora_plus_ratio": "> 0"}


@dataclass
class IA3Options:
    """IA3 (--method ia3)."""

    feedforward_targets: Optional[list[str]] = None
    """IA3: the targets whose input is scaled, not their output (default: the architecture's, down_proj for Llama)."""


@dataclass
class BitFitOptions:
    """BitFit (--method bitfit)."""

    add_missing_bias: bool = False
    """BitFit: give targets without a bias a zero-initialised one (Llama has none)."""
    train_head: bool = False
    """BitFit: also train the output head's weight (hidden × vocab parameters; its merge is refused when the head
    shares its weight with the input embeddings)."""
