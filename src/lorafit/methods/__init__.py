"""One module per method; each provides select, wrap, add and WRAPPERS for `lorafit.attach`."""

from lorafit.methods import bitfit, ia3, lora

METHODS = {"lora": lora, "ia3": ia3, "bitfit": bitfit}
