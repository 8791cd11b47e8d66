"""Data-parallel training under torchrun: every process holds the model, each trains on its share of a step.

What makes W processes give the one-process result (same global batch, same seed):
- the step's examples are the one-process plan's, dealt out without overlap (`share`: example i of the
  micro-batch goes to rank i mod W), so every example is seen once per step, as in one process;
- the loss stays the mean over the step's label tokens of all ranks: the label-token count is summed over
  ranks before any backward, and each rank's summed loss is divided by that global count;
- the gradients are then summed over ranks (`reduce_step`: one all-reduce of one flat buffer holding every
  adapter gradient, the loss sum and the stop flag), so every rank holds the one-process gradient, clips it
  the same way and takes the same optimizer step; the weights never diverge and are never broadcast.
Only the adapter's gradients travel (the frozen base has none): for LoRA r=8 on q, v of llama-7B, 4.19 M
fp32 values, 16.8 MB per optimizer step. torch's DistributedDataParallel wrapper does the same reduction in
buckets during backward; it is not used because lorafit's loss runs the model's body and head separately
(lorafit.train.loss), which its forward-based bookkeeping does not see.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lorafit.errors import LorafitError

# How long a collective waits for the other ranks before failing (a rank killed or hung).
DEFAULT_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int
    world_size: int
    local_rank: int
    sharded_base: bool = False  # FSDP2 (lorafit.train.fsdp): every rank must make the same forward calls

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_type: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> Ranks | None:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU); None for a single process."""
    if not launched_by_torchrun():
        return None
    if not dist.is_available():
        raise LorafitError("torchrun started several processes, but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return ranks


def collective(operation: str, call):
    """Run one collective; a lost or hung rank (gloo: connection reset, timeout; nccl: a backend error) becomes
    one line saying so on every surviving rank, instead of a traceback from deep inside torch."""
    try:
        return call()
    except RuntimeError as err:  # DistBackendError and gloo's errors are RuntimeErrors
        raise _lost_ranks(operation, err) from err


@contextlib.contextmanager
def collectives_inside(operation: str):
    """Like `collective`, for code that makes collectives among other work (FSDP2's all-gathers in forward and
    backward): only errors of the backend itself are turned into the line; any other error stays as it is."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, dist.DistError) or any(mark in str(err) for mark in ("gloo/transport", "NCCL", "Timed out")):
            raise _lost_ranks(operation, err) from err
        raise


def _lost_ranks(operation: str, err: RuntimeError) -> LorafitError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LorafitError(f"rank {dist.get_rank()}: the other training processes stopped answering during {operation} "
                        f"({text[:200]}); torchrun's summary names the rank that failed (a collective waits at "
                        "most --collective-timeout seconds)")


def share(indices: list[int], ranks: Ranks | None) -> list[int]:
    """This rank's examples of a micro-batch: every W-th, starting at its rank (all of them alone)."""
    return indices if ranks is None else indices[ranks.rank :: ranks.world_size]


def global_label_tokens(local: int, ranks: Ranks | None, device: torch.device) -> int:
    """The step's label tokens over all ranks (the loss's denominator)."""
    if ranks is None:
        return local
    count = torch.tensor([local], dtype=torch.int64, device=device)
    collective("a step (counting label tokens)", lambda: dist.all_reduce(count))
    return int(count.item())


def reduce_step(parameters: list[torch.Tensor], totals: list[float], ranks: Ranks) -> list[float]:
    """Sum every rank's gradients (in place) and the step's `totals` (loss sum, tokens) in one all-reduce.

    A parameter without a gradient on this rank (it ran no example this step) counts as zeros. Returns the
    totals summed over ranks.
    """
    device = parameters[0].device
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in parameters]
                     + [torch.tensor(totals, dtype=torch.float32, device=device)])
    collective("a step (summing gradients)", lambda: dist.all_reduce(flat))
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        values = flat[offset : offset + count].view_as(parameter).to(parameter.dtype)
        if parameter.grad is None:
            parameter.grad = values.clone()
        else:
            parameter.grad.copy_(values)
        offset += count
    return flat[offset:].tolist()


def any_rank(flag: bool, ranks: Ranks | None) -> bool:
    """Whether `flag` is set on any rank (a stop request: every rank then stops after the same step)."""
    if ranks is None:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_device())
    collective("a step (the stop check)", lambda: dist.all_reduce(value))
    return bool(value.item())


def from_main(compute, ranks: Ranks | None):
    """`compute()` on rank 0, its result given to every rank; an error there (a LorafitError) is raised on
    every rank, so the others stop at once instead of waiting out the collective timeout."""
    if ranks is None:
        return compute()
    payload = [None]
    if ranks.is_main:
        try:
            payload[0] = ("value", compute())
        except LorafitError as err:
            payload[0] = ("error", str(err))
    collective("the start", lambda: dist.broadcast_object_list(payload, src=0))
    kind, value = payload[0]
    if kind == "error":
        if ranks.is_main:
            raise LorafitError(value)
        raise SaidByRankZero(value)
    return value


class SaidByRankZero(LorafitError):
    """Rank 0's error, raised on the other ranks too so they stop; the command line prints it once (rank 0)."""

    printed_elsewhere = True


def check_under_torchrun(config, ranks: Ranks | None) -> None:
    """Refuse, in one line, the settings that mean something else (or nothing) across several processes."""
    if ranks is None:
        return
    if config.batch_size == "auto":
        raise LorafitError("--batch-size auto plans one process's memory; under torchrun give the global "
                           "--batch-size (each process runs its share of it)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
    if config.nproc is not None and config.nproc != local:
        raise LorafitError(f"--nproc {config.nproc}, but torchrun started {local} processes on this machine; "
                           "leave --nproc out under your own torchrun")


def _device() -> torch.device:
    """Where this backend's collectives take their tensors (nccl: the process's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
