"""Training checkpoints that resume exactly, load as adapters, and never need unpickling.

A checkpoint is a folder `step-000050/` holding
- the adapter in peft's format (`adapter_config.json`, `adapter_model.safetensors`): the same files
  `save_adapter` writes, so `lorafit eval --adapter RUN/checkpoints/step-000050` and peft load it;
- `training_state.safetensors`: every trainable parameter as the loop holds it, by parameter name
  (a PiSSA or fused-slice adapter's file form is converted; resuming needs the raw tensors);
- the optimizer's tensors (`optimizer.safetensors`), the RNG states (`rng.safetensors`) and the rest
  as JSON (`trainer_state.json`: step, data position, scheduler, optimizer hyper-parameters, Python RNG).
It is written under a temporary name and renamed into place, so a crash at any moment leaves the
previous checkpoints intact; only complete `step-*` folders are ever read, and a damaged one is
reported in one line (a run then resumes from the newest checkpoint that reads).
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
from lorafit.files import apply_default_permissions, explain_write_errors, write_json
from lorafit.formats.peft import save_adapter

STATE_NAME = "trainer_state.json"
TRAINING_STATE_NAME = "training_state.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
PREFIX = "step-"


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class CheckpointState:
    """A checkpoint read from disk and checked, not yet applied to anything."""

    path: Path
    position: Position
    state: dict
    parameters: dict
    optimizer_tensors: dict
    rng: dict


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


def trainable_state(model, parameter_names: list[str]) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().cpu().contiguous().clone() for name in parameter_names}


def save_checkpoint(
    folder: Path,
    position: Position,
    model,
    adapter_name: str,
    optimizer: torch.optim.Optimizer,
    scheduler,
    parameter_names: list[str],
    keep: int,
    base_model: dict | None = None,
) -> Path:
    """Write `folder/step-NNNNNN` atomically and drop all but the newest `keep` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(position.step)
    temporary = folder / f".{final.name}.tmp-{os.getpid()}"
    for stale in folder.glob(f".{PREFIX}*.tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    parameters = trainable_state(model, parameter_names)
    broken = [name for name, tensor in parameters.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise LorafitError(f"refusing to checkpoint non-finite weights ({broken[0]}); the last checkpoint is intact")
    try:
        with explain_write_errors(final):
            save_adapter(model, temporary, adapter_name, base_model=base_model)
            save_file(parameters, str(temporary / TRAINING_STATE_NAME))
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
            apply_default_permissions(temporary)
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
    shutil.rmtree(doomed, ignore_errors=True)  # an earlier deletion that a crash interrupted
    os.replace(checkpoint, doomed)  # atomic: from here on list_checkpoints no longer sees it
    shutil.rmtree(doomed, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_state(state) -> None:
    """Raise ValueError naming the first key of trainer_state.json that is missing or of the wrong type."""
    if not isinstance(state, dict):
        raise ValueError(f"{STATE_NAME} holds {type(state).__name__}, not an object")
    expected = {"position": dict, "parameter_names": list, "optimizer_param_groups": list,
                "optimizer_scalars": list, "scheduler": dict, "python_rng": list}
    for key, kind in expected.items():
        if key not in state:
            raise ValueError(f"{STATE_NAME} has no {key!r}")
        if not isinstance(state[key], kind):
            raise ValueError(f"{STATE_NAME}: {key!r} is {type(state[key]).__name__}, not {kind.__name__}")
    position = state["position"]
    for key in ("step", "epoch", "batch"):
        if not _is_int(position.get(key)) or position[key] < 0:
            raise ValueError(f"{STATE_NAME}: position.{key} is {position.get(key)!r}, not a count")
    if set(position) - {"step", "epoch", "batch"}:
        raise ValueError(f"{STATE_NAME}: position has unknown keys {sorted(set(position) - {'step', 'epoch', 'batch'})}")
    if not all(isinstance(n, str) for n in state["parameter_names"]):
        raise ValueError(f"{STATE_NAME}: parameter_names must be strings")
    if not all(isinstance(g, dict) for g in state["optimizer_param_groups"]):
        raise ValueError(f"{STATE_NAME}: optimizer_param_groups must be objects")
    if not all(isinstance(s, list) and len(s) == 3 and _is_int(s[0]) and isinstance(s[1], str)
               for s in state["optimizer_scalars"]):
        raise ValueError(f"{STATE_NAME}: optimizer_scalars must be [index, name, value] triples")
    rng = state["python_rng"]
    if not (len(rng) == 3 and _is_int(rng[0]) and isinstance(rng[1], list) and all(_is_int(v) for v in rng[1])
            and (rng[2] is None or isinstance(rng[2], (int, float)))):
        raise ValueError(f"{STATE_NAME}: python_rng is not a Python random state")


def read_checkpoint(checkpoint: Path) -> CheckpointState:
    """Read and check every file of a checkpoint; LorafitError (one line) if any is missing or damaged."""
    try:
        state = json.loads((checkpoint / STATE_NAME).read_text(encoding="utf-8"))
        _check_state(state)
        if not (checkpoint / TRAINING_STATE_NAME).is_file():
            raise ValueError(f"no {TRAINING_STATE_NAME}")
        parameters = load_file(str(checkpoint / TRAINING_STATE_NAME))
        optimizer_tensors = load_file(str(checkpoint / OPTIMIZER_NAME))
        rng = load_file(str(checkpoint / RNG_NAME))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, SafetensorError) as err:
        raise LorafitError(f"checkpoint {checkpoint} is damaged: {err}") from None
    if "torch_cpu" not in rng:
        raise LorafitError(f"checkpoint {checkpoint} is damaged: {RNG_NAME} has no torch_cpu state")
    if set(parameters) != set(state["parameter_names"]):
        raise LorafitError(f"checkpoint {checkpoint} is damaged: {TRAINING_STATE_NAME} does not hold the parameters "
                           f"{STATE_NAME} lists")
    return CheckpointState(checkpoint, Position(**state["position"]), state, parameters, optimizer_tensors, rng)


def newest_readable(folder: Path, echo=print) -> CheckpointState | None:
    """The newest checkpoint in `folder` that reads; each damaged newer one is reported and passed over."""
    for checkpoint in reversed(list_checkpoints(folder)):
        try:
            return read_checkpoint(checkpoint)
        except LorafitError as err:
            echo(f"warning: {err}; trying the checkpoint before it")
    return None


def restore_checkpoint(
    read: CheckpointState,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    parameter_names: list[str],
) -> Position:
    """Apply a read checkpoint: trainable weights, optimizer, scheduler and RNG; returns the position."""
    state = read.state
    if state["parameter_names"] != parameter_names:
        ours, theirs = set(parameter_names), set(state["parameter_names"])
        example = sorted(ours ^ theirs)[:1] or ["(the same names in another order)"]
        raise LorafitError(
            f"checkpoint {read.path} was made for other trainable parameters ({len(theirs)} there, {len(ours)} now; "
            f"e.g. {example[0]}); resume with the method and targets of the run"
        )
    parameters = dict(model.named_parameters())
    for name in parameter_names:
        if tuple(read.parameters[name].shape) != tuple(parameters[name].shape):
            raise LorafitError(f"checkpoint {read.path}: {name} has shape {tuple(read.parameters[name].shape)}, "
                               f"the model's is {tuple(parameters[name].shape)}")
    optimizer_state: dict = {"state": {}, "param_groups": state["optimizer_param_groups"]}
    for key, tensor in read.optimizer_tensors.items():
        index, name = key.split(".", 1)
        optimizer_state["state"].setdefault(int(index), {})[name] = tensor
    for index, name, value in state["optimizer_scalars"]:
        optimizer_state["state"].setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise LorafitError(f"checkpoint {read.path}: its optimizer state does not fit this run ({err})") from None
    with torch.no_grad():
        for name in parameter_names:
            parameters[name].copy_(read.parameters[name])

    torch.set_rng_state(read.rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [read.rng[k] for k in sorted(read.rng) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return read.position
