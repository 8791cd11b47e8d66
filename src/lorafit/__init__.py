"""lorafit: parameter-efficient fine-tuning (LoRA and family) in peft's file format.

    import lorafit
    model = lorafit.attach(model, lorafit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    print(lorafit.report(model))
    lorafit.save_adapter(model, "out/adapter")
"""

__version__ = "0.1.0"

from lorafit.accounting import ParameterCount, report, trainable_parameters  # noqa: E402
from lorafit.adapters import (  # noqa: E402
    active_adapters,
    adapter_names,
    adapter_per_row,
    attach,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    set_active_adapter,
    unload,
    unmerge,
)
from lorafit.config import ALL_LINEAR, BitFitConfig, FusedSlices, IA3Config, LoraConfig  # noqa: E402
from lorafit.errors import LorafitError  # noqa: E402
from lorafit.io import load_adapter, save_adapter  # noqa: E402

__all__ = [
    "ALL_LINEAR",
    "BitFitConfig",
    "FusedSlices",
    "IA3Config",
    "LoraConfig",
    "LorafitError",
    "ParameterCount",
    "active_adapters",
    "adapter_names",
    "adapter_per_row",
    "attach",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "report",
    "save_adapter",
    "set_active_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
