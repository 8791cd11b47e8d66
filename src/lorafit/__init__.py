"""lorafit: parameter-efficient fine-tuning (LoRA and family) in peft's file format.

    import lorafit
    model = lorafit.attach(model, lorafit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    print(lorafit.report(model))
    lorafit.save_adapter(model, "out/adapter")

The public names are imported on first use (PEP 562): `import lorafit` itself loads neither torch
nor transformers, so `lorafit --help` answers at once while `lorafit.attach` works as usual.
"""

from __future__ import annotations

import importlib

from lorafit.version import __version__ as __version__

# public name -> the module that defines it
_EXPORTS = {
    "ParameterCount": "lorafit.core.accounting",
    "report": "lorafit.core.accounting",
    "trainable_parameters": "lorafit.core.accounting",
    "active_adapters": "lorafit.core.adapters",
    "adapter_names": "lorafit.core.adapters",
    "adapter_per_row": "lorafit.inference.per_row",
    "attach": "lorafit.core.adapters",
    "delete_adapter": "lorafit.core.adapters",
    "disable_adapters": "lorafit.core.adapters",
    "merge": "lorafit.core.adapters",
    "merge_and_unload": "lorafit.core.adapters",
    "set_active_adapter": "lorafit.core.adapters",
    "unload": "lorafit.core.adapters",
    "unmerge": "lorafit.core.adapters",
    "ALL_LINEAR": "lorafit.core.selection",
    "BitFitConfig": "lorafit.methods.bitfit",
    "FusedSlices": "lorafit.methods.lora.variants",
    "IA3Config": "lorafit.methods.ia3",
    "LoraConfig": "lorafit.methods.lora.method",
    "LorafitError": "lorafit.errors",
    "load_adapter": "lorafit.formats.peft",
    "load_model_and_tokenizer": "lorafit.models.loading",
    "QuantizeSettings": "lorafit.models.quantize",
    "dequantize_model": "lorafit.models.quantize",
    "quantize_model": "lorafit.models.quantize",
    "save_adapter": "lorafit.formats.peft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
