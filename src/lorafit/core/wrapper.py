"""What every adapter wrapper shares: the frozen base layer kept intact, named adapters, merge state.

A wrapper replaces one module of the user's model. The original module lives on, untouched, as
`wrapper.base_layer`, so unloading puts back exactly what was there. Each method (LoRA, IA3, ...)
subclasses this with its parameters, its forward and how its update folds into the base weight; the
registry (lorafit.methods) says which wrapper a method uses, and the shared code here does the rest:
naming, activation, deletion, the checked merge, and the file tensors under peft's key suffixes.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.core.base_layer import linear_base, linear_types
from lorafit.errors import LorafitError


class AdapterWrapper(nn.Module):
    """Base layer + named adapters; subclasses define `forward`, `_merge_one` and `_unmerge_one`."""

    # Names of the nn.ParameterDict attributes that hold per-adapter tensors (set by subclasses).
    adapter_parameter_dicts: tuple[str, ...] = ()
    # Whether a file may bring this layer's own base weight (peft saves a trained embedding's): see
    # replace_base_weight.
    takes_base_weight_from_file = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    # -- bookkeeping shared by every method -------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Adapters with a tensor here, in the order they were added (any parameter dict may hold one)."""
        names: dict[str, None] = {}
        for dict_name in self.adapter_parameter_dicts:
            names.update(dict.fromkeys(getattr(self, dict_name).keys()))
        return list(names)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `layer.weight` (e.g. its device) keeps working."""
        return self.base_layer.weight

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype the base layer computes in (a quantized layer's stored weight is not float)."""
        if isinstance(self.base_layer, linear_types()):
            return linear_base(self.base_layer).dtype
        return self.base_layer.weight.dtype

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def check_delete(self, name: str, module_path: str) -> None:
        """Raise if adapter `name` cannot be deleted here now; changes nothing."""
        if name in self.merged_adapters:
            raise LorafitError(f"adapter {name!r} is merged into the weights of {module_path}; "
                               "unmerge it before deleting it")

    def delete(self, name: str, module_path: str) -> None:
        self.check_delete(name, module_path)
        for dict_name in self.adapter_parameter_dicts:
            parameters = getattr(self, dict_name)
            if name in parameters:
                del parameters[name]
        self._forget(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _forget(self, name: str) -> None:
        """Drop per-adapter settings kept outside the parameter dicts (overridden where there are any)."""

    def restore_base(self) -> None:
        """Undo changes an adapter made to the base layer itself (PiSSA's residual); most make none."""

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The trainable tensors of one adapter, by parameter-dict name."""
        return {dict_name: getattr(self, dict_name)[name]
                for dict_name in self.adapter_parameter_dicts if name in getattr(self, dict_name)}

    # -- files: tensors under `<module path>.<suffix>` keys (peft's names where peft has the method) ----
    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """{key suffix: tensor} to save, in the file's form (checkpoints keep the raw parameters themselves)."""
        return {suffix: getattr(self, dict_name)[name].detach()
                for suffix, dict_name in self.file_suffixes(name).items()}

    def file_suffixes(self, name: str) -> dict[str, str]:
        """{key suffix in the file: parameter-dict name}."""
        raise NotImplementedError

    def expected_file_shapes(self, name: str) -> dict[str, tuple]:
        return {suffix: tuple(t.shape) for suffix, t in self.file_tensors(name).items()}

    @torch.no_grad()
    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy tensors (already checked against expected_file_shapes) into the adapter."""
        for suffix, dict_name in self.file_suffixes(name).items():
            target = getattr(self, dict_name)[name]
            target.copy_(tensors[suffix].to(target.dtype))

    # -- merging ------------------------------------------------------------------------------------
    # Subclasses say what the base layer's tensors become: {"weight": new tensor, ...}. The shared code
    # checks the result is finite before anything is written, so a refused merge changes nothing.
    def _merged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _unmerged_tensors(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def check_merge(self, names: list[str], module_path: str) -> None:
        """Raise if merging `names` would give a non-finite weight; writes nothing."""
        for name in names:
            if name not in self.merged_adapters:
                self._cast_and_check(self._merged_tensors(name), f"merging adapter {name!r} into {module_path}")

    @torch.no_grad()
    def merge(self, names: list[str], module_path: str) -> None:
        """Fold adapters into the base weights; the forward then runs the base layer alone for them."""
        for name in names:
            if name in self.merged_adapters:
                continue
            self._assign(self._merged_tensors(name), f"merging adapter {name!r} into {module_path}")
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, module_path: str) -> None:
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            self._assign(self._unmerged_tensors(name), f"unmerging adapter {name!r} from {module_path}")
            self.merged_adapters.pop()

    def _cast_and_check(self, new_tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """Cast to the base tensors' dtypes (fp16 can overflow here) and refuse anything non-finite."""
        cast = {}
        for tensor_name, value in new_tensors.items():
            value = value.to(self._stored_dtype(tensor_name))
            if not torch.isfinite(value).all():
                raise LorafitError(f"{what}.{tensor_name} would give NaN/Inf; refused, no weight was changed")
            cast[tensor_name] = value
        return cast

    def _assign(self, new_tensors: dict[str, torch.Tensor], what: str) -> None:
        for tensor_name, value in self._cast_and_check(new_tensors, what).items():
            self._write_base_tensor(tensor_name, value)

    def _stored_dtype(self, tensor_name: str) -> torch.dtype:
        return getattr(self.base_layer, tensor_name).dtype

    def _write_base_tensor(self, tensor_name: str, value: torch.Tensor) -> None:
        """Store a merged tensor in the base layer (in its stored layout unless a subclass says otherwise)."""
        getattr(self.base_layer, tensor_name).copy_(value)

    def extra_repr(self) -> str:
        merged = f", merged={self.merged_adapters}" if self.merged_adapters else ""
        return f"active={self.active_adapters}{merged}"


class LinearAdapterWrapper(AdapterWrapper):
    """A wrapper around a linear layer, which it sees only through its `base_layer.LinearBase` view.

    Merges of such methods give the dense (out, in) weight; the view stores it in the layer's own layout.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._view = linear_base(base_layer)
        self.fan_in_fan_out = self.base.stores_transposed  # peft's name for a (in, out) stored weight
        self.in_features, self.out_features = self.base.in_features, self.base.out_features

    @property
    def base(self):
        """The view of the base layer; a new one when the layer was swapped (dequantize_model puts a dense
        nn.Linear where a 4-bit one was), so the wrapper always sees the layer it holds."""
        if self._view.layer is not self.base_layer:
            self._view = linear_base(self.base_layer)
        return self._view

    def _stored_dtype(self, tensor_name: str) -> torch.dtype:
        return self.base.dtype if tensor_name == "weight" else super()._stored_dtype(tensor_name)

    def _write_base_tensor(self, tensor_name: str, value: torch.Tensor) -> None:
        if tensor_name == "weight":
            self.base.write_weight(value)
        else:
            super()._write_base_tensor(tensor_name, value)
