"""The dtype a frozen base is loaded in: names users type, and the default for this machine, said with its reason.

On a CPU with native bf16 matmuls (AMX or AVX512-BF16) the base runs in bfloat16 by default, elsewhere in
float32; on CUDA the weights stay fp32 and the loop runs under bf16 autocast (train/step.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from lorafit.errors import LorafitError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


# CPU features with which bf16 matmuls run at native speed (oneDNN uses them): Intel AMX, AVX512-BF16.
_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16_feature() -> str | None:
    """The feature of this CPU that makes bf16 matmuls fast ("amx_bf16" or "avx512_bf16"), or None.

    Read from /proc/cpuinfo's flags (Linux, where lorafit's CPU training runs); elsewhere None, so the
    default stays float32 rather than guessing.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((f for f in _NATIVE_BF16_FLAGS if f in flags), None)
    except OSError:
        pass
    return None


def default_dtype(device: torch.device) -> torch.dtype:
    """The base dtype `lorafit train/eval/generate` use without --dtype (the library's default is float32).

    On a CPU with native bf16 the frozen base runs in bfloat16 (adapters, optimizer states and the loss
    stay fp32): measured on the built-in task as good as fp32 and faster (README, "Precision"). On CUDA
    the weights stay fp32 and the loop runs the base under bf16 autocast; other CPUs use float32.
    """
    if device.type == "cpu" and native_bf16_feature() is not None:
        return torch.bfloat16
    return torch.float32


def describe_default_dtype(device: torch.device) -> str:
    """The start-up line that says which dtype the default gave and why."""
    chosen = default_dtype(device)
    if device.type == "cuda":
        return "dtype: float32 weights, bf16 autocast on CUDA (--dtype overrides)"
    feature = native_bf16_feature()
    if chosen == torch.bfloat16:
        return f"dtype: bfloat16 base, fp32 adapters and loss (this CPU has native bf16: {feature}; --dtype overrides)"
    return "dtype: float32 (this CPU has no native bf16 matmul; --dtype overrides)"


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype or its name; None is float32 (the library's default)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise LorafitError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16")
    return _DTYPES[name]


def choose_dtype(dtype: Optional[str], echo=print) -> str:
    """The dtype asked for, or the default for this machine (`default_dtype`), saying which and why."""
    if dtype is not None:
        return dtype
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    echo(describe_default_dtype(device))
    return str(default_dtype(device)).removeprefix("torch.")
