"""LoRA layers (Hu et al. 2021, arXiv:2106.09685): h = W x + s · B (A x), W frozen, B initialised to 0.

Two wrappers: `LoraLinear` for nn.Linear and transformers' Conv1D (GPT-2 stores W transposed; the
adapter tensors keep the Linear layout, only merging transposes), and `LoraEmbedding`. Variants on
LoraLinear, each a per-adapter setting:
- fused slices: adapt chosen output slices of a fused projection (ChatGLM's query_key_value);
- DoRA (Liu et al. 2024, arXiv:2402.09353): W' = m · (W + sBA) / ‖W + sBA‖, the norm taken per output
  row and detached from the graph, as the paper recommends;
- PiSSA (Meng et al. 2024, arXiv:2404.02948): A, B start from the top-r singular vectors of W and the
  base weight becomes the residual W - sBA, so the output is unchanged at step 0.
Parameter names follow peft's in-memory layout (`lora_A.<adapter>`), so the file mapping is a rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.config import FusedSlices, LoraConfig, pattern_key_matches
from lorafit.errors import LorafitError
from lorafit.methods.base import AdapterWrapper, linear_layout
from lorafit.targeting import select_modules


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings for one module, resolved from the config (per-module rank and alpha)."""

    rank: int
    scaling: float
    dropout: float
    init: str
    slices: FusedSlices | None = None
    use_dora: bool = False


class _Buffers(nn.Module):
    """Per-adapter tensors that are not trained, as buffers so they follow the model across devices."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value, persistent=False)


class LoraLinear(AdapterWrapper):
    """A frozen nn.Linear / Conv1D plus named LoRA adapters.

    Per adapter: `lora_A[name]` is (G·r × in) and `lora_B[name]` is (rows × r), where G is the number
    of adapted slices (1 unless `slices` is given) and rows the output rows they cover (all by default).
    The forward never copies the input when dropout is 0 and scales the rank-r intermediate, not the
    full output; merged adapters cost nothing at inference since the base layer then runs alone.
    """

    adapter_parameter_dicts = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out, self.in_features, self.out_features = linear_layout(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.lora_dropout = nn.ModuleDict()
        self.lora_slice_rows = nn.ModuleDict()  # sliced adapters: the output rows they write
        self.lora_pissa_init = nn.ModuleDict()  # PiSSA adapters: A0, B0 (to convert and to restore W)
        self.lora_dora_norms = nn.ModuleDict()  # merged DoRA adapters: the norms used (to unmerge)
        self.specs: dict[str, AdapterSpec] = {}
        self.row_adapters: list[str] | None = None  # set by lorafit.adapter_per_row: one adapter per batch row

    # -- layout helpers -------------------------------------------------------------------------------
    def _linear_weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the layer stores."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def _to_base_layout(self, linear_weight: torch.Tensor) -> torch.Tensor:
        return linear_weight.T if self.fan_in_fan_out else linear_weight

    def _group_rows(self, spec: AdapterSpec) -> list[list[int]]:
        if spec.slices is None:
            return [list(range(self.out_features))]
        return [spec.slices.rows_of(g) for g in spec.slices.adapt]

    # -- adding ---------------------------------------------------------------------------------------
    def add_adapter(self, name: str, spec: AdapterSpec, dtype: torch.dtype, module_path: str) -> None:
        if spec.slices and spec.slices.total_rows != self.out_features:
            raise LorafitError(
                f"fused_slices for {module_path}: sizes add up to {spec.slices.total_rows} rows but the layer "
                f"has {self.out_features} outputs"
            )
        if spec.slices and (spec.use_dora or spec.init == "pissa"):
            raise LorafitError(f"{module_path}: fused_slices cannot be combined with DoRA or PiSSA")
        group_rows = self._group_rows(spec)
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
        if spec.init == "pissa" and device.type != "meta":
            a, b = self._pissa_start(spec, dtype)
            self.lora_pissa_init[name] = _Buffers(a=a.clone(), b=b.clone())
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        if spec.use_dora:
            norms = self._linear_weight().detach().float().norm(dim=1)  # BA = 0: ‖W‖ per output row
            self.lora_magnitude_vector[name] = nn.Parameter(norms.to(dtype))
        if spec.dropout > 0:
            self.lora_dropout[name] = nn.Dropout(spec.dropout)
        if spec.slices:
            rows = [r for group in group_rows for r in group]
            self.lora_slice_rows[name] = _Buffers(rows=torch.tensor(rows, dtype=torch.long, device=device))
        self.specs[name] = spec

    @torch.no_grad()
    def _pissa_start(self, spec: AdapterSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B from the top-r singular triplets of W (so s·B·A is W's best rank-r part); W becomes the rest."""
        weight = self._linear_weight().float()
        u, singular, vh = torch.linalg.svd(weight, full_matrices=False)
        root = singular[: spec.rank].sqrt() / math.sqrt(spec.scaling)
        a = root[:, None] * vh[: spec.rank]
        b = u[:, : spec.rank] * root[None, :]
        residual = weight - spec.scaling * (b @ a)
        self.base_layer.weight.copy_(self._to_base_layout(residual).to(self.base_layer.weight.dtype))
        return a.to(dtype), b.to(dtype)

    def _forget(self, name: str) -> None:
        if name in self.lora_pissa_init:
            self._restore_pissa_base(name)
        for modules in (self.lora_dropout, self.lora_slice_rows, self.lora_pissa_init, self.lora_dora_norms):
            if name in modules:
                del modules[name]
        self.specs.pop(name, None)

    @torch.no_grad()
    def _restore_pissa_base(self, name: str) -> None:
        """W_residual + s·B0·A0 = the original W: what unloading a PiSSA adapter must give back."""
        init = self.lora_pissa_init[name]
        original = self._linear_weight().float() + self.specs[name].scaling * (init.b.float() @ init.a.float())
        self.base_layer.weight.copy_(self._to_base_layout(original).to(self.base_layer.weight.dtype))

    def restore_base(self) -> None:
        for name in list(self.lora_pissa_init):
            self._restore_pissa_base(name)

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.adapters_disabled:
            return out
        if self.row_adapters is not None:
            return self._add_per_row_bypass(x, out)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            spec = self.specs[name]
            if spec.use_dora:
                out = self._dora(name, x, out)
            elif spec.slices is not None:
                out = out.index_add(-1, self.lora_slice_rows[name].rows, self._bypass(name, x).to(out.dtype))
            else:
                out = self._add_bypass(name, spec, x, out)
        return out

    def _adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A[name].dtype)  # no copy when the dtypes already agree
        if name in self.lora_dropout:
            x = self.lora_dropout[name](x)
        return x

    def _add_bypass(self, name: str, spec: AdapterSpec, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + s · B (A x) with the scaling and the sum folded into the second matmul (one addmm).

        Without autograd (inference) the sum is written into `out`, the base layer's fresh output, so an
        unmerged adapter costs its two thin matmuls and no extra pass over the layer's output. This runs
        once per adapted layer per token when decoding, so it reads each attribute once.
        """
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if lora_b.dtype != out.dtype:  # e.g. fp32 adapters on a bf16 base
            return out + self._bypass(name, x).to(out.dtype)
        if spec.dropout > 0 or x.dtype != lora_a.dtype:
            x = self._adapter_input(name, x)
        hidden = F.linear(x, lora_a).reshape(-1, spec.rank)
        if torch.is_grad_enabled() or not out.is_contiguous():
            return torch.addmm(out.reshape(-1, out.shape[-1]), hidden, lora_b.t(), alpha=spec.scaling).view(out.shape)
        return out.view(-1, out.shape[-1]).addmm_(hidden, lora_b.t(), alpha=spec.scaling).view(out.shape)

    def _bypass(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B (A x) for one adapter: only the output rows it covers when it is sliced."""
        lora_a, lora_b, spec = self.lora_A[name], self.lora_B[name], self.specs[name]
        hidden = F.linear(self._adapter_input(name, x), lora_a) * spec.scaling  # r, not out, multiplies per token
        if spec.slices is None:
            return F.linear(hidden, lora_b)
        group_sizes = [len(spec.slices.rows_of(g)) for g in spec.slices.adapt]
        parts = zip(hidden.split(spec.rank, dim=-1), lora_b.split(group_sizes, dim=0))
        return torch.cat([F.linear(h, b) for h, b in parts], dim=-1)

    def _add_per_row_bypass(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Row i of the batch through adapter row_adapters[i], all rows in two batched matmuls.

        The distinct adapters' A and s·B are stacked (zero-padded to the largest rank; a zero row adds
        nothing) and gathered per row, so the cost is one bmm pair, not a Python loop over adapters.
        Rows whose adapter does not touch this module get zeros. Without autograd the gathered stacks
        are kept until the adapters' weights change (decoding reuses them for every new token).
        """
        names = self.row_adapters
        if len(names) != x.shape[0]:
            raise LorafitError(f"adapter_per_row names {len(names)} adapters for a batch of {x.shape[0]} rows")
        if torch.is_grad_enabled():
            rows_a, rows_b = self._gather_row_adapters(names, x.device)
        else:
            rows_a, rows_b = self._cached_row_adapters(names, x.device)
        rows_x = x.reshape(x.shape[0], -1, self.in_features).to(rows_a.dtype)
        hidden = torch.bmm(rows_x, rows_a)
        if out.dtype == rows_b.dtype and not torch.is_grad_enabled() and out.is_contiguous():
            return out.view(out.shape[0], -1, self.out_features).baddbmm_(hidden, rows_b).view(out.shape)
        return out + torch.bmm(hidden, rows_b).reshape(out.shape).to(out.dtype)

    def _gather_row_adapters(self, names: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: Aᵀ (in × r) and (s·B)ᵀ (r × out) of that row's adapter, ready for bmm."""
        distinct = list(dict.fromkeys(names))
        rank = max((self.lora_A[n].shape[0] for n in distinct if n in self.lora_A), default=1)
        reference = next(iter(self.lora_A.values()))
        stacked_a = reference.new_zeros(len(distinct), rank, self.in_features)
        stacked_b = reference.new_zeros(len(distinct), self.out_features, rank)
        for index, name in enumerate(distinct):
            if name in self.lora_A:
                r = self.lora_A[name].shape[0]
                stacked_a[index, :r] = self.lora_A[name]
                stacked_b[index, :, :r] = self.lora_B[name] * self.specs[name].scaling
        rows = torch.tensor([distinct.index(n) for n in names], device=device)
        return stacked_a[rows].transpose(1, 2), stacked_b[rows].transpose(1, 2)

    def _cached_row_adapters(self, names: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        involved = [t for n in dict.fromkeys(names) if n in self.lora_A for t in (self.lora_A[n], self.lora_B[n])]
        key = (tuple(names), str(device), tuple((id(t), t._version) for t in involved))
        cached = getattr(self, "_row_adapter_cache", None)
        if cached is None or cached[0] != key:
            rows_a, rows_b = self._gather_row_adapters(names, device)
            cached = (key, rows_a.contiguous(), rows_b.contiguous())
            self._row_adapter_cache = cached
        return cached[1], cached[2]

    def _dora_column_norm(self, name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, detached: the paper's trick to save memory and keep training stable."""
        lora_a, lora_b, spec = self.lora_A[name], self.lora_B[name], self.specs[name]
        weight = self._linear_weight().to(lora_a.dtype)
        return (weight + spec.scaling * (lora_b @ lora_a)).norm(dim=1).detach()

    def _dora(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """m/‖W+sBA‖ ⊙ (W x + s B A x) + b, computed from the base output that is already there."""
        scale = (self.lora_magnitude_vector[name] / self._dora_column_norm(name)).to(out.dtype)
        bias = self.base_layer.bias
        without_bias = out - bias if bias is not None else out
        return out + (scale - 1) * without_bias + scale * self._bypass(name, x).to(out.dtype)

    # -- merging ------------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A as (out, in), fp32."""
        lora_a, lora_b, spec = self.lora_A[name].float(), self.lora_B[name].float(), self.specs[name]
        if spec.slices is None:
            return spec.scaling * (lora_b @ lora_a)
        delta = torch.zeros(self.out_features, self.in_features, device=lora_a.device)
        row_start = 0
        for group, rows in enumerate(self._group_rows(spec)):
            a_group = lora_a[group * spec.rank : (group + 1) * spec.rank]
            b_group = lora_b[row_start : row_start + len(rows)]
            delta[torch.tensor(rows, device=delta.device)] = b_group @ a_group
            row_start += len(rows)
        return spec.scaling * delta

    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        weight = self._linear_weight().float()
        merged = weight + self.delta_weight(name).to(weight.device)
        if self.specs[name].use_dora:
            norms = merged.norm(dim=1)
            merged = merged * (self.lora_magnitude_vector[name].float() / norms)[:, None]
            self.lora_dora_norms[name] = _Buffers(norms=norms.detach())
        return {"weight": self._to_base_layout(merged)}

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        weight = self._linear_weight().float()
        if self.specs[name].use_dora:
            norms = self.lora_dora_norms[name].norms
            weight = weight * (norms / self.lora_magnitude_vector[name].float())[:, None]
        return {"weight": self._to_base_layout(weight - self.delta_weight(name).to(weight.device))}

    def check_merge(self, names: list[str], module_path: str) -> None:
        super().check_merge(names, module_path)
        for name in names:  # check_merge computed DoRA norms as a side effect; only merge keeps them
            if name not in self.merged_adapters and name in self.lora_dora_norms:
                del self.lora_dora_norms[name]

    # -- files (peft's layout; sliced and PiSSA adapters exported as exact plain LoRAs) ---------------------
    def file_suffixes(self, name: str) -> dict[str, str]:
        suffixes = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
        if self.specs[name].use_dora:
            suffixes["lora_magnitude_vector"] = "lora_magnitude_vector"
        return suffixes

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = super().file_tensors(name)
        lora_a, lora_b, spec = tensors["lora_A.weight"], tensors["lora_B.weight"], self.specs[name]
        if spec.slices is not None:  # B zero outside each slice's rows and columns: the same s·B·A
            full_b = torch.zeros(self.out_features, lora_a.shape[0], dtype=lora_b.dtype, device=lora_b.device)
            row_start = 0
            for group, rows in enumerate(self._group_rows(spec)):
                cols = slice(group * spec.rank, (group + 1) * spec.rank)
                full_b[torch.tensor(rows, device=full_b.device), cols] = lora_b[row_start : row_start + len(rows)]
                row_start += len(rows)
            tensors["lora_B.weight"] = full_b
        if name in self.lora_pissa_init:  # relative to the untouched W: s·B·A - s·B0·A0, a rank-2r LoRA
            init = self.lora_pissa_init[name]
            tensors["lora_A.weight"] = torch.cat([lora_a, init.a.to(lora_a.dtype)], dim=0)
            tensors["lora_B.weight"] = torch.cat([lora_b, -init.b.to(lora_b.dtype)], dim=1)
        return tensors

    def file_rank(self, name: str) -> int:
        """The rank the saved tensors have (G·r for sliced adapters, 2r for converted PiSSA ones)."""
        rank = self.lora_A[name].shape[0]
        return rank * 2 if name in self.lora_pissa_init else rank

    @torch.no_grad()
    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        spec = self.specs[name]
        if spec.slices is not None:
            full_b = tensors["lora_B.weight"]
            packed, kept = [], torch.zeros_like(full_b, dtype=torch.bool)
            for group, rows in enumerate(self._group_rows(spec)):
                rows = torch.tensor(rows, device=full_b.device)
                cols = slice(group * spec.rank, (group + 1) * spec.rank)
                packed.append(full_b[rows, cols])
                kept[rows, cols] = True
            outside = full_b[~kept]
            if outside.numel() and bool((outside != 0).any()):
                raise LorafitError(f"{where}: lora_B has non-zero entries outside the adapted slices of a fused layer")
            tensors = {**tensors, "lora_B.weight": torch.cat(packed, dim=0)}
        super().load_file_tensors(name, tensors, where)


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


WRAPPERS = (LoraLinear, LoraEmbedding)


def select(model: nn.Module, config: LoraConfig) -> list[str]:
    paths = select_modules(model, config)
    for option in ("rank_pattern", "alpha_pattern", "fused_slices"):
        for key in getattr(config, option):
            if not any(pattern_key_matches(key, p) for p in paths):
                raise LorafitError(
                    f"{option} key {key!r} matches none of the adapted modules "
                    f"(e.g. {', '.join(paths[:3])}); it would have no effect"
                )
    return paths


def wrap(module: nn.Module) -> AdapterWrapper:
    """The LoRA wrapper for a Linear, Conv1D or Embedding module."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    return LoraLinear(module)


def add(wrapper, name: str, config: LoraConfig, module_path: str, dtype: torch.dtype, model) -> None:
    spec = AdapterSpec(rank=config.rank_for(module_path), scaling=config.scaling_for(module_path),
                       dropout=config.dropout, init=config.init, slices=config.slices_for(module_path),
                       use_dora=config.use_dora)
    wrapper.add_adapter(name, spec, dtype, module_path)
