"""Training checkpoints that resume exactly and never need unpickling.

A checkpoint is a folder `step-000050/` holding the adapter (peft format), the optimizer's tensors
(`optimizer.safetensors`), the RNG states (`rng.safetensors`) and everything else as JSON
(`trainer_state.json`: step, data position, scheduler, optimizer hyper-parameters, Python RNG).
It is written under a temporary name and renamed into place, so a crash at any moment leaves the
previous checkpoints intact; only complete `step-*` folders are ever read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafit.errors import LorafitError
from lorafit.files import explain_write_errors, write_json
from lorafit.io import load_adapter_weights_into, save_adapter

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
PREFIX = "step-"


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with '.' and are never listed)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    state = optimizer.state_dict()
    tensors, scalars = {}, []
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.append([index, key, value])
    return tensors, scalars


def save_checkpoint(
    folder: Path,
    position: Position,
    model,
    adapter_name: str,
    optimizer: torch.optim.Optimizer,
    scheduler,
    parameter_names: list[str],
    keep: int,
) -> Path:
    """Write `folder/step-NNNNNN` atomically and drop all but the newest `keep` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(position.step)
    temporary = folder / f".{final.name}.tmp-{os.getpid()}"
    for stale in folder.glob(f".{PREFIX}*.tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with explain_write_errors(final):
            save_adapter(model, temporary, adapter_name, for_resume=True)
            tensors, scalars = _optimizer_tensors(optimizer)
            save_file(tensors, str(temporary / OPTIMIZER_NAME))
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                for index, state in enumerate(torch.cuda.get_rng_state_all()):
                    rng[f"torch_cuda_{index}"] = state
            save_file(rng, str(temporary / RNG_NAME))
            python_rng = random.getstate()
            write_json(temporary / STATE_NAME, {
                "position": asdict(position),
                "parameter_names": parameter_names,
                "optimizer_param_groups": optimizer.state_dict()["param_groups"],
                "optimizer_scalars": scalars,
                "scheduler": scheduler.state_dict(),
                "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
            })
            if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
                _remove(final)
            os.replace(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a crash midway never leaves a half-deleted one that looks complete."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.tmp-deleting")
    os.replace(checkpoint, doomed)  # atomic: from here on list_checkpoints no longer sees it
    shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(
    checkpoint: Path,
    model,
    adapter_name: str,
    optimizer: torch.optim.Optimizer,
    scheduler,
    parameter_names: list[str],
) -> Position:
    """Restore adapter weights, optimizer, scheduler and RNG from `checkpoint`; returns the position."""
    try:
        state = json.loads((checkpoint / STATE_NAME).read_text(encoding="utf-8"))
        optimizer_tensors = load_file(str(checkpoint / OPTIMIZER_NAME))
        rng = load_file(str(checkpoint / RNG_NAME))
    except (OSError, ValueError, SafetensorError) as err:
        raise LorafitError(f"checkpoint {checkpoint} is unreadable: {err}") from None
    if state["parameter_names"] != parameter_names:
        raise LorafitError(
            f"checkpoint {checkpoint} was made for other trainable parameters "
            f"({len(state['parameter_names'])} there, {len(parameter_names)} now); resume with the same method and targets"
        )
    load_adapter_weights_into(model, checkpoint, adapter_name)

    optimizer_state: dict = {"state": {}, "param_groups": state["optimizer_param_groups"]}
    for key, tensor in optimizer_tensors.items():
        index, name = key.split(".", 1)
        optimizer_state["state"].setdefault(int(index), {})[name] = tensor
    for index, name, value in state["optimizer_scalars"]:
        optimizer_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state["scheduler"])

    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return Position(**state["position"])
