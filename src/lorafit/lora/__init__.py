"""The LoRA layers: the plain layer (layer.py), its variants (variants.py), embeddings, per-row serving."""

from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.layer import AdapterSpec, LoraLinear
from lorafit.lora.variants import FusedSlices

__all__ = ["AdapterSpec", "FusedSlices", "LoraEmbedding", "LoraLinear"]
