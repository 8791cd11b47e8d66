"""A merged model saved as a plain transformers folder (loads with AutoModelForCausalLM, no lorafit needed).

The folder gets `lorafit-merge.json` beside the model files: where the merge came from and which files lorafit
wrote. It is written beside its target and renamed into place, so a crash never leaves a half-written model.
`overwrite` replaces only such a folder holding only those files; a folder that is or holds an input is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.files import apply_default_permissions, check_writable, explain_write_errors, is_inside

MARKER = "lorafit-merge.json"

# Llama-family configs switch all attention / all MLP biases on or off with one flag each.
_BIAS_FLAGS = (("self_attn", "attention_bias"), ("mlp", "mlp_bias"))


def check_output(output: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse an output that is or holds an input, or that lorafit did not write; changes nothing."""
    for what, path in protected.items():
        if path is not None and is_inside(path, output):
            raise LorafitError(f"--output {output} is or holds {what} ({path}); merging there would replace it: "
                               "choose another --output")
    check_writable(output)
    if not output.exists():
        return
    if not overwrite:
        raise LorafitError(f"output folder {output} exists; pass --overwrite to replace an earlier merge there")
    if not output.is_dir():
        raise LorafitError(f"--output {output} is a file; give a folder")
    try:
        written = set(json.loads((output / MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LorafitError(f"--overwrite: {output} was not written by `lorafit merge` (no readable {MARKER}); lorafit "
                           "only replaces folders it wrote: choose another --output") from None
    foreign = sorted(p.name for p in output.iterdir() if p.name not in written | {MARKER})
    if foreign:
        raise LorafitError(f"--overwrite: {output} holds files lorafit did not write ({', '.join(foreign[:5])}); move "
                           "them out or choose another --output")


def save_merged_folder(output: Path, model, tokenizer, facts: dict) -> Path:
    """Write the merged model and its tokenizer to `output` with the marker (`facts` plus the files written)."""
    _declare_added_biases(model)
    _check_config_describes(model)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        with explain_write_errors(output):
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            files = sorted(p.name for p in temporary.iterdir())
            (temporary / MARKER).write_text(json.dumps({"lorafit_merge": 1, **facts, "files": files}, indent=2) + "\n",
                                            encoding="utf-8")
            apply_default_permissions(temporary)
            if output.exists():
                check_output(output, True, {})  # again: files may have appeared while the model loaded
                shutil.rmtree(output)
            os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return output


def _declare_added_biases(model) -> None:
    """BitFit with add_missing_bias gives Linear layers biases their config does not declare.

    Where the config has a flag for the family (Llama's attention_bias, mlp_bias), switch it on and
    give the family's other Linear layers zero biases, so the saved folder loads as that architecture.
    """
    import torch
    from torch import nn

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
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.models.quantize import quantized_layers

    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(model.config)
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    quantized = tuple(f"{path}." for path, _ in quantized_layers(model))  # their scales are extra keys
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not (k.startswith(quantized) and k.rpartition(".")[2] != "bias")}
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise LorafitError(
            f"the merged model has weights its config cannot describe (e.g. {extra[0]}: a bias added by "
            "BitFit's add_missing_bias); keep the adapter unmerged and load it with lorafit instead"
        )
