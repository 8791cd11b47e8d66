"""The LoRA layer (Hu et al. 2021, arXiv:2106.09685): h = W x + s · B (A x), W frozen, B starting at 0.

This is the whole plain method: two parameters per adapter, a scaling, a forward, a delta weight,
merge and unmerge. Variants that change one of those (fused slices, DoRA, PiSSA) are small strategy
objects in `lorafit.methods.lora.variants`, one per adapter that needs one; per-row (mixed-adapter) serving is
`lorafit.inference.per_row`. The base layer is reached only through `lorafit.core.base_layer.LinearBase` (sizes,
dense weight, write-back), so any base linear layer with such a view can carry LoRA. Parameter names
follow peft's in-memory layout (`lora_A.<adapter>`), so the file mapping is a rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.core.wrapper import LinearAdapterWrapper
from lorafit.errors import LorafitError
from lorafit.methods.lora.variants import FusedSlices, LoraVariant, variant_for


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings for one module, resolved from the config (per-module rank and alpha)."""

    rank: int
    scaling: float
    dropout: float
    init: str
    slices: FusedSlices | None = None
    use_dora: bool = False


class LoraLinear(LinearAdapterWrapper):
    """A frozen linear layer plus named LoRA adapters: `lora_A[name]` (r × in), `lora_B[name]` (out × r).

    The forward never copies the input when dropout is 0 and scales the rank-r intermediate, not the
    full output; a merged adapter costs nothing at inference since the base layer then runs alone.
    """

    adapter_parameter_dicts = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.lora_dropout = nn.ModuleDict()
        self.lora_variant = nn.ModuleDict()  # adapters that are not plain LoRA: their strategy
        self.specs: dict[str, AdapterSpec] = {}
        self.row_adapters = None  # set by lorafit.adapter_per_row (lorafit.inference.per_row)

    def variant(self, name: str) -> LoraVariant | None:
        return self.lora_variant[name] if name in self.lora_variant else None

    def add_adapter(self, name: str, spec: AdapterSpec, dtype: torch.dtype, module_path: str) -> None:
        variant = variant_for(spec, self, module_path)
        group_sizes = variant.group_sizes(self, spec) if variant else [self.out_features]
        smallest = min([self.in_features] + group_sizes)
        if spec.rank > smallest:
            raise LorafitError(f"r={spec.rank} is larger than min(in, out)={smallest} of {module_path} "
                               f"({self.in_features} -> {self.out_features}); choose r <= {smallest}")
        device = self.base.device
        a = torch.empty(len(group_sizes) * spec.rank, self.in_features, dtype=dtype, device=device)
        b = torch.zeros(sum(group_sizes), spec.rank, dtype=dtype, device=device)
        if spec.init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.rank)
        else:  # nn.Linear's own init for A, as in the LoRA paper's reference code
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.specs[name] = spec
        if variant is not None:
            self.lora_variant[name] = variant
            a, b = variant.start(self, name, a, b)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        if spec.dropout > 0:
            self.lora_dropout[name] = nn.Dropout(spec.dropout)

    def _forget(self, name: str) -> None:
        if name in self.lora_variant:
            self.lora_variant[name].forget(self, name)
            del self.lora_variant[name]
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        self.specs.pop(name, None)

    def restore_base(self) -> None:
        for name, variant in self.lora_variant.items():
            variant.restore_base(self, name)

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.adapters_disabled:
            return out
        if self.row_adapters is not None:
            return self.row_adapters.add_updates(self, x, out)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            variant = self.variant(name)
            out = variant.add_update(self, name, x, out) if variant else self.add_update(name, x, out)
        return out

    def adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A[name].dtype)  # no copy when the dtypes already agree
        if name in self.lora_dropout:
            x = self.lora_dropout[name](x)
        return x

    def add_update(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + s · B (A x) with the scaling and the sum folded into the second matmul (one addmm).

        Without autograd (inference) the sum is written into `out`, the base layer's fresh output, so an
        unmerged adapter costs its two thin matmuls and no extra pass over the layer's output. This runs
        once per adapted layer per token when decoding, so it reads each attribute once.
        """
        lora_a, lora_b, spec = self.lora_A[name], self.lora_B[name], self.specs[name]
        if lora_b.dtype != out.dtype:  # e.g. fp32 adapters on a bf16 base
            return out + self.update(name, x).to(out.dtype)
        if spec.dropout > 0 or x.dtype != lora_a.dtype:
            x = self.adapter_input(name, x)
        hidden = F.linear(x, lora_a).reshape(-1, spec.rank)
        if torch.is_grad_enabled() or not out.is_contiguous():
            return torch.addmm(out.reshape(-1, out.shape[-1]), hidden, lora_b.t(), alpha=spec.scaling).view(out.shape)
        return out.view(-1, out.shape[-1]).addmm_(hidden, lora_b.t(), alpha=spec.scaling).view(out.shape)

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B (A x) for one adapter, alone (the scaling multiplies r, not out, values per token)."""
        hidden = F.linear(self.adapter_input(name, x), self.lora_A[name]) * self.specs[name].scaling
        return F.linear(hidden, self.lora_B[name])

    # -- merging ----------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW as (out, in), fp32: s · B A, or what the adapter's variant makes of it."""
        variant = self.variant(name)
        return variant.delta_weight(self, name) if variant else self.plain_delta_weight(name)

    def plain_delta_weight(self, name: str) -> torch.Tensor:
        """s · B A as (out, in), fp32."""
        return self.specs[name].scaling * (self.lora_B[name].float() @ self.lora_A[name].float())

    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        weight, variant = self.base.dense_weight().float(), self.variant(name)
        return {"weight": variant.merged_weight(self, name, weight) if variant else self.added(name, weight, +1)}

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        weight, variant = self.base.dense_weight().float(), self.variant(name)
        return {"weight": variant.unmerged_weight(self, name, weight) if variant else self.added(name, weight, -1)}

    def added(self, name: str, weight: torch.Tensor, sign: int) -> torch.Tensor:
        """W ± ΔW (merging adds the update, unmerging takes it away again)."""
        return weight + sign * self.delta_weight(name).to(weight.device)

    def check_merge(self, names: list[str], module_path: str) -> None:
        super().check_merge(names, module_path)
        for name in names:  # computing a merge may leave state behind (DoRA's norms); only merge keeps it
            if name not in self.merged_adapters and name in self.lora_variant:
                self.lora_variant[name].merge_refused(self, name)

    # -- files: peft's layout; variants convert to and from it -----------------------------------------
    def file_suffixes(self, name: str) -> dict[str, str]:
        suffixes = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
        if name in self.lora_magnitude_vector:
            suffixes["lora_magnitude_vector"] = "lora_magnitude_vector"
        return suffixes

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = super().file_tensors(name)
        variant = self.variant(name)
        return variant.to_file(self, name, tensors) if variant else tensors

    def file_rank(self, name: str) -> int:
        """The rank the saved tensors have (G·r for sliced adapters, 2r for converted PiSSA ones): A's rows."""
        return self.file_tensors(name)["lora_A.weight"].shape[0]

    @torch.no_grad()
    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        variant = self.variant(name)
        if variant is not None:
            tensors = variant.from_file(self, name, tensors, where)
        super().load_file_tensors(name, tensors, where)
