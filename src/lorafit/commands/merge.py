"""`lorafit merge`: W <- W + s·B·A, saved as a plain transformers folder (no adapter, no lorafit needed).

The output folder gets `lorafit-merge.json` beside the model files: where the merge came from and
which files lorafit wrote. An adapter trained on a 4/8-bit base (`--quantize`, recorded in the adapter)
merges into float weights: by default the dequantized base it was trained against (`--merge-into
dequantized`), or the original float weights (`original`); re-quantizing the merged weights
(`quantized`) loses small updates and is refused without `--force-requantize`. `--overwrite` replaces only such a folder holding only those files; the
base model's folder, the adapter's, and any folder holding them are refused outright.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lorafit.commands.common import print_settings
from lorafit.commands.model_options import (
    AllowPickle,
    DoubleQuant,
    Dtype,
    ModelPath,
    Quantize,
    TrustRemoteCode,
)
from lorafit.errors import LorafitError

MARKER = "lorafit-merge.json"
# Measured on the built-in task (bench/quantized_merge.py, bench/RESULTS.md): merging into the
# dequantized base reproduces the adapter on its quantized base; see the README's "Quantized base".
DEFAULT_MERGE_INTO = "dequantized"
MergeInto = Literal["dequantized", "original", "quantized"]


@dataclass
class MergeConfig:
    """Merge an adapter into its base model and save the result for AutoModelForCausalLM.from_pretrained."""

    adapter: str
    """Adapter folder (lorafit or peft), a lorafit run folder (its adapter/) or a checkpoint of one."""
    output: str
    """Folder for the merged model."""
    model: ModelPath = None
    overwrite: bool = False
    """Replace an earlier `lorafit merge` output (only a folder it wrote, holding only its files)."""
    dtype: Dtype = None
    quantize: Quantize = None
    double_quant: DoubleQuant = False
    merge_into: Optional[MergeInto] = None
    """For an adapter trained on a quantized base: merge into the dequantized base it was trained against
    (default), the original float weights, or re-quantize the result (lossy; needs --force-requantize)."""
    force_requantize: bool = False
    """Accept that --merge-into quantized rounds away small updates (peft#2321)."""
    allow_pickle: AllowPickle = False
    trust_remote_code: TrustRemoteCode = False


def check_output(output: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse an output that is or holds an input, or that lorafit did not write; changes nothing."""
    from lorafit.train.run_folder import check_writable, is_inside

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


@dataclass
class Merged:
    """An adapter folded into its base: the plain model, its tokenizer, and how it was made."""

    model: object
    tokenizer: object
    adapter_paths: list
    """The modules the adapter changed (their weights now hold W + ΔW)."""
    quantization: object
    into: Optional[str]


def run(config: MergeConfig, echo=print, given=None) -> Path:
    from lorafit.commands.common import choose_base_model, resolve_adapter_folder
    from lorafit.files import apply_default_permissions, explain_write_errors
    from lorafit.models import resolve_model_folder

    print_settings(config)
    output = Path(config.output)
    adapter_dir = resolve_adapter_folder(config.adapter)
    spec, record = choose_base_model(config.model, adapter_dir, echo)
    protected = {"the base model's folder": resolve_model_folder(spec), "the adapter folder": adapter_dir}
    if spec is not None:
        protected["the base model"] = Path(spec)
    check_output(output, config.overwrite, protected)
    result = merge_adapter(config, adapter_dir, spec, record, echo)
    merged, tokenizer, quantization = result.model, result.tokenizer, result.quantization
    _declare_added_biases(merged)
    _check_config_describes(merged)
    # Write beside the target and rename: a crash never leaves a half-written model folder.
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        with explain_write_errors(output):
            merged.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            files = sorted(p.name for p in temporary.iterdir())
            (temporary / MARKER).write_text(json.dumps({
                "lorafit_merge": 1, "adapter": str(adapter_dir.resolve()),
                "base_model": record["model"] if record else str(spec or "default"),
                "dtype": str(merged.dtype).removeprefix("torch."), "files": files,
                **({"trained_on": quantization.to_record(), "merged_into": result.into} if quantization else {}),
            }, indent=2) + "\n", encoding="utf-8")
            apply_default_permissions(temporary)
            if output.exists():
                check_output(output, True, {})  # again: files may have appeared while the model loaded
                shutil.rmtree(output)
            os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    echo(f"merged model saved to {output}")
    return output


def merge_adapter(config: MergeConfig, adapter_dir: Path, spec, record, echo=print) -> Merged:
    """Load the base (as the adapter was trained on it), attach the adapter, fold it in: `lorafit merge`
    and `lorafit export --format gguf` both start from this."""
    from lorafit.adapters import merge_and_unload, state_of
    from lorafit.commands.common import (
        check_base_model,
        choose_quantization,
        report_quantization,
    )
    from lorafit.io import load_adapter
    from lorafit.models import load_model_and_tokenizer, parse_dtype
    from lorafit.quantize import dequantize_model

    quantization = choose_quantization(config.quantize, config.double_quant, record, adapter_dir, echo)
    into = _merge_target(config, quantization, echo)
    load_dtype = config.dtype
    if into in ("dequantized", "quantized") and quantization.compute_dtype is not None:
        load_dtype = str(quantization.compute_dtype).removeprefix("torch.")  # quantized exactly as in training
    model, tokenizer = load_model_and_tokenizer(spec, dtype=load_dtype, allow_pickle=config.allow_pickle,
                                                trust_remote_code=config.trust_remote_code,
                                                quantize=None if into == "original" else quantization)
    report_quantization(model, echo)
    check_base_model(record, model, adapter_dir, config.model)
    load_adapter(model, adapter_dir, allow_pickle=config.allow_pickle)
    paths = [path for paths in state_of(model).module_paths.values() for path in paths]
    if into == "dequantized":  # the trained-against weights, in the dtype the merged model is saved in
        save_dtype = parse_dtype(config.dtype)
        dequantize_model(model, dtype=save_dtype)
        model.to(save_dtype)
    merged = merge_and_unload(model.eval(), requantize=into == "quantized")
    return Merged(merged, tokenizer, paths, quantization, into)


def _merge_target(config: MergeConfig, quantization, echo) -> Optional[str]:
    """What the adapter merges into: None for a float base; for a quantized one, --merge-into (checked)."""
    if quantization is None:
        if config.merge_into is not None or config.force_requantize:
            raise LorafitError("--merge-into and --force-requantize apply to an adapter trained on a quantized base "
                               "(this one records none; give --quantize if it was)")
        return None
    into = config.merge_into or DEFAULT_MERGE_INTO
    if into == "quantized" and not config.force_requantize:
        raise LorafitError("--merge-into quantized re-quantizes W + ΔW, and the rounding to 4/8 bits swallows most "
                           "of a small update (peft#2321): pass --force-requantize to accept that, or merge into "
                           "float (--merge-into dequantized or original)")
    if config.force_requantize and into != "quantized":
        raise LorafitError("--force-requantize applies to --merge-into quantized")
    why = {"dequantized": "the weights the adapter was trained against, in float",
           "original": "the original float weights",
           "quantized": "re-quantized: small updates are lost"}[into]
    echo(f"merge into: {into} ({why})")
    return into


# Llama-family configs switch all attention / all MLP biases on or off with one flag each.
_BIAS_FLAGS = (("self_attn", "attention_bias"), ("mlp", "mlp_bias"))


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

    from lorafit.quantize import quantized_layers

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
