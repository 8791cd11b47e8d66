"""LoRA layers (Hu et al. 2021, arXiv:2106.09685): h = W x + s · B (A x), W frozen, B initialised to 0.

Two wrappers: `LoraLinear` for nn.Linear and transformers' Conv1D (GPT-2 stores W transposed; the
adapter tensors keep the Linear layout, only merging transposes), optionally adapting chosen slices
of a fused projection; and `LoraEmbedding` for nn.Embedding. Parameter names follow peft's in-memory
layout (`lora_A.<adapter>`, `lora_embedding_A.<adapter>`) so the file mapping stays a rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.config import FusedSlices
from lorafit.errors import LorafitError
from lorafit.methods.base import AdapterWrapper


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings for one module, resolved from the config (per-module rank and alpha)."""

    rank: int
    scaling: float
    dropout: float
    init: str
    slices: FusedSlices | None = None


class _RowIndex(nn.Module):
    """Output rows a sliced adapter writes to, as a buffer so it follows the model across devices."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__()
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long), persistent=False)


class LoraLinear(AdapterWrapper):
    """A frozen nn.Linear / Conv1D plus named LoRA adapters.

    Per adapter: `lora_A[name]` is (G·r × in) and `lora_B[name]` is (rows × r), where G is the number
    of adapted slices (1 unless `slices` is given) and rows the output rows they cover (all by default).
    The forward never copies the input when dropout is 0 and scales the rank-r intermediate, not the
    full output; merged adapters cost nothing at inference since the base layer then runs alone.
    """

    adapter_parameter_dicts = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        from transformers.pytorch_utils import Conv1D

        # Conv1D computes x @ W + b with W stored (in, out): the transpose of nn.Linear's layout.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        rows, cols = base_layer.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_slice_rows = nn.ModuleDict()
        self.specs: dict[str, AdapterSpec] = {}

    def add_adapter(self, name: str, spec: AdapterSpec, dtype: torch.dtype, module_path: str) -> None:
        groups = spec.slices.adapt if spec.slices else ()
        group_rows = [spec.slices.rows_of(g) for g in groups] if spec.slices else [list(range(self.out_features))]
        if spec.slices and spec.slices.total_rows != self.out_features:
            raise LorafitError(
                f"fused_slices for {module_path}: sizes add up to {spec.slices.total_rows} rows but the layer "
                f"has {self.out_features} outputs"
            )
        smallest = min([self.in_features] + [len(rows) for rows in group_rows])
        if spec.rank > smallest:
            raise LorafitError(
                f"r={spec.rank} is larger than min(in, out)={smallest} of {module_path} "
                f"({self.in_features} -> {self.out_features}); choose r <= {smallest}"
            )
        device = self.base_layer.weight.device
        a = torch.empty(len(group_rows) * spec.rank, self.in_features, dtype=dtype, device=device)
        b = torch.zeros(sum(len(rows) for rows in group_rows), spec.rank, dtype=dtype, device=device)
        if spec.init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.rank)
        else:  # nn.Linear's own init for A, as in the LoRA paper's reference code
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        if spec.dropout > 0:
            self.lora_dropout[name] = nn.Dropout(spec.dropout)
        if spec.slices:
            self.lora_slice_rows[name] = _RowIndex([r for rows in group_rows for r in rows]).to(device)
        self.specs[name] = spec

    def _forget(self, name: str) -> None:
        for modules in (self.lora_dropout, self.lora_slice_rows):
            if name in modules:
                del modules[name]
        self.specs.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.adapters_disabled:
            return out
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            delta = self._bypass(name, x).to(out.dtype)
            if name in self.lora_slice_rows:
                out = out.index_add(-1, self.lora_slice_rows[name].rows, delta)
            else:
                out = out + delta
        return out

    def _bypass(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B (A x) for one adapter: only the output rows it covers when it is sliced."""
        lora_a, lora_b, spec = self.lora_A[name], self.lora_B[name], self.specs[name]
        x = x.to(lora_a.dtype)  # no copy when the dtypes already agree
        if name in self.lora_dropout:
            x = self.lora_dropout[name](x)
        hidden = F.linear(x, lora_a) * spec.scaling  # the scaling costs r, not out, multiplies per token
        if spec.slices is None:
            return F.linear(hidden, lora_b)
        group_sizes = [len(spec.slices.rows_of(g)) for g in spec.slices.adapt]
        parts = zip(hidden.split(spec.rank, dim=-1), lora_b.split(group_sizes, dim=0))
        return torch.cat([F.linear(h, b) for h, b in parts], dim=-1)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A in the base layer's own layout ((out, in) for Linear, (in, out) for Conv1D), fp32."""
        lora_a, lora_b, spec = self.lora_A[name].float(), self.lora_B[name].float(), self.specs[name]
        if spec.slices is None:
            delta = lora_b @ lora_a
        else:
            delta = torch.zeros(self.out_features, self.in_features, device=lora_a.device)
            row_start = 0
            for group, name_of_slice in enumerate(spec.slices.adapt):
                rows = spec.slices.rows_of(name_of_slice)
                a_group = lora_a[group * spec.rank : (group + 1) * spec.rank]
                b_group = lora_b[row_start : row_start + len(rows)]
                delta[torch.tensor(rows, device=delta.device)] = b_group @ a_group
                row_start += len(rows)
        delta = delta * spec.scaling
        return delta.T if self.fan_in_fan_out else delta

    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        weight = self.base_layer.weight
        return {"weight": weight.float() + self.delta_weight(name).to(weight.device)}

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        weight = self.base_layer.weight
        return {"weight": weight.float() - self.delta_weight(name).to(weight.device)}

    # -- the peft file layout (a sliced adapter is exported as an exact full-rank-G·r LoRA) -----------
    def export_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as peft stores them: A (r' × in), B (out × r'), with r' = G·r for sliced adapters."""
        lora_a, lora_b, spec = self.lora_A[name], self.lora_B[name], self.specs[name]
        if spec.slices is None:
            return lora_a.detach(), lora_b.detach()
        full_b = torch.zeros(self.out_features, lora_a.shape[0], dtype=lora_b.dtype, device=lora_b.device)
        row_start = 0
        for group, name_of_slice in enumerate(spec.slices.adapt):
            rows = torch.tensor(spec.slices.rows_of(name_of_slice), device=full_b.device)
            cols = slice(group * spec.rank, (group + 1) * spec.rank)
            full_b[rows, cols] = lora_b.detach()[row_start : row_start + len(rows)]
            row_start += len(rows)
        return lora_a.detach(), full_b

    @torch.no_grad()
    def import_tensors(self, name: str, lora_a: torch.Tensor, full_b: torch.Tensor, where: str) -> None:
        """Inverse of export_tensors; refuses a sliced adapter whose off-slice entries are not zero."""
        spec = self.specs[name]
        if spec.slices is None:
            self.lora_A[name].copy_(lora_a)
            self.lora_B[name].copy_(full_b)
            return
        packed, kept = [], torch.zeros_like(full_b, dtype=torch.bool)
        for group, name_of_slice in enumerate(spec.slices.adapt):
            rows = torch.tensor(spec.slices.rows_of(name_of_slice), device=full_b.device)
            cols = slice(group * spec.rank, (group + 1) * spec.rank)
            packed.append(full_b[rows, cols])
            kept[rows, cols] = True
        outside = full_b[~kept]
        if outside.numel() and bool((outside != 0).any()):
            raise LorafitError(f"{where}: lora_B has non-zero entries outside the adapted slices of a fused layer")
        self.lora_A[name].copy_(lora_a)
        self.lora_B[name].copy_(torch.cat(packed, dim=0))

    def export_rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]


class LoraEmbedding(AdapterWrapper):
    """A frozen nn.Embedding plus named LoRA adapters: E[ids] + s · (A^T[ids]) B^T.

    A (r × vocab) starts at zero and B (dim × r) Gaussian, the mirror image of LoraLinear, so that the
    bypass again starts at exactly zero (a zero B would leave A without gradient through the lookup).
    """

    adapter_parameter_dicts = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.fan_in_fan_out = False
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}

    def add_adapter(self, name: str, spec: AdapterSpec, dtype: torch.dtype, module_path: str) -> None:
        if spec.slices is not None:
            raise LorafitError(f"fused_slices names {module_path}, an embedding; slices apply to linear layers only")
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
        self.specs.pop(name, None)

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

    def export_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name].detach(), self.lora_embedding_B[name].detach()

    @torch.no_grad()
    def import_tensors(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, where: str) -> None:
        self.lora_embedding_A[name].copy_(lora_a)
        self.lora_embedding_B[name].copy_(lora_b)

    def export_rank(self, name: str) -> int:
        return self.lora_embedding_A[name].shape[0]


def wrap(module: nn.Module) -> AdapterWrapper:
    """The LoRA wrapper for a Linear, Conv1D or Embedding module."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    return LoraLinear(module)
