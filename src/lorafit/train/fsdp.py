"""FSDP2 for a frozen base: each process keeps 1/W of the frozen weights; the adapter stays whole everywhere.

`shard_frozen_base` applies torch's `fully_shard` to every decoder layer (the classes transformers names in
`_no_split_modules`, as accelerate's FSDP auto-wrap does) and then to the model body, with every trainable
parameter in `ignored_params`. So:
- the frozen weights are sharded (a layer's are all-gathered just before its forward and again for its
  backward, and freed after);
- the adapter's tensors stay ordinary, replicated tensors. Their gradients are summed over ranks by
  `distributed.reduce_step`, as under DDP, so the optimizer, the checkpoints, `--resume` and the saved
  adapter are exactly those of one process, and saving gathers nothing. Sharding them would save 0.1% of the
  memory, and FSDP2 wants one dtype per layer group while lorafit keeps fp32 adapters beside a bf16 base.
- the output head stays whole on every process: lorafit's loss reads its weight directly
  (lorafit.train.loss), outside any forward call FSDP could hook.
Every all-gather is a collective, so every rank must make the same forward and backward calls: a rank with
fewer pieces in a step runs empty ones (`equal_calls`), which add exactly zero to the gradients, and the
shared-prefix layout (two body calls per piece) is not used.
On gloo the device mesh is given explicitly on the CPU; without one FSDP2 moves the modules to CUDA
(pytorch#132471).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lorafit.data.tokenizing import IGNORE_INDEX
from lorafit.errors import LorafitError
from lorafit.heap import free_large_blocks_at_once
from lorafit.train.batching import Batch
from lorafit.train.distributed import Ranks, collective


def check_fsdp_settings(*, quantized: bool, compile: bool, method) -> None:
    """Refuse, in one line, the settings FSDP2 cannot shard here (checked before any process is started)."""
    if quantized:
        raise LorafitError("--strategy fsdp with --quantize: FSDP2 does not shard bitsandbytes' 4/8-bit weights; "
                           "use --strategy ddp (each process holds the quantized base) or a bf16 base with fsdp")
    if compile:
        raise LorafitError("--strategy fsdp with --compile is not supported; leave one of them out")
    if method.fsdp_refusal:  # `method`: its registry entry (lorafit.core.registry.MethodEntry)
        raise LorafitError(f"--strategy fsdp with {method.title}: {method.fsdp_refusal}; use --strategy ddp")


def check_processes(ranks: Ranks | None) -> None:
    """FSDP2 needs several processes to shard over."""
    if ranks is None:
        raise LorafitError("--strategy fsdp shards the frozen base over several processes; start them with "
                           "--nproc N or torchrun (one process has nothing to shard over)")


def shard_frozen_base(model, ranks: Ranks, device: torch.device) -> int:
    """Shard `model`'s frozen weights over the ranks (see the module docstring); returns the layers sharded.

    On CUDA the model may come in on the CPU: the shards move to this process's GPU, and what FSDP does not
    manage (the adapter, the output head) is moved here too.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    body = getattr(model, "base_model", None)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in (body.modules() if body is not None else ()) if type(m).__name__ in layer_classes]
    if body is None or body is model or not layers:
        raise LorafitError(f"--strategy fsdp: {type(model).__name__} names no decoder-layer class "
                           "(_no_split_modules) to shard by; use --strategy ddp")
    mesh = init_device_mesh(device.type, (ranks.world_size,))
    trainable = {p for p in model.parameters() if p.requires_grad}
    head = model.get_output_embeddings()
    kept_whole = trainable | ({head.weight} if head is not None else set())  # a tied embedding is the head too
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=kept_whole & set(layer.parameters()))
    fully_shard(body, mesh=mesh, ignored_params=kept_whole & set(body.parameters()))
    model.to(device)  # the ignored tensors and the head; the sharded ones are already there
    if device.type == "cpu":
        free_large_blocks_at_once()  # measured: 1.3-1.5 GB -> 0.7 GB per process, +25% step time
    return len(layers)


def padding_piece(device: torch.device) -> Batch:
    """A one-token forward call without labels: its loss and gradients are zero, its collectives are real."""
    return Batch({"input_ids": torch.tensor([[0]], device=device)},
                 torch.tensor([[IGNORE_INDEX]], device=device), real_tokens=0, label_tokens=0)


def equal_calls(pieces: list[Batch], device: torch.device) -> list[Batch]:
    """This rank's pieces, padded with empty ones to the most any rank has this step."""
    count = torch.tensor([len(pieces)], dtype=torch.int64, device=device)
    collective("a step (counting forward calls)", lambda: dist.all_reduce(count, op=dist.ReduceOp.MAX))
    return pieces + [padding_piece(device) for _ in range(int(count.item()) - len(pieces))]
