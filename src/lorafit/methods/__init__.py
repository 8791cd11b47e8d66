"""Adapter methods: one module each, and the registry the shared code iterates over.

Adding a method is one module that defines `METHOD` (a `registry.Method`: its config, layer, file
mapping) plus one `register(...)` line, here for the built-in ones; see the README's "Adding a method".
"""

from lorafit.methods.options import BitFitOptions, IA3Options, LoraOptions
from lorafit.methods.registry import (
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

register(MethodEntry("lora", "lorafit.methods.lora", LoraOptions, cli_names=("lora", "dora")))
register(MethodEntry("ia3", "lorafit.methods.ia3", IA3Options))
register(MethodEntry("bitfit", "lorafit.methods.bitfit", BitFitOptions))

__all__ = ["Method", "MethodEntry", "entries", "entry_for", "method_for_peft_type", "method_of", "methods",
           "register", "unregister"]
