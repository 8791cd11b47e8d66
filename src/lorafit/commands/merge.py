"""`lorafit merge`: W <- W + s·B·A, saved as a plain transformers folder (no adapter, no lorafit needed)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
