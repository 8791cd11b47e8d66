"""The options that name and load a base model, each defined once: its type, its flag and its help.

Every command that loads a base model takes them by inheriting one of the dataclasses at the end
(`ModelSourceOptions` < `ModelFileOptions` < `ModelLoadOptions`); tyro reads the help from here. Light: no
torch, so `--help` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import tyro

from lorafit.errors import LorafitError

# The dtypes a command line names for the frozen base model (fp32 etc. are the usual short spellings).
ModelDtype = Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]

ModelPath = Annotated[Optional[str], tyro.conf.arg(help=(
    "Model folder or .gguf file; 'default' is the embedded SmolLM2-135M-Instruct, which is also what train and "
    "inspect use without it. With an adapter: by default the base the adapter records; a different one is refused."))]
Dtype = Annotated[Optional[ModelDtype], tyro.conf.arg(help=(
    "dtype the base model is loaded in. train, eval, generate: bfloat16 on a CPU with native bf16 (AMX or "
    "AVX512-BF16; adapters, optimizer and loss stay fp32), else float32 (on CUDA with bf16 autocast). merge: "
    "float32 (it saves in this dtype)."))]
AllowPickle = Annotated[bool, tyro.conf.arg(help="Allow pickle (.bin) weights, which can run code when loaded.")]
TrustRemoteCode = Annotated[bool, tyro.conf.arg(help="Run model code shipped with the model folder.")]
Quantize = Annotated[Optional[Literal["nf4", "fp4", "int8", "none"]], tyro.conf.arg(help=(
    "Store the base model's linear layers (not embeddings, head, norms) in 4-bit NF4/FP4 (QLoRA) or 8-bit with "
    "bitsandbytes; adapters train in float beside them. With an adapter: by default the quantization it was "
    "trained on (recorded in it); 'none' loads the float base."))]
DoubleQuant = Annotated[bool, tyro.conf.arg(help="With --quantize nf4/fp4: also quantize the 4-bit scales (QLoRA's "
                                            "double quantization, ~0.4 bit per weight less).")]


def quantize_settings(kind: Optional[str], double_quant: bool, flag: str = "--quantize"):
    """lorafit.models.quantize.QuantizeSettings for the flags (None for no quantization); imports no torch until used."""
    if double_quant and kind in (None, "none", "int8"):
        raise LorafitError(f"--double-quant applies to {flag} nf4 or fp4")
    if kind in (None, "none"):
        return None
    from lorafit.models.quantize import KINDS, QuantizeSettings

    if kind not in KINDS:  # a library caller's value
        raise LorafitError(f"{flag} {kind!r} is unknown; use nf4, fp4, int8 or none")
    return QuantizeSettings(kind, double_quant)


@dataclass(kw_only=True)
class ModelSourceOptions:
    """Which model: what every command that reads a model takes (inspect and estimate read only its config)."""

    model: ModelPath = None
    trust_remote_code: TrustRemoteCode = False


@dataclass(kw_only=True)
class ModelFileOptions(ModelSourceOptions):
    """Which model, and whether its weights may be pickle files (commands that read the weights)."""

    allow_pickle: AllowPickle = False


@dataclass(kw_only=True)
class ModelLoadOptions(ModelFileOptions):
    """Which model and how to load it: dtype and 4/8-bit quantization (commands that compute with it)."""

    dtype: Dtype = None
    quantize: Quantize = None
    double_quant: DoubleQuant = False
