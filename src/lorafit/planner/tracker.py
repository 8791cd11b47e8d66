"""Counting the bytes of every tensor a piece of PyTorch code creates, live at each moment and at the peak.

A `TorchDispatchMode` sees the output of every aten operation, fake tensors included (fake tensors have
shapes, dtypes and a device but no memory), so running lorafit's own training step on a fake model under
it gives the step's memory timeline without allocating it. A tensor's bytes count from the operation that
creates its storage until the storage is garbage-collected (a weakref callback); views share their
base's storage and count once. This is the idea behind PyTorch's own (private) MemTracker, reduced to
what the planner needs.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active.

    Storages that exist before (`already_there`: the model's weights) are not counted; `reset_peak()` starts
    a new peak from the current live bytes (planner.simulate reads `live` in module hooks to split the step
    into layers and the loss), `forget(tensor)` stops counting a storage the real run would not have (see
    planner.simulate: a mask transformers builds only for fake inputs).
    """

    def __init__(self, already_there=()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        for tensor in already_there:
            self._sizes[self._key(tensor)] = 0

    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        return id(tensor.untyped_storage())

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def forget(self, tensor: torch.Tensor) -> None:
        key = self._key(tensor)
        self.live -= self._sizes.get(key, 0)
        self._sizes[key] = 0

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out
