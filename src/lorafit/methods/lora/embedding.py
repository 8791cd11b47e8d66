"""LoRA on an embedding (Hu et al. 2021): E[ids] + s · (Aᵀ[ids]) Bᵀ, with E frozen.

The mirror image of the linear layer: A (r × vocab) starts at zero and B (dim × r) Gaussian, so the
bypass again starts at exactly zero (a zero B would leave A without gradient through the lookup).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.core.wrapper import AdapterWrapper
from lorafit.errors import LorafitError
from lorafit.methods.lora.layer import AdapterSpec


class LoraEmbedding(AdapterWrapper):
    """A frozen nn.Embedding plus named LoRA adapters: E[ids] + s · (A^T[ids]) B^T.

    A (r × vocab) starts at zero and B (dim × r) Gaussian, the mirror image of LoraLinear, so that the
    bypass again starts at exactly zero (a zero B would leave A without gradient through the lookup).
    """

    adapter_parameter_dicts = ("lora_embedding_A", "lora_embedding_B")
    takes_base_weight_from_file = True

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.fan_in_fan_out = False
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        # A peft file may bring the embedding's own weight (see replace_base_weight): the adapter it came
        # with, and the weight it replaced, kept (out of the state dict) to give back on unload/delete.
        self.base_weight_owner: str | None = None
        self.register_buffer("original_base_weight", None, persistent=False)

    def add_adapter(self, name: str, spec: AdapterSpec, dtype: torch.dtype, module_path: str) -> None:
        if spec.slices is not None or spec.use_dora or spec.init == "pissa":
            raise LorafitError(f"{module_path} is an embedding: fused_slices, DoRA and PiSSA apply to linear layers only")
        smallest = min(self.num_embeddings, self.embedding_dim)
        if spec.rank > smallest:
            raise LorafitError(f"r={spec.rank} is larger than min(vocab, dim)={smallest} of {module_path}")
        device = self.base_layer.weight.device
        a = torch.zeros(spec.rank, self.num_embeddings, dtype=dtype, device=device)
        b = torch.empty(self.embedding_dim, spec.rank, dtype=dtype, device=device)
        nn.init.normal_(b, std=1.0 / spec.rank if spec.init == "gaussian" else 1.0)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.specs[name] = spec

    def _forget(self, name: str) -> None:
        if name == self.base_weight_owner:
            self.restore_base()
        self.specs.pop(name, None)

    def check_delete(self, name: str, module_path: str) -> None:
        super().check_delete(name, module_path)
        if name == self.base_weight_owner and self.merged_adapters:
            raise LorafitError(f"adapter {name!r} brought the base weight of {module_path}, into which "
                               f"{self.merged_adapters[0]!r} is merged; unmerge(model) before deleting it")

    @torch.no_grad()
    def replace_base_weight(self, name: str, weight: torch.Tensor) -> None:
        """Use the base weight adapter `name`'s file holds (peft saves it when the embedding was trained).

        The weight from before the first replacement is kept, so unloading gives back the model as it was.
        """
        if self.original_base_weight is None:
            self.original_base_weight = self.base_layer.weight.detach().clone()
        self.base_weight_owner = name
        self.base_layer.weight.copy_(weight)

    @torch.no_grad()
    def restore_base(self) -> None:
        if self.original_base_weight is not None:
            self.base_layer.weight.copy_(self.original_base_weight)
        self.original_base_weight = None
        self.base_weight_owner = None

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)
        if self.adapters_disabled:
            return out
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            lora_a, lora_b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            hidden = F.embedding(ids, lora_a.T, padding_idx=self.base_layer.padding_idx) * self.specs[name].scaling
            out = out + F.linear(hidden, lora_b).to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · (B A)^T in the embedding's (vocab, dim) layout, fp32."""
        lora_a, lora_b = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (lora_b @ lora_a).T * self.specs[name].scaling

    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        weight = self.base_layer.weight
        return {"weight": weight.float() + self.delta_weight(name).to(weight.device)}

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        weight = self.base_layer.weight
        return {"weight": weight.float() - self.delta_weight(name).to(weight.device)}

    def file_suffixes(self, name: str) -> dict[str, str]:
        return {"lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B"}

    def file_rank(self, name: str) -> int:
        return self.lora_embedding_A[name].shape[0]
