"""`lorafit merge`: W <- W + s·B·A, saved as a plain transformers folder (no adapter, no lorafit needed)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lorafit.adapters import merge_and_unload
from lorafit.commands.common import load_model_with_adapter
from lorafit.errors import LorafitError
from lorafit.files import explain_write_errors


@dataclass
class MergeConfig:
    """Merge an adapter into its base model and save the result for AutoModelForCausalLM.from_pretrained."""

    adapter: str
    """Adapter folder (lorafit or peft)."""
    output: str
    """Folder for the merged model."""
    model: Optional[str] = None
    """Base model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    dtype: Optional[str] = None
    """dtype to load and save in (default float32)."""
    allow_pickle: bool = False
    """Allow pickle (.bin) weights."""
    trust_remote_code: bool = False
    """Run model code shipped with the model folder."""


def run(config: MergeConfig, echo=print) -> Path:
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise LorafitError(f"output folder {output} exists; pass --overwrite to replace it")
    model, tokenizer = load_model_with_adapter(config.model, config.adapter, dtype=config.dtype,
                                               allow_pickle=config.allow_pickle,
                                               trust_remote_code=config.trust_remote_code)
    merged = merge_and_unload(model)
    _declare_added_biases(merged)
    _check_config_describes(merged)
    # Write beside the target and rename: a crash never leaves a half-written model folder.
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        with explain_write_errors(output):
            merged.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            if output.exists():
                shutil.rmtree(output)
            os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    echo(f"merged model saved to {output}")
    return output


# Llama-family configs switch all attention / all MLP biases on or off with one flag each.
_BIAS_FLAGS = (("self_attn", "attention_bias"), ("mlp", "mlp_bias"))


def _declare_added_biases(model) -> None:
    """BitFit with add_missing_bias gives Linear layers biases their config does not declare.

    Where the config has a flag for the family (Llama's attention_bias, mlp_bias), switch it on and
    give the family's other Linear layers zero biases, so the saved folder loads as that architecture.
    """
    for family, flag in _BIAS_FLAGS:
        if getattr(model.config, flag, True):
            continue
        linears = [m for p, m in model.named_modules() if f".{family}." in f".{p}" and isinstance(m, nn.Linear)]
        if any(m.bias is not None for m in linears):
            setattr(model.config, flag, True)
            for module in linears:
                if module.bias is None:
                    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                           device=module.weight.device), requires_grad=False)


def _check_config_describes(model) -> None:
    """Refuse to save a folder whose config.json would rebuild a model without some merged weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(model.config)
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise LorafitError(
            f"the merged model has weights its config cannot describe (e.g. {extra[0]}: a bias added by "
            "BitFit's add_missing_bias); keep the adapter unmerged and load it with lorafit instead"
        )
