"""Adapter methods: one module each (LoRA a package, for its layer variants), registered here, one line each.

Adding a method is one module that defines `METHOD` (a `lorafit.core.registry.Method`: its config, layer,
file mapping and what it supports) plus one `register(...)` line, here for the built-in ones; see the
README's "Adding a method". This file and the registry are the only places that name methods.
"""

from lorafit.core.registry import (
    Method,
    MethodEntry,
    entries,
    entry_for,
    method_for_peft_type,
    method_of,
    methods,
    register,
    unregister,
)
from lorafit.methods.options import BitFitOptions, IA3Options, LoraOptions

register(MethodEntry("lora", "lorafit.methods.lora", LoraOptions, cli_names=("lora", "dora"), display_name="LoRA"))
register(MethodEntry("ia3", "lorafit.methods.ia3", IA3Options, display_name="IA3"))
register(MethodEntry("bitfit", "lorafit.methods.bitfit", BitFitOptions, display_name="BitFit",
                     fsdp_refusal="its saved file holds each trained bias added to the base's, which FSDP shards"))

# what `lorafit train`, `inspect` and `estimate` use without --method
DEFAULT_METHOD = "lora"

__all__ = ["DEFAULT_METHOD", "Method", "MethodEntry", "entries", "entry_for", "method_for_peft_type", "method_of",
           "methods", "register", "unregister"]
