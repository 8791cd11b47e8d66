"""LoRA variants: what fused slices, DoRA and PiSSA change about one adapter of a LoraLinear.

Each variant is a small module (its buffers follow the model across devices) held per adapter in
`LoraLinear.lora_variant`; a plain LoRA adapter has none. A variant overrides only what differs:
- fused slices: adapt chosen output slices of a fused projection (ChatGLM's query_key_value), one
  rank-r pair per slice, saved as the equivalent full-width LoRA;
- DoRA (Liu et al. 2024, arXiv:2402.09353): W' = m · (W + sBA) / ‖W + sBA‖, the norm taken per output
  row and detached from the graph, as the paper recommends;
- PiSSA (Meng et al. 2024, arXiv:2404.02948): A, B start from the top-r singular vectors of W and the
  base weight becomes the residual W - sBA, so the output is unchanged at step 0; saved as the rank-2r
  plain LoRA that applies to the untouched W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.errors import LorafitError


@dataclass(frozen=True)
class FusedSlices:
    """Names the output rows of a fused projection so that LoRA can adapt some of them only.

    A fused layer such as ChatGLM2's `query_key_value` computes q, k and v in one matmul; its output
    rows are consecutive blocks. `names[i]` names block i and `sizes[i]` is its row count; a name may
    repeat (ChatGLM-6B interleaves q, k, v per head). Every name in `adapt` gets its own rank-r pair
    (A_name: r×in, B_name: rows_of_name×r) whose output lands only in that name's rows, like loralib's
    MergedLinear with `enable_lora=[True, False, True]`.

    Example, ChatGLM2-6B (hidden 4096, 2 key/value groups of 128): adapt q and v only::

        FusedSlices(names=("q", "k", "v"), sizes=(4096, 256, 256), adapt=("q", "v"))
    """

    names: tuple
    sizes: tuple
    adapt: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        object.__setattr__(self, "adapt", tuple(self.adapt))
        if not self.names or len(self.names) != len(self.sizes):
            raise LorafitError(
                f"FusedSlices: names ({len(self.names)}) and sizes ({len(self.sizes)}) must be "
                "non-empty lists of the same length, one entry per block of output rows"
            )
        for size in self.sizes:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise LorafitError(f"FusedSlices: every size must be a positive integer, got {size!r}")
        if not self.adapt:
            raise LorafitError("FusedSlices: adapt is empty; name at least one slice to adapt")
        for name in self.adapt:
            if name not in self.names:
                raise LorafitError(
                    f"FusedSlices: adapt names {name!r}, which is not one of the slices {sorted(set(self.names))}"
                )
        if len(set(self.adapt)) != len(self.adapt):
            raise LorafitError(f"FusedSlices: adapt lists a slice twice: {list(self.adapt)}")

    @property
    def total_rows(self) -> int:
        return sum(self.sizes)

    def rows_of(self, name: str) -> list[int]:
        """Output row indices that belong to slice `name`, in increasing order."""
        rows, start = [], 0
        for block_name, size in zip(self.names, self.sizes):
            if block_name == name:
                rows.extend(range(start, start + size))
            start += size
        return rows


class LoraVariant(nn.Module):
    """The plain LoRA behaviour, for a variant to override where it differs. `layer` is the LoraLinear."""

    def group_sizes(self, layer, spec) -> list[int]:
        """Output rows of each rank-r pair (one pair covering every row unless sliced)."""
        return [layer.out_features]

    def start(self, layer, name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's starting A and B (given the plain initialisation); may set up the variant's state."""
        return a, b

    def add_update(self, layer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return layer.add_update(name, x, out)

    def delta_weight(self, layer, name: str) -> torch.Tensor:
        return layer.plain_delta_weight(name)

    def merged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        return layer.added(name, weight, +1)

    def unmerged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        return layer.added(name, weight, -1)

    def merge_refused(self, layer, name: str) -> None:
        """Drop what computing a merge that did not happen left behind."""

    def to_file(self, layer, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def from_file(self, layer, name: str, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        return tensors

    def forget(self, layer, name: str) -> None:
        """The adapter is being deleted: undo what the variant did to the base layer."""
        self.restore_base(layer, name)

    def restore_base(self, layer, name: str) -> None:
        """Give the base layer back as it was before this adapter (most variants leave it untouched)."""


class SlicedUpdate(LoraVariant):
    """One rank-r pair per adapted slice of a fused projection, written only into that slice's rows.

    A is (G·r × in) and B (rows of the adapted slices × r), G the number of adapted slices, like
    loralib's MergedLinear with `enable_lora=[True, False, True]`.
    """

    def __init__(self, slices: FusedSlices, device: torch.device) -> None:
        super().__init__()
        self.slices = slices
        self.group_rows = [slices.rows_of(g) for g in slices.adapt]
        rows = [r for group in self.group_rows for r in group]
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long, device=device), persistent=False)

    def group_sizes(self, layer, spec) -> list[int]:
        return [len(rows) for rows in self.group_rows]

    def _update(self, layer, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B_g (A_g x) for every adapted slice g, concatenated in the order of `self.rows`."""
        spec = layer.specs[name]
        hidden = F.linear(layer.adapter_input(name, x), layer.lora_A[name]) * spec.scaling
        parts = zip(hidden.split(spec.rank, dim=-1), layer.lora_B[name].split(self.group_sizes(layer, spec), dim=0))
        return torch.cat([F.linear(h, b) for h, b in parts], dim=-1)

    def add_update(self, layer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.index_add(-1, self.rows, self._update(layer, name, x).to(out.dtype))

    def delta_weight(self, layer, name: str) -> torch.Tensor:
        lora_a, lora_b, spec = layer.lora_A[name].float(), layer.lora_B[name].float(), layer.specs[name]
        delta = torch.zeros(layer.out_features, layer.in_features, device=lora_a.device)
        row_start = 0
        for group, rows in enumerate(self.group_rows):
            a_group = lora_a[group * spec.rank : (group + 1) * spec.rank]
            b_group = lora_b[row_start : row_start + len(rows)]
            delta[torch.tensor(rows, device=delta.device)] = b_group @ a_group
            row_start += len(rows)
        return spec.scaling * delta

    def to_file(self, layer, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """B zero outside each slice's rows and columns: the same s·B·A as one full-width pair."""
        lora_a, lora_b, rank = tensors["lora_A.weight"], tensors["lora_B.weight"], layer.specs[name].rank
        full_b = torch.zeros(layer.out_features, lora_a.shape[0], dtype=lora_b.dtype, device=lora_b.device)
        row_start = 0
        for group, rows in enumerate(self.group_rows):
            cols = slice(group * rank, (group + 1) * rank)
            full_b[torch.tensor(rows, device=full_b.device), cols] = lora_b[row_start : row_start + len(rows)]
            row_start += len(rows)
        return {**tensors, "lora_B.weight": full_b}

    def from_file(self, layer, name: str, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        full_b, rank = tensors["lora_B.weight"], layer.specs[name].rank
        packed, kept = [], torch.zeros_like(full_b, dtype=torch.bool)
        for group, rows in enumerate(self.group_rows):
            rows = torch.tensor(rows, device=full_b.device)
            cols = slice(group * rank, (group + 1) * rank)
            packed.append(full_b[rows, cols])
            kept[rows, cols] = True
        outside = full_b[~kept]
        if outside.numel() and bool((outside != 0).any()):
            raise LorafitError(f"{where}: lora_B has non-zero entries outside the adapted slices of a fused layer")
        return {**tensors, "lora_B.weight": torch.cat(packed, dim=0)}


class DoraUpdate(LoraVariant):
    """A learned magnitude per output row (`lora_magnitude_vector`, starting at ‖W‖) times the direction."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("merged_norms", None, persistent=False)  # what a merge divided by: to unmerge

    def start(self, layer, name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norms = layer.base.dense_weight().detach().float().norm(dim=1)  # BA = 0: ‖W‖ per output row
        layer.lora_magnitude_vector[name] = nn.Parameter(norms.to(a.dtype))
        return a, b

    def _row_norms(self, layer, name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, detached: the paper's trick to save memory and keep training stable."""
        dtype = layer.lora_A[name].dtype
        return (layer.base.dense_weight().to(dtype) + layer.plain_delta_weight(name).to(dtype)).norm(dim=1).detach()

    def add_update(self, layer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """m/‖W+sBA‖ ⊙ (W x + s B A x) + b, computed from the base output that is already there."""
        scale = (layer.lora_magnitude_vector[name] / self._row_norms(layer, name)).to(out.dtype)
        bias = layer.base_layer.bias
        without_bias = out - bias if bias is not None else out
        return out + (scale - 1) * without_bias + scale * layer.update(name, x).to(out.dtype)

    def merged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        merged = layer.added(name, weight, +1)
        self.merged_norms = merged.norm(dim=1).detach()
        return merged * (layer.lora_magnitude_vector[name].float() / self.merged_norms)[:, None]

    def unmerged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        weight = weight * (self.merged_norms / layer.lora_magnitude_vector[name].float())[:, None]
        return layer.added(name, weight, -1)

    def merge_refused(self, layer, name: str) -> None:
        self.merged_norms = None


class PissaStart(LoraVariant):
    """A, B from the top-r singular triplets of W (s·B·A is W's best rank-r part); W becomes the rest."""

    def __init__(self) -> None:
        super().__init__()
        # A0, B0: to convert the saved adapter for the untouched W, and to restore W on unload
        self.register_buffer("a0", None, persistent=False)
        self.register_buffer("b0", None, persistent=False)

    def start(self, layer, name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.base.device.type == "meta":  # nothing to decompose: a plain start of the right shapes
            return a, b
        spec = layer.specs[name]
        with torch.no_grad():
            weight = layer.base.dense_weight().float()
            u, singular, vh = torch.linalg.svd(weight, full_matrices=False)
            root = singular[: spec.rank].sqrt() / math.sqrt(spec.scaling)
            a0 = root[:, None] * vh[: spec.rank]
            b0 = u[:, : spec.rank] * root[None, :]
            layer.base.write_weight(weight - spec.scaling * (b0 @ a0))
        self.a0, self.b0 = a0.to(a.dtype).clone(), b0.to(a.dtype).clone()
        return a0.to(a.dtype), b0.to(a.dtype)

    @torch.no_grad()
    def restore_base(self, layer, name: str) -> None:
        """W_residual + s·B0·A0 = the original W: what unloading a PiSSA adapter must give back."""
        if self.a0 is not None:
            original = layer.base.dense_weight().float() + layer.specs[name].scaling * (self.b0.float() @ self.a0.float())
            layer.base.write_weight(original)

    def to_file(self, layer, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Relative to the untouched W: s·B·A - s·B0·A0, a rank-2r LoRA."""
        if self.a0 is None:
            return tensors
        lora_a, lora_b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        return {**tensors, "lora_A.weight": torch.cat([lora_a, self.a0.to(lora_a.dtype)], dim=0),
                "lora_B.weight": torch.cat([lora_b, -self.b0.to(lora_b.dtype)], dim=1)}


def variant_for(spec, layer, module_path: str) -> LoraVariant | None:
    """The strategy an adapter with these settings needs on `layer` (None: plain LoRA); checks they fit."""
    if spec.slices is not None:
        if spec.slices.total_rows != layer.out_features:
            raise LorafitError(f"fused_slices for {module_path}: sizes add up to {spec.slices.total_rows} rows but "
                               f"the layer has {layer.out_features} outputs")
        if spec.use_dora or spec.init == "pissa":
            raise LorafitError(f"{module_path}: fused_slices cannot be combined with DoRA or PiSSA")
        return SlicedUpdate(spec.slices, layer.base.device)
    if spec.use_dora:
        return DoraUpdate()
    if spec.init == "pissa":
        if layer.base.quantized:
            raise LorafitError(f"{module_path}: init='pissa' replaces the base weight by its residual W - s·B0·A0, "
                               "which on a quantized base means re-quantizing it (losing precision); train PiSSA "
                               "on a float base (no --quantize)")
        return PissaStart()
    return None
