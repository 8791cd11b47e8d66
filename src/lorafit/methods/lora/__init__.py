"""LoRA (Hu et al. 2021, arXiv:2106.09685): the method (`method`: its config, selection and peft files), the
plain layer (`layer`), its variants (`variants`: fused slices, DoRA, PiSSA) and LoRA on embeddings (`embedding`)."""

from lorafit.methods.lora.embedding import LoraEmbedding
from lorafit.methods.lora.layer import AdapterSpec, LoraLinear
from lorafit.methods.lora.method import METHOD, LoraConfig
from lorafit.methods.lora.variants import FusedSlices

__all__ = ["METHOD", "AdapterSpec", "FusedSlices", "LoraConfig", "LoraEmbedding", "LoraLinear"]
